"""The gateway's wait hub, on its own, and the gunicorn configuration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conveyor_core.caches.memory import MemoryCache
from conveyor_core.errors import CacheUnavailable
from conveyor_core.records import Invocation, State
from conveyor_core.settings import Settings
from gateway import waiting
from gateway.waiting import WaitHub
from gateway.wsgi import GatewayServer, gunicorn_options


class ListeningCache(MemoryCache):
    """An in-memory cache that claims to reach every process, or not."""

    shared = True

    def __init__(self, listening: bool = True) -> None:
        super().__init__()
        self.listening_now = listening

    @property
    def listening(self) -> bool:
        return self.listening_now


class BrokenCache(MemoryCache):
    """A cache whose subscription fails."""

    subscriptions = 0

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self.subscriptions += 1
        raise CacheUnavailable("no pub/sub today")


class Record:
    """The invocation a fake store holds, and how often it was read."""

    def __init__(self) -> None:
        self.invocation = Invocation(id="inv_1", tenant="acme", function="f", version=1)
        self.reads = 0

    def load(self) -> Invocation:
        self.reads += 1
        return self.invocation

    def finish(self) -> None:
        self.invocation.status = State.SUCCEEDED


def test_a_notification_wakes_the_waiter_promptly() -> None:
    cache = ListeningCache()
    hub = WaitHub(lambda: cache)
    record = Record()

    def runtime() -> None:
        time.sleep(0.1)
        record.finish()
        cache.put("inv_1", record.invocation.to_doc(), 60)

    threading.Thread(target=runtime).start()
    started = time.monotonic()
    invocation = hub.wait("inv_1", 5.0, record.load)
    elapsed_s = time.monotonic() - started

    assert invocation.status is State.SUCCEEDED
    assert elapsed_s < 0.6
    # Registered, read once, woken once, read again: no polling in between.
    assert record.reads == 2
    assert hub.waiting() == 0


def test_notifications_of_other_invocations_wake_nobody_else() -> None:
    cache = ListeningCache()
    hub = WaitHub(lambda: cache)
    record = Record()
    timer = threading.Timer(0.05, cache.put, ("inv_2", {"id": "inv_2"}, 60))
    timer.start()
    invocation = hub.wait("inv_1", 0.3, record.load)
    timer.join()
    assert invocation.status is State.QUEUED
    assert record.reads == 2


def test_waiters_poll_often_when_notifications_cannot_arrive() -> None:
    unshared = MemoryCache()
    assert WaitHub(lambda: unshared).polls_often()

    cache = ListeningCache(listening=False)
    hub = WaitHub(lambda: cache)
    assert hub.polls_often()
    cache.listening_now = True
    assert not hub.polls_often()

    record = Record()
    threading.Timer(0.1, record.finish).start()
    started = time.monotonic()
    cache.listening_now = False
    invocation = hub.wait("inv_1", 5.0, record.load)
    assert invocation.status is State.SUCCEEDED
    assert time.monotonic() - started < 0.5


def test_waiters_poll_rarely_when_notifications_arrive() -> None:
    cache = ListeningCache()
    hub = WaitHub(lambda: cache)
    record = Record()
    hub.wait("inv_1", 0.5, record.load)
    assert record.reads <= 2


def test_a_failed_subscription_is_retried_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = BrokenCache()
    hub = WaitHub(lambda: cache)
    assert hub.polls_often()
    assert hub.polls_often()
    assert cache.subscriptions == 1

    monkeypatch.setattr(waiting, "RESUBSCRIBE_S", 0.0)
    hub = WaitHub(lambda: cache)
    hub.polls_often()
    hub.polls_often()
    assert cache.subscriptions == 3


def test_the_hub_subscribes_once() -> None:
    subscribed: list[Any] = []

    class Counting(ListeningCache):
        def subscribe(self, callback: Callable[[str], None]) -> None:
            subscribed.append(callback)
            super().subscribe(callback)

    cache = Counting()
    hub = WaitHub(lambda: cache)
    for _ in range(3):
        hub.wait("inv_1", 0.01, Record().load)
    assert len(subscribed) == 1


def test_waiters_are_released_even_when_loading_fails() -> None:
    hub = WaitHub(lambda: ListeningCache())

    def failing() -> Invocation:
        raise RuntimeError("store fell over")

    with pytest.raises(RuntimeError):
        hub.wait("inv_1", 1.0, failing)
    assert hub.waiting() == 0


def test_many_waiters_of_one_invocation_all_wake() -> None:
    cache = ListeningCache()
    hub = WaitHub(lambda: cache)
    record = Record()
    results: list[State] = []

    def waiter() -> None:
        results.append(hub.wait("inv_1", 5.0, record.load).status)

    threads = [threading.Thread(target=waiter) for _ in range(5)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 2
    while hub.waiting() < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    record.finish()
    cache.put("inv_1", record.invocation.to_doc(), 60)
    for thread in threads:
        thread.join(2)
    assert results == [State.SUCCEEDED] * 5
    assert hub.waiting() == 0


def test_gunicorn_runs_gthread_workers_from_the_settings(tmp_path: Any) -> None:
    settings = Settings(
        data_dir=str(tmp_path), host="0.0.0.0", port=9100, gateway_workers=3
    )
    options = gunicorn_options(settings)
    assert options["worker_class"] == "gthread"
    assert options["workers"] == 3
    assert options["threads"] == settings.gateway_threads
    assert options["bind"] == ["0.0.0.0:9100"]
    assert options["graceful_timeout"] > settings.max_wait_s
    assert options["control_socket_disable"] is True

    assert gunicorn_options(Settings(host="::1"))["bind"] == ["[::1]:8000"]

    server = GatewayServer(settings)
    assert server.cfg.worker_class_str == "gthread"
    assert server.cfg.threads == settings.gateway_threads
    app = server.load()
    assert app.extensions["conveyor"].settings is settings
    # Nothing is opened before a worker serves its first request.
    assert list(tmp_path.iterdir()) == []
