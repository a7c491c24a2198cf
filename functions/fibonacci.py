"""The n-th Fibonacci number, computed iteratively (exact for any n)."""

from conveyor import task


@task
def fibonacci(n: int) -> int:
    if n < 0:
        raise ValueError(f"n must be at least 0, got {n}")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
