"""One contract for every result cache: the in-memory twin and Redis."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor_core.cache import Cache
from conveyor_core.caches.memory import MemoryCache
from conveyor_core.errors import CacheUnavailable
from conveyor_core.names import RESULT_KEY_PREFIX

NOTIFY_WITHIN_S = 5.0

NESTED_DOC: dict[str, Any] = {
    "id": "inv_nested",
    "status": "succeeded",
    "result": {"words": {"ünïcode": 2, "plain": 1}, "list": [1, 2.5, None, True]},
    "error": None,
    "attempt_log": [{"number": 1, "worker": "w-1", "status": "succeeded"}],
    "duration_ms": 12.5,
}


class Backend:
    """Opens caches of one kind for a test and removes what the test left."""

    def __init__(self, kind: str, url: str = "") -> None:
        self.kind = kind
        self.url = url
        self.opened: list[Cache] = []
        self.ids: list[str] = []

    def open(self) -> Cache:
        if self.kind == "memory":
            cache: Cache = MemoryCache()
        else:
            from conveyor_core.caches.redis import RedisCache

            cache = RedisCache(self.url)
        self.opened.append(cache)
        return cache

    def peer(self, cache: Cache) -> Cache:
        """A cache whose puts reach ``cache``'s subscribers."""
        # Redis must deliver across connections; memory only within itself.
        return self.open() if cache.shared else cache

    def new_id(self) -> str:
        invocation_id = f"test-cache-{uuid.uuid4().hex}"
        self.ids.append(invocation_id)
        return invocation_id

    def cleanup(self) -> None:
        for cache in self.opened:
            cache.close()
        if self.kind == "redis" and self.ids:
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                client.delete(*(RESULT_KEY_PREFIX + i for i in self.ids))
            finally:
                client.close()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    made = Backend(request.param, url)
    yield made
    made.cleanup()


@pytest.fixture
def redis_backend(redis_url: str) -> Iterator[Backend]:
    made = Backend("redis", redis_url)
    yield made
    made.cleanup()


