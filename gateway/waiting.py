"""Waiting for invocations to finish, for ``Prefer: wait`` and ``?wait=``.

Each gateway process subscribes once to the cache's notifications and wakes
the requests waiting on an invocation by its id. A waiter registers before it
looks at the record, so a notification sent between the look and the wait is
not lost. Notifications are best effort, so a waiter also re-reads the record
now and then: often when they cannot reach this process (an in-memory cache,
or a listener that is down), rarely when they can.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from conveyor_core.cache import Cache
from conveyor_core.records import Invocation

logger = logging.getLogger(__name__)

#: The first re-read when notifications may not arrive; it doubles from there.
FIRST_POLL_S = 0.002
#: The longest pause between re-reads when notifications may not arrive.
MAX_FAST_POLL_S = 0.05
#: The pause between re-reads when notifications do arrive (a safety net).
SLOW_POLL_S = 1.0
#: How long after a failed subscription the next attempt is made.
RESUBSCRIBE_S = 5.0

Loader = Callable[[], Invocation]


class Watch:
    """A registered waiter for one invocation."""

    __slots__ = ("invocation_id", "notified", "_event", "_hub")

    def __init__(self, hub: WaitHub, invocation_id: str) -> None:
        self.invocation_id = invocation_id
        #: Whether the cache announced the invocation since the last pause.
        self.notified = False
        self._event = threading.Event()
        self._hub = hub

    def pause(self, timeout_s: float) -> None:
        """Sleep until woken or poked, or for ``timeout_s``."""
        self.notified = False
        self._event.wait(timeout_s)
        self._event.clear()

    def wait(
        self, timeout_s: float, load: Loader, *, check_first: bool = True
    ) -> Invocation:
        """The invocation once it is terminal, or as it is when time runs out.

        ``check_first`` False skips the first read, for a caller that
        registered before the invocation could possibly finish.
        """
        deadline = time.monotonic() + timeout_s
        invocation = load() if check_first else None
        pause_s = FIRST_POLL_S

        while invocation is None or not invocation.status.terminal:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            polls_often = self._hub.polls_often()
            self._event.wait(min(pause_s if polls_often else SLOW_POLL_S, remaining_s))
            # Cleared before the read: a notification after this point sets it
            # again, and one before it is seen by the read.
            self._event.clear()
            invocation = load()
            if polls_often:
                pause_s = min(pause_s * 2, MAX_FAST_POLL_S)

        return invocation if invocation is not None else load()

    def wake(self) -> None:
        """The invocation was announced; runs on the cache's listener."""
        self.notified = True
        self._event.set()

    def poke(self) -> None:
        """Wake the waiter for some other reason than an announcement."""
        self._event.set()


class WaitHub:
    """Wakes the requests waiting on an invocation when the cache announces it."""

    def __init__(self, cache: Callable[[], Cache]) -> None:
        self._cache = cache
        self._lock = threading.Lock()
        self._watches: dict[str, list[Watch]] = {}
        self._subscribe_lock = threading.Lock()
        self._subscribed: Cache | None = None
        self._retry_subscribe_at = 0.0

    @contextmanager
    def watch(self, invocation_id: str) -> Iterator[Watch]:
        """Register a waiter for the invocation, for the ``with`` block."""
        self._subscribe()
        watch = Watch(self, invocation_id)
        with self._lock:
            self._watches.setdefault(invocation_id, []).append(watch)
        try:
            yield watch
        finally:
            with self._lock:
                watches = self._watches.get(invocation_id)
                if watches is not None:
                    watches.remove(watch)
                    if not watches:
                        del self._watches[invocation_id]

    def wait(self, invocation_id: str, timeout_s: float, load: Loader) -> Invocation:
        """Register, read, and wait until the invocation is terminal or time is up."""
        with self.watch(invocation_id) as watch:
            return watch.wait(timeout_s, load)

    def waiting(self) -> int:
        """How many waiters are registered now."""
        with self._lock:
            return sum(len(watches) for watches in self._watches.values())

    def polls_often(self) -> bool:
        """Whether a notification might not reach this process."""
        cache = self._subscribe()
        if cache is None or not cache.shared:
            return True
        return not getattr(cache, "listening", True)

    def notify(self, invocation_id: str) -> None:
        """Wake every waiter of the invocation; runs on the cache's listener."""
        with self._lock:
            watches = self._watches.get(invocation_id)
            if watches:
                for watch in watches:
                    watch.wake()

    def _subscribe(self) -> Cache | None:
        """The cache this hub listens to, subscribing on first use."""
        subscribed = self._subscribed
        if subscribed is not None:
            return subscribed
        if time.monotonic() < self._retry_subscribe_at:
            return None

        with self._subscribe_lock:
            if (
                self._subscribed is None
                and time.monotonic() >= self._retry_subscribe_at
            ):
                try:
                    cache = self._cache()
                    cache.subscribe(self.notify)
                except Exception as exc:
                    self._retry_subscribe_at = time.monotonic() + RESUBSCRIBE_S
                    logger.warning(
                        "cannot subscribe to cache notifications, waiting requests "
                        "poll the store instead: %s",
                        exc,
                        extra={"retry_in_s": RESUBSCRIBE_S},
                    )
                    return None
                self._subscribed = cache
        return self._subscribed
