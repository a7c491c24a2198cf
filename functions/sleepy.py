"""Sleeps, then says how long: for timeouts and concurrency."""

import time

from conveyor import task


@task(timeout_s=30)
def sleepy(seconds: float = 1.0) -> float:
    print(f"sleeping {seconds} s", flush=True)
    started = time.monotonic()
    time.sleep(seconds)
    return round(time.monotonic() - started, 3)