def wait_for(condition: Callable[[], bool], timeout_s: float = NOTIFY_WITHIN_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class Collector:
    """A subscriber callback that remembers the ids it was called with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []

    def __call__(self, invocation_id: str) -> None:
        with self.lock:
            self.ids.append(invocation_id)

    def has(self, *ids: str) -> bool:
        with self.lock:
            return set(ids) <= set(self.ids)


# The contract.


def test_put_then_get_returns_an_equal_nested_document(backend: Backend) -> None:
    cache = backend.open()
    invocation_id = backend.new_id()
    doc = {**NESTED_DOC, "id": invocation_id}

    cache.put(invocation_id, doc, ttl_s=60)
    got = cache.get(invocation_id)

    assert got == doc
    got["result"]["words"]["plain"] = 99
    doc["status"] = "failed"
    assert cache.get(invocation_id) == {**NESTED_DOC, "id": invocation_id}


def test_a_missing_id_gives_none(backend: Backend) -> None:
    assert backend.open().get(backend.new_id()) is None


def test_a_second_put_replaces_the_first(backend: Backend) -> None:
    cache = backend.open()
    invocation_id = backend.new_id()

    cache.put(invocation_id, {"attempt": 1}, ttl_s=60)
    cache.put(invocation_id, {"attempt": 2}, ttl_s=60)

    assert cache.get(invocation_id) == {"attempt": 2}


def test_an_entry_expires_after_its_ttl(backend: Backend) -> None:
    cache = backend.open()
    short, long = backend.new_id(), backend.new_id()

    cache.put(short, {"n": 1}, ttl_s=1)
    cache.put(long, {"n": 2}, ttl_s=60)
    assert cache.get(short) == {"n": 1}

    assert wait_for(lambda: cache.get(short) is None, timeout_s=3.0)
    assert cache.get(long) == {"n": 2}


def test_a_ttl_under_one_second_is_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        backend.open().put(backend.new_id(), {}, ttl_s=0)


def test_ping_answers(backend: Backend) -> None:
    backend.open().ping()


def test_a_subscriber_receives_the_ids_of_puts(backend: Backend) -> None:
    cache = backend.open()
    received = Collector()
    cache.subscribe(received)
    assert cache.listening  # type: ignore[attr-defined]

    putter = backend.peer(cache)
    ids = [backend.new_id() for _ in range(3)]
    for invocation_id in ids:
        putter.put(invocation_id, {"id": invocation_id}, ttl_s=60)

    assert wait_for(lambda: received.has(*ids))
    assert received.ids == ids


def test_put_many_caches_each_and_announces_each_id(backend: Backend) -> None:
    cache = backend.open()
    received = Collector()
    cache.subscribe(received)

    ids = [backend.new_id() for _ in range(5)]
    backend.peer(cache).put_many(
        [
            (invocation_id, {"id": invocation_id, "n": n})
            for n, invocation_id in enumerate(ids)
        ],
        ttl_s=60,
    )

    assert wait_for(lambda: received.has(*ids))
    assert received.ids == ids
    assert [cache.get(i) for i in ids] == [{"id": i, "n": n} for n, i in enumerate(ids)]
    cache.put_many([], ttl_s=60)


def test_every_callback_receives_each_id(backend: Backend) -> None:
    cache = backend.open()
    callbacks = [Collector() for _ in range(3)]
    for callback in callbacks:
        cache.subscribe(callback)

    invocation_id = backend.new_id()
    backend.peer(cache).put(invocation_id, {}, ttl_s=60)

    assert wait_for(lambda: all(c.has(invocation_id) for c in callbacks))
    assert [c.ids for c in callbacks] == [[invocation_id]] * 3


def test_a_failing_callback_spoils_neither_the_put_nor_the_others(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    cache = backend.open()

    def broken(invocation_id: str) -> None:
        raise RuntimeError("a waiter's bug")

    received = Collector()
    cache.subscribe(broken)
    cache.subscribe(received)

    first, second = backend.new_id(), backend.new_id()
    putter = backend.peer(cache)
    putter.put(first, {}, ttl_s=60)
    putter.put(second, {}, ttl_s=60)

    assert wait_for(lambda: received.has(first, second))
    assert putter.get(second) == {}
    failures = [
        r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError
    ]
    assert [r.invocation_id for r in failures] == [first, second]  # type: ignore[attr-defined]


def test_close_stops_the_listener(backend: Backend) -> None:
    before = set(threading.enumerate())
    cache = backend.open()
    received = Collector()
    cache.subscribe(received)
    putter = backend.peer(cache)

    cache.close()

    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=3.0)
        assert not thread.is_alive(), thread.name
    assert not cache.listening  # type: ignore[attr-defined]
    if putter is not cache:
        putter.put(backend.new_id(), {}, ttl_s=60)
        time.sleep(0.2)
    assert received.ids == []


def test_many_threads_can_put_at_once(backend: Backend) -> None:
    cache = backend.open()
    received = Collector()
    cache.subscribe(received)
    putter = backend.peer(cache)
    ids = [backend.new_id() for _ in range(8 * 40)]
    errors: list[BaseException] = []

    def put_share(share: list[str]) -> None:
        try:
            for invocation_id in share:
                putter.put(invocation_id, {"id": invocation_id}, ttl_s=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=put_share, args=(ids[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert wait_for(lambda: received.has(*ids))
    assert len(received.ids) == len(ids)
    assert all(cache.get(i) == {"id": i} for i in ids)


# The in-memory twin's own limits.


def test_memory_cache_evicts_the_oldest_entries_beyond_its_bound() -> None:
    cache = MemoryCache(max_entries=3)
    for n in range(5):
        cache.put(f"inv-{n}", {"n": n}, ttl_s=60)

    assert [cache.get(f"inv-{n}") for n in range(5)] == [
        None,
        None,
        {"n": 2},
        {"n": 3},
        {"n": 4},
    ]


def test_memory_cache_counts_a_replaced_entry_as_new() -> None:
    cache = MemoryCache(max_entries=2)
    cache.put("a", {}, ttl_s=60)
    cache.put("b", {}, ttl_s=60)
    cache.put("a", {"again": True}, ttl_s=60)
    cache.put("c", {}, ttl_s=60)

    assert cache.get("b") is None
    assert cache.get("a") == {"again": True}


# Redis when things go wrong.


def test_an_unreachable_redis_raises_cache_unavailable_quickly() -> None:
    from conveyor_core.caches.redis import RedisCache

    cache = RedisCache("redis://127.0.0.1:1/0")
    try:
        for operation in (
            cache.ping,
            lambda: cache.get("inv-x"),
            lambda: cache.put("inv-x", {}, ttl_s=60),
        ):
            started = time.monotonic()
            with pytest.raises(CacheUnavailable, match="127.0.0.1:1"):
                operation()
            assert time.monotonic() - started < 1.0

        started = time.monotonic()
        cache.subscribe(Collector())
        assert time.monotonic() - started < 1.0
        assert not cache.listening
    finally:
        cache.close()


def test_integers_beyond_64_bits_round_trip_exactly(backend: Backend) -> None:
    cache = backend.open()
    invocation_id = backend.new_id()
    cache.put(invocation_id, {"result": 2**70 + 1}, ttl_s=60)
    assert cache.get(invocation_id) == {"result": 2**70 + 1}


def test_a_document_that_is_not_json_is_announced_but_not_cached(
    redis_backend: Backend,
) -> None:
    cache = redis_backend.open()
    received = Collector()
    cache.subscribe(received)
    invocation_id = redis_backend.new_id()
    cache.put(invocation_id, {"result": 1}, ttl_s=60)

    cache.put(invocation_id, {"result": object()}, ttl_s=60)

    assert cache.get(invocation_id) is None
    assert wait_for(lambda: received.ids == [invocation_id, invocation_id])


def test_the_listener_resubscribes_after_its_connection_is_killed(
    redis_backend: Backend,
) -> None:
    import redis

    from conveyor_core.caches.redis import RedisCache

    # A name of its own, so that only this test's listener is killed on a
    # server that others may be using.
    name = f"test-cache-{uuid.uuid4().hex[:12]}"
    cache = RedisCache(f"{redis_backend.url}?client_name={name}")
    redis_backend.opened.append(cache)
    received = Collector()
    cache.subscribe(received)
    putter = redis_backend.open()
    admin = redis.Redis.from_url(redis_backend.url)
    try:
        killed = _kill_pubsub_clients(admin, name)
        assert len(killed) == 1
        assert wait_for(lambda: bool(_pubsub_client_ids(admin, name) - killed))

        def put_and_hear_back() -> bool:
            probe = redis_backend.new_id()
            putter.put(probe, {}, ttl_s=60)
            return wait_for(lambda: received.has(probe), timeout_s=0.2)

        assert wait_for(put_and_hear_back)
        assert cache.listening
    finally:
        admin.close()


def _pubsub_client_ids(admin: Any, name: str) -> set[str]:
    clients = admin.client_list(_type="pubsub")
    return {str(client["id"]) for client in clients if client.get("name") == name}


def _kill_pubsub_clients(admin: Any, name: str) -> set[str]:
    ids = _pubsub_client_ids(admin, name)
    for client_id in ids:
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID", client_id)
    return ids


class Proxy:
    """A TCP relay to Redis that a test can cut and restore, like an outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.server: socket.socket | None = None

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self.port = server.getsockname()[1]
        self.server = server
        self._spawn(self._accept, server)

    def stop(self) -> None:
        # The listening socket goes first, or a client could reconnect
        # through it while its old connections are being cut.
        with self.lock:
            doomed, self.sockets = self.sockets, []
            if self.server is not None:
                doomed.insert(0, self.server)
                self.server = None
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(timeout=2.0)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                return
            upstream.settimeout(None)
            with self.lock:
                cut = self.server is not server
                if not cut:
                    self.sockets += [client, upstream]
            if cut:
                client.close()
                upstream.close()
                return
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            return
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Proxy]:
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    relay = Proxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    relay.start()
    yield relay
    relay.stop()


def test_the_listener_survives_an_outage_and_warns_once(
    redis_backend: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    from conveyor_core.caches.redis import RedisCache

    db = redis_backend.url.rsplit("/", 1)[-1]
    cache = RedisCache(f"redis://127.0.0.1:{proxy.port}/{db}")
    redis_backend.opened.append(cache)
    received = Collector()
    cache.subscribe(received)
    direct = redis_backend.open()
    assert cache.listening

    caplog.set_level(logging.INFO, logger="conveyor_core.caches.redis")
    proxy.stop()
    assert wait_for(lambda: not cache.listening)
    with pytest.raises(CacheUnavailable):
        cache.get(redis_backend.new_id())
    missed = redis_backend.new_id()
    direct.put(missed, {}, ttl_s=60)
    time.sleep(1.0)  # long enough for several reconnection attempts

    proxy.start()
    assert wait_for(lambda: cache.listening, timeout_s=10.0)
    invocation_id = redis_backend.new_id()
    direct.put(invocation_id, {}, ttl_s=60)
    assert wait_for(lambda: received.has(invocation_id))

    assert received.ids == [invocation_id]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "lost cache notifications" in warnings[0].getMessage()
    assert any("are back after" in r.getMessage() for r in caplog.records)
