"""Primes up to a limit by the sieve of Eratosthenes: CPU-bound work."""

from conveyor import task


@task(timeout_s=60, memory_mb=512)
def primes(limit: int) -> dict:
    """How many primes there are up to ``limit``, the largest, and the first ten."""
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number of at least 0, got {limit!r}")
    if limit < 2:
        return {"count": 0, "largest": None, "first": []}
    sieve = bytearray([1]) * (limit + 1)
    sieve[0] = sieve[1] = 0
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit + 1, n)))
    found = [n for n in range(min(limit, 30) + 1) if sieve[n]][:10]
    largest = next(n for n in range(limit, 1, -1) if sieve[n])
    return {"count": sum(sieve), "largest": largest, "first": found}
