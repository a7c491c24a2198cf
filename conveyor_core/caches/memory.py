"""The in-memory result cache: the local twin of Redis for one process."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from conveyor_core.cache import Cache

logger = logging.getLogger(__name__)


class MemoryCache(Cache):
    """A thread-safe dict of finished invocations with per-entry expiry."""

    shared = False

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # Insertion order is the eviction order: the entry put longest ago
        # goes first. Each value is (expires_at on the monotonic clock, doc).
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._callbacks: list[Callable[[str], None]] = []
        self._closed = False

    @property
    def listening(self) -> bool:
        """Whether a put reaches the subscribers; true until the cache is closed."""
        return not self._closed

    def get(self, invocation_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(invocation_id)
            if entry is None:
                return None
            expires_at, doc = entry
            if expires_at <= now:
                del self._entries[invocation_id]
                return None

        # A copy, so that a caller changing what it got (or what it put)
        # cannot change the cached document, just as with Redis.
        return copy.deepcopy(doc)

    def put(self, invocation_id: str, doc: dict[str, Any], ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s!r}")
        now = time.monotonic()
        entry = (now + ttl_s, copy.deepcopy(doc))

        with self._lock:
            self._entries[invocation_id] = entry
            self._entries.move_to_end(invocation_id)
            self._drop_expired_and_excess(now)
            callbacks = list(self._callbacks)

        # Outside the lock: a callback may read the cache back.
        for callback in callbacks:
            self._notify(callback, invocation_id)

    def _drop_expired_and_excess(self, now: float) -> None:
        """Trim from the oldest end; the caller holds the lock."""
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

        # Only the head is checked, which keeps a put cheap; entries further
        # in that expired early are dropped when read or when they reach it.
        while entries:
            oldest_id, (expires_at, _) = next(iter(entries.items()))
            if expires_at > now:
                break
            del entries[oldest_id]

    def _notify(self, callback: Callable[[str], None], invocation_id: str) -> None:
        try:
            callback(invocation_id)
        except Exception:
            # A waiter's fault must not fail the worker that finished the job.
            logger.exception(
                "cache subscriber failed for invocation %s",
                invocation_id,
                extra={"invocation_id": invocation_id},
            )

    def subscribe(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            if not self._closed:
                self._callbacks.append(callback)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._callbacks.clear()
            self._entries.clear()
