"""Conveyor's runtime: consumes invocations and runs them in executors."""
