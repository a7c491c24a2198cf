"""Conveyor's HTTP gateway: keys, the function registry and the invocation API."""

from gateway.app import create_app

__all__ = ["create_app"]
