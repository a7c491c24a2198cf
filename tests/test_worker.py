"""The worker's delivery semantics, on the SQLite store and the memory cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor_core.broker import Delivery
from conveyor_core.brokers.sqlite import SQLiteBroker
from conveyor_core.caches.memory import MemoryCache
from conveyor_core.errors import ExecutorError, StoreUnavailable
from conveyor_core.messages import InvocationMessage, encode_bundle
from conveyor_core.records import FunctionVersion, Invocation, Outcome, State, new_id
from conveyor_core.settings import Settings
from conveyor_core.stores.sqlite import SQLiteStore
from runtime import worker as worker_module
from runtime.executor import Executor
from runtime.worker import Worker


class ScriptedExecutor(Executor):
    """Returns a fixed outcome (or raises) and counts its runs."""

    def __init__(self, outcome: Outcome | Exception) -> None:
        self.outcome = outcome
        self.runs: list[tuple[str, bytes]] = []

    def run(
        self, function: FunctionVersion, payload: bytes, invocation_id: str
    ) -> Outcome:
        self.runs.append((invocation_id, payload))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def close(self) -> None:
        pass


class RecordedDelivery:
    """A delivery that remembers how it was settled."""

    def __init__(self, body: bytes, redelivered: bool = False) -> None:
        self.settled: list[Any] = []
        self.delivery = Delivery(
            body=body,
            redelivered=redelivered,
            ack=lambda: self.settled.append("ack"),
            reject=lambda requeue: self.settled.append(("reject", requeue)),
            deliveries=6,
        )


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "PLATFORM_FAULT_BACKOFF_S", 0.0)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "store.sqlite3"))


def _function(store: SQLiteStore) -> FunctionVersion:
    return store.add_function_version(
        FunctionVersion(
            tenant="acme",
            name="double",
            version=0,
            source="def double(x):\n    return 2 * x\n",
            entrypoint="double",
            timeout_s=5.0,
            memory_mb=128,
            env={},
            created_at=time.time(),
        )
    )


def _queued(store: SQLiteStore, function: FunctionVersion) -> tuple[Invocation, bytes]:
    invocation = Invocation(
        id=new_id("inv_"),
        tenant="acme",
        function=function.name,
        version=function.version,
    )
    store.add_invocations([invocation])
    message = InvocationMessage(
        invocation.id, "acme", function.name, function.version, b'{"args":[21]}'
    )
    return invocation, message.encode()


def _worker(store: SQLiteStore, executor: Executor, cache: MemoryCache) -> Worker:
    return Worker(Settings(), store, broker=None, cache=cache, executor=executor)  # type: ignore[arg-type]


def test_success_is_recorded_cached_notified_then_acked(store: SQLiteStore) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    executor = ScriptedExecutor(
        Outcome(State.SUCCEEDED, result=42, logs="hi\n", duration_ms=1.5)
    )
    cache = MemoryCache()
    notified: list[str] = []
    cache.subscribe(notified.append)
    delivery = RecordedDelivery(body)

    _worker(store, executor, cache).handle(delivery.delivery)

    assert delivery.settled == ["ack"]
    assert executor.runs == [(invocation.id, b'{"args":[21]}')]
    record = store.get_invocation(invocation.id, "acme")
    assert record.status is State.SUCCEEDED
    assert record.result == 42
    assert record.logs == "hi\n"
    assert record.attempts == 1
    assert record.attempt_log[0].status == "succeeded"
    assert notified == [invocation.id]
    assert cache.get(invocation.id)["result"] == 42


def test_redelivered_finished_invocation_is_acked_without_running(
    store: SQLiteStore,
) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    executor = ScriptedExecutor(Outcome(State.SUCCEEDED, result=1))
    worker = _worker(store, executor, MemoryCache())
    worker.handle(RecordedDelivery(body).delivery)

    again = RecordedDelivery(body, redelivered=True)
    worker.handle(again.delivery)

    assert again.settled == ["ack"]
    assert len(executor.runs) == 1
    assert store.get_invocation(invocation.id, "acme").attempts == 1


def test_attempt_left_running_by_a_dead_worker_runs_again(store: SQLiteStore) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    store.start_attempt(invocation.id, "dead-worker:1", time.time())

    delivery = RecordedDelivery(body, redelivered=True)
    executor = ScriptedExecutor(Outcome(State.SUCCEEDED, result=42))
    _worker(store, executor, MemoryCache()).handle(delivery.delivery)

    record = store.get_invocation(invocation.id, "acme")
    assert delivery.settled == ["ack"]
    assert record.status is State.SUCCEEDED
    assert record.attempts == 2
    assert [a.worker for a in record.attempt_log][0] == "dead-worker:1"


def test_cancelled_invocation_is_not_run(store: SQLiteStore) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    store.cancel_invocation("acme", invocation.id, time.time())
    executor = ScriptedExecutor(Outcome(State.SUCCEEDED))
    delivery = RecordedDelivery(body)

    _worker(store, executor, MemoryCache()).handle(delivery.delivery)

    assert delivery.settled == ["ack"]
    assert executor.runs == []
    assert store.get_invocation(invocation.id, "acme").status is State.CANCELLED


def test_function_failure_is_an_outcome_and_acked(store: SQLiteStore) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    error = {"type": "ValueError", "message": "bad", "traceback": "..."}
    delivery = RecordedDelivery(body)
    executor = ScriptedExecutor(Outcome(State.FAILED, error=error))

    _worker(store, executor, MemoryCache()).handle(delivery.delivery)

    assert delivery.settled == ["ack"]
    record = store.get_invocation(invocation.id, "acme")
    assert record.status is State.FAILED
    assert record.error == error


def test_deleted_function_fails_the_invocation(store: SQLiteStore) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    store.delete_function("acme", function.name)
    delivery = RecordedDelivery(body)

    _worker(store, ScriptedExecutor(Outcome(State.SUCCEEDED)), MemoryCache()).handle(
        delivery.delivery
    )

    assert delivery.settled == ["ack"]
    record = store.get_invocation(invocation.id, "acme")
    assert record.status is State.FAILED
    assert record.error["type"] == "function_not_found"


class UnreachableStore(SQLiteStore):
    """A store whose writes fail as if its server were down."""

    def start_attempts(self, *args: Any) -> list[Invocation | None]:
        raise StoreUnavailable("connection refused")


class StoreLostMidway(SQLiteStore):
    """A store that goes down while the invocation runs."""

    def finish_attempts(self, *args: Any) -> list[Invocation | None]:
        raise StoreUnavailable("connection reset")


def test_store_outage_hands_the_message_back(tmp_path: Path) -> None:
    store = UnreachableStore(str(tmp_path / "store.sqlite3"))
    function = _function(store)
    _, body = _queued(store, function)
    executor = ScriptedExecutor(Outcome(State.SUCCEEDED))
    delivery = RecordedDelivery(body)

    _worker(store, executor, MemoryCache()).handle(delivery.delivery)

    assert delivery.settled == [("reject", True)]
    assert executor.runs == []


def test_store_lost_before_the_outcome_hands_the_message_back(
    tmp_path: Path,
) -> None:
    store = StoreLostMidway(str(tmp_path / "store.sqlite3"))
    function = _function(store)
    invocation, body = _queued(store, function)
    delivery = RecordedDelivery(body)

    worker = _worker(store, ScriptedExecutor(Outcome(State.SUCCEEDED)), MemoryCache())
    worker.handle(delivery.delivery)

    assert delivery.settled == [("reject", True)]
    assert store.get_invocation(invocation.id, "acme").status is State.RUNNING


def test_executor_fault_hands_the_message_back(store: SQLiteStore) -> None:
    function = _function(store)
    _, body = _queued(store, function)
    delivery = RecordedDelivery(body)

    worker = _worker(store, ScriptedExecutor(ExecutorError("no fork")), MemoryCache())
    worker.handle(delivery.delivery)

    assert delivery.settled == [("reject", True)]


def _bundle(
    store: SQLiteStore, function: FunctionVersion, count: int
) -> tuple[list[Invocation], bytes]:
    invocations = [
        Invocation(id=new_id("inv_"), tenant="acme", function=function.name, version=1)
        for _ in range(count)
    ]
    store.add_invocations(invocations)
    body = encode_bundle(
        [
            InvocationMessage(i.id, "acme", function.name, 1, b'{"args":[%d]}' % n)
            for n, i in enumerate(invocations)
        ]
    )
    return invocations, body


def test_a_bundle_runs_what_is_not_settled_and_acks_once(store: SQLiteStore) -> None:
    function = _function(store)
    invocations, body = _bundle(store, function, 4)
    done = invocations[1]
    store.start_attempt(done.id, "earlier:1", time.time())
    store.finish_attempt(
        done.id, 1, Outcome(State.SUCCEEDED, result="old"), time.time()
    )
    executor = ScriptedExecutor(Outcome(State.SUCCEEDED, result="new"))
    cache = MemoryCache()
    delivery = RecordedDelivery(body)

    worker = _worker(store, executor, cache)
    worker.handle(delivery.delivery)
    worker._pool.shutdown(wait=True)

    assert delivery.settled == ["ack"]
    ran = sorted(invocation_id for invocation_id, _ in executor.runs)
    assert ran == sorted(i.id for i in invocations if i is not done)
    for invocation in invocations:
        record = store.get_invocation(invocation.id, "acme")
        assert record.status is State.SUCCEEDED
        assert record.result == ("old" if invocation is done else "new")
        assert record.attempts == 1
        if invocation is not done:
            assert cache.get(invocation.id)["result"] == "new"


def test_a_fault_in_one_invocation_hands_the_bundle_back(store: SQLiteStore) -> None:
    function = _function(store)
    invocations, body = _bundle(store, function, 3)
    faulty = invocations[2].id

    class FlakyExecutor(ScriptedExecutor):
        def run(
            self, function: FunctionVersion, payload: bytes, invocation_id: str
        ) -> Outcome:
            if invocation_id == faulty:
                raise ExecutorError("no fork")
            return Outcome(State.SUCCEEDED, result=1)

    delivery = RecordedDelivery(body)
    worker = _worker(store, FlakyExecutor(Outcome(State.SUCCEEDED)), MemoryCache())
    worker.handle(delivery.delivery)
    worker._pool.shutdown(wait=True)

    assert delivery.settled == [("reject", True)]
    states = [store.get_invocation(i.id, "acme").status for i in invocations]
    assert states == [State.SUCCEEDED, State.SUCCEEDED, State.RUNNING]

    # Handed out again, only the unfinished one runs, as its second attempt.
    again = RecordedDelivery(body, redelivered=True)
    executor = ScriptedExecutor(Outcome(State.SUCCEEDED, result=2))
    _worker(store, executor, MemoryCache()).handle(again.delivery)
    assert again.settled == ["ack"]
    assert [run[0] for run in executor.runs] == [faulty]
    assert store.get_invocation(faulty, "acme").attempts == 2


def test_malformed_message_goes_to_the_dead_letters(store: SQLiteStore) -> None:
    delivery = RecordedDelivery(b"{not json")
    worker = _worker(store, ScriptedExecutor(Outcome(State.SUCCEEDED)), MemoryCache())
    worker.handle(delivery.delivery)
    assert delivery.settled == [("reject", False)]


@pytest.mark.parametrize("started", [False, True])
def test_dead_letter_is_recorded_as_failed(store: SQLiteStore, started: bool) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    if started:
        store.start_attempt(invocation.id, "dead-worker:1", time.time())
    delivery = RecordedDelivery(body, redelivered=True)

    _worker(
        store, ScriptedExecutor(Outcome(State.SUCCEEDED)), MemoryCache()
    ).handle_dead_letter(delivery.delivery)

    assert delivery.settled == ["ack"]
    record = store.get_invocation(invocation.id, "acme")
    assert record.status is State.FAILED
    assert record.error["type"] == "delivery_limit"
    assert "6 times" in record.error["message"]  # the default limit of 5, plus one


def test_dead_letter_of_a_finished_invocation_changes_nothing(
    store: SQLiteStore,
) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    worker = _worker(
        store, ScriptedExecutor(Outcome(State.SUCCEEDED, result=7)), MemoryCache()
    )
    worker.handle(RecordedDelivery(body).delivery)

    delivery = RecordedDelivery(body, redelivered=True)
    worker.handle_dead_letter(delivery.delivery)

    assert delivery.settled == ["ack"]
    assert store.get_invocation(invocation.id, "acme").status is State.SUCCEEDED


def test_overtaken_attempt_does_not_overwrite_the_newer_one(store: SQLiteStore) -> None:
    function = _function(store)
    invocation, body = _queued(store, function)
    release = threading.Event()

    class SlowExecutor(ScriptedExecutor):
        def run(
            self, function: FunctionVersion, payload: bytes, invocation_id: str
        ) -> Outcome:
            # While this attempt runs, another worker takes the invocation over.
            store.start_attempt(invocation_id, "other-worker:2", time.time())
            release.set()
            return Outcome(State.SUCCEEDED, result="stale")

    delivery = RecordedDelivery(body)
    _worker(store, SlowExecutor(Outcome(State.SUCCEEDED)), MemoryCache()).handle(
        delivery.delivery
    )

    assert release.is_set()
    assert delivery.settled == ["ack"]
    record = store.get_invocation(invocation.id, "acme")
    assert record.status is State.RUNNING
    assert record.attempts == 2
    assert record.result is None


def test_a_stopping_worker_finishes_and_acks_what_runs_and_hands_back_the_rest(
    store: SQLiteStore, tmp_path: Path
) -> None:
    function = _function(store)
    running, first_body = _queued(store, function)
    waiting, second_body = _queued(store, function)
    broker = SQLiteBroker(str(tmp_path / "broker.sqlite3"))
    started = threading.Event()
    release = threading.Event()

    class HeldExecutor(ScriptedExecutor):
        def run(
            self, function: FunctionVersion, payload: bytes, invocation_id: str
        ) -> Outcome:
            self.runs.append((invocation_id, payload))
            started.set()
            assert release.wait(10)
            return Outcome(State.SUCCEEDED, result="done")

    executor = HeldExecutor(Outcome(State.SUCCEEDED))
    worker = Worker(
        Settings(concurrency=1, prefetch=1),
        store,
        broker=broker,
        cache=MemoryCache(),
        executor=executor,
    )
    stop = threading.Event()
    broker.publish([first_body])
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    assert started.wait(10)

    stop.set()
    broker.publish([second_body])
    time.sleep(0.3)
    assert thread.is_alive(), "the worker stopped before its invocation finished"
    release.set()
    thread.join(10)
    assert not thread.is_alive()

    assert [run[0] for run in executor.runs] == [running.id]
    record = store.get_invocation(running.id, "acme")
    assert record.status is State.SUCCEEDED and record.attempts == 1
    assert store.get_invocation(waiting.id, "acme").status is State.QUEUED

    # Only the message that never ran is left, and it was never started.
    taken: list[bytes] = []
    consume_stop = threading.Event()

    def take(delivery: Delivery) -> None:
        taken.append(delivery.body)
        delivery.ack()

    consumer = threading.Thread(
        target=broker.consume, args=(take, take, 4, consume_stop)
    )
    consumer.start()
    time.sleep(0.5)
    consume_stop.set()
    consumer.join(10)
    broker.close()
    assert taken == [second_body]
