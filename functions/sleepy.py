"""Sleeps, then says how long: for timeouts and concurrency."""

import time


def sleepy(seconds: float = 1.0) -> float:
    print(f"sleeping {seconds} s", flush=True)
    started = time.monotonic()
    time.sleep(seconds)
    return round(time.monotonic() - started, 3)
