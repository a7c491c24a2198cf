"""The backends a gateway process talks to, opened once per process.

Gunicorn forks its workers after the application is built, and a connection
opened before a fork must not be shared by two processes. So a backend that
comes from the settings is opened on first use in each process, and opened
again in a child that inherits one.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from conveyor_core.backends import open_broker, open_cache, open_store
from conveyor_core.broker import Broker
from conveyor_core.cache import Cache
from conveyor_core.settings import Settings
from conveyor_core.store import Store
from gateway.waiting import WaitHub

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PerProcess(Generic[T]):
    """A value made by ``factory`` on first use in each process."""

    __slots__ = ("_factory", "_value", "_pid", "_lock", "__weakref__")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._pid = -1
        # One lock per value, so a backend that is slow to open (a broker
        # that is down, say) does not hold up requests that need another.
        self._lock = threading.Lock()
        _holders.add(self)

    def get(self) -> T:
        pid = os.getpid()
        if self._pid == pid:
            return self._value  # type: ignore[return-value]
        with self._lock:
            if self._pid != pid:
                self._value = self._factory()
                self._pid = pid
        return self._value  # type: ignore[return-value]

    def peek(self) -> T | None:
        """The value if this process made it already, else None."""
        return self._value if self._pid == os.getpid() else None

    def reset_lock(self) -> None:
        self._lock = threading.Lock()


_holders: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()


def _reset_locks_in_child() -> None:
    # A fork copies a lock in whatever state a parent's thread left it; that
    # thread does not exist in the child, so the lock would never be released.
    for holder in list(_holders):
        holder.reset_lock()


os.register_at_fork(after_in_child=_reset_locks_in_child)


class Given(Generic[T]):
    """A value handed in by the caller (tests), used as is in every process."""

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        return self._value

    def peek(self) -> T | None:
        return self._value


class Backends:
    """The store, broker, cache and wait hub of this gateway process."""

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        broker: Broker | None = None,
        cache: Cache | None = None,
    ) -> None:
        self.settings = settings
        self._store: PerProcess[Store] | Given[Store] = (
            Given(store)
            if store is not None
            else PerProcess(lambda: open_store(settings))
        )
        self._broker: PerProcess[Broker] | Given[Broker] = (
            Given(broker)
            if broker is not None
            else PerProcess(lambda: open_broker(settings))
        )
        self._cache: PerProcess[Cache] | Given[Cache] = (
            Given(cache)
            if cache is not None
            else PerProcess(lambda: open_cache(settings))
        )
        self._hub: PerProcess[WaitHub] = PerProcess(lambda: WaitHub(lambda: self.cache))

    @property
    def store(self) -> Store:
        return self._store.get()

    @property
    def broker(self) -> Broker:
        return self._broker.get()

    @property
    def cache(self) -> Cache:
        return self._cache.get()

    @property
    def hub(self) -> WaitHub:
        return self._hub.get()

    def close(self) -> None:
        """Close what this process opened itself; given backends stay open."""
        for holder in (self._store, self._broker, self._cache):
            if isinstance(holder, PerProcess):
                value = holder.peek()
                if value is not None:
                    value.close()
