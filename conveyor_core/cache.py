"""The cache port: finished invocations by id, and a wake-up for waiters.

Backends live in ``conveyor_core.caches``, one module each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class Cache(ABC):
    """A best-effort copy of finished invocations; the store stays the truth."""

    #: Whether a notification reaches other processes (False for in-memory).
    shared: bool = True

    @abstractmethod
    def get(self, invocation_id: str) -> dict[str, Any] | None:
        """The cached document of a finished invocation, or None."""

    @abstractmethod
    def put(self, invocation_id: str, doc: dict[str, Any], ttl_s: int) -> None:
        """Cache the finished invocation's document and notify subscribers."""

    def put_many(self, docs: Sequence[tuple[str, dict[str, Any]]], ttl_s: int) -> None:
        """``put`` for each ``(invocation_id, doc)``, in one round trip if possible."""
        for invocation_id, doc in docs:
            self.put(invocation_id, doc, ttl_s)

    @abstractmethod
    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(invocation_id)`` for each invocation put from now on.

        Runs a listener in the background that survives reconnections; the
        callback runs on that listener's thread and must return quickly.
        """

    @abstractmethod
    def ping(self) -> None:
        """Return if the cache answers; raise CacheUnavailable otherwise."""

    @abstractmethod
    def close(self) -> None:
        """Stop listeners and release connections."""
