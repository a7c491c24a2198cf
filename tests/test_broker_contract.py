"""One contract for every broker backend: RabbitMQ and the embedded SQLite twin.

Each test runs once per backend. RabbitMQ tests use a queue of their own and
delete it afterwards; SQLite tests use a file in the test's temporary folder.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conveyor_core.broker import Broker, Delivery
from conveyor_core.errors import BrokerUnavailable
from conveyor_core.names import INVOCATIONS_QUEUE
from tests.harness import delete_rabbitmq_queues

REPO_ROOT = Path(__file__).resolve().parent.parent

# Short enough that a killed SQLite consumer's messages come back quickly,
# long enough that a busy test machine does not miss a heartbeat.
SQLITE_LEASE_TIMEOUT_S = 2.0

# What one quiet interval means: no delivery arrives within it.
QUIET_S = 0.4

CONSUMER_SCRIPT = """
import sys, threading
kind, target, queue = sys.argv[1:4]
if kind == "rabbitmq":
    from conveyor_core.brokers.rabbitmq import RabbitMQBroker
    broker = RabbitMQBroker(target, queue=queue)
else:
    from conveyor_core.brokers.sqlite import SQLiteBroker
    broker = SQLiteBroker(target, queue=queue, lease_timeout_s=float(sys.argv[4]))

def hold(delivery):
    print("holding", delivery.body.decode(), flush=True)

broker.consume(hold, hold, 1, threading.Event())
"""


@dataclass
class Backend:
    """How a test opens brokers of one kind on one shared queue."""

    name: str
    queue: str
    open: Callable[..., Broker]
    consumer_argv: list[str]
    unreachable: Callable[[], Broker]
    opened: list[Broker] = field(default_factory=list)

    def broker(self, delivery_limit: int = 5) -> Broker:
        broker = self.open(delivery_limit)
        self.opened.append(broker)
        return broker


def _rabbitmq_backend(url: str) -> Backend:
    from conveyor_core.brokers.rabbitmq import RabbitMQBroker

    name = f"conveyor.test.{uuid.uuid4().hex[:12]}"
    return Backend(
        name="rabbitmq",
        queue=name,
        open=lambda limit: RabbitMQBroker(url, limit, queue=name),
        consumer_argv=["rabbitmq", url, name],
        unreachable=lambda: RabbitMQBroker(
            "amqp://guest:guest@127.0.0.1:1/%2F?connection_attempts=1",
            queue=name,
            publish_timeout_s=1.0,
        ),
    )


def _sqlite_backend(folder: Path) -> Backend:
    from conveyor_core.brokers.sqlite import SQLiteBroker

    path = str(folder / "broker.sqlite3")
    lease_s = SQLITE_LEASE_TIMEOUT_S
    return Backend(
        name="sqlite",
        queue=INVOCATIONS_QUEUE,
        open=lambda limit: SQLiteBroker(path, limit, lease_timeout_s=lease_s),
        consumer_argv=["sqlite", path, INVOCATIONS_QUEUE, str(lease_s)],
        unreachable=lambda: SQLiteBroker(str(folder / "missing" / "broker.sqlite3")),
    )


@pytest.fixture(params=["rabbitmq", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = ""
    if request.param == "rabbitmq":
        url = request.getfixturevalue("rabbitmq_url")
        chosen = _rabbitmq_backend(url)
    else:
        chosen = _sqlite_backend(tmp_path)
    try:
        yield chosen
    finally:
        for broker in chosen.opened:
            broker.close()
        if url:
            delete_rabbitmq_queues(url, chosen.queue)


class Consumer:
    """Runs ``broker.consume`` on a thread and collects what it hands out."""

    def __init__(self, broker: Broker, prefetch: int = 50) -> None:
        self.messages: queue.Queue[Delivery] = queue.Queue()
        self.dead_letters: queue.Queue[Delivery] = queue.Queue()
        self.stop = threading.Event()
        self._thread = threading.Thread(
            target=broker.consume,
            args=(self.messages.put, self.dead_letters.put, prefetch, self.stop),
            daemon=True,
        )

    def __enter__(self) -> Consumer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "consume() did not return after stop"

    def take(self, count: int, timeout_s: float = 10.0) -> list[Delivery]:
        return _take(self.messages, count, timeout_s)

    def take_dead(self, count: int, timeout_s: float = 10.0) -> list[Delivery]:
        return _take(self.dead_letters, count, timeout_s)

    def assert_quiet(self, wait_s: float = QUIET_S) -> None:
        time.sleep(wait_s)
        assert self.messages.empty(), "an unexpected message arrived"
        assert self.dead_letters.empty(), "an unexpected dead letter arrived"


def _take(
    source: queue.Queue[Delivery], count: int, timeout_s: float
) -> list[Delivery]:
    deadline_s = time.monotonic() + timeout_s
    taken = []
    for _ in range(count):
        remaining_s = deadline_s - time.monotonic()
        try:
            taken.append(source.get(timeout=max(remaining_s, 0.001)))
        except queue.Empty:
            pytest.fail(f"only {len(taken)} of {count} deliveries arrived in time")
    return taken


def assert_empty(broker: Broker) -> None:
    """A fresh consumer finds nothing, in the queue or among the dead letters."""
    with Consumer(broker) as consumer:
        consumer.assert_quiet()


def test_publish_then_consume_delivers_every_body_once(backend: Backend) -> None:
    broker = backend.broker()
    bodies = [f"message-{n}".encode() for n in range(30)]
    broker.publish(bodies[:1])
    broker.publish(bodies[1:10])
    broker.publish(bodies[10:])

    with Consumer(broker) as consumer:
        deliveries = consumer.take(len(bodies))
        for delivery in deliveries:
            delivery.ack()
        consumer.assert_quiet()

    assert sorted(d.body for d in deliveries) == sorted(bodies)
    assert not any(d.redelivered for d in deliveries)
    assert {d.deliveries for d in deliveries} == {1}


def test_ack_settles_the_message_for_good(backend: Backend) -> None:
    broker = backend.broker()
    broker.publish([b"one", b"two", b"three"])
    with Consumer(broker) as consumer:
        for delivery in consumer.take(3):
            delivery.ack()

    assert_empty(backend.broker())


def test_unsettled_messages_return_after_consume_stops(backend: Backend) -> None:
    broker = backend.broker()
    broker.publish([b"first", b"second"])
    with Consumer(broker) as consumer:
        held = consumer.take(2)

    # The consumer has stopped: these settles come too late and must be
    # dropped quietly rather than raise or settle the redelivered copies.
    for delivery in held:
        delivery.ack()

    with Consumer(backend.broker()) as consumer:
        again = consumer.take(2)
        for delivery in again:
            delivery.ack()

    assert sorted(d.body for d in again) == [b"first", b"second"]
    assert all(d.redelivered for d in again)
    assert [d.deliveries for d in again] == [2, 2]
    assert_empty(backend.broker())


def test_acks_out_of_order_settle_only_their_own_messages(backend: Backend) -> None:
    broker = backend.broker()
    bodies = [f"m{n}".encode() for n in range(6)]
    broker.publish(bodies)
    with Consumer(broker) as consumer:
        deliveries = consumer.take(6)
        by_body = {d.body: d for d in deliveries}
        # The first stays unsettled while later ones are acked out of order
        # and one is handed back; no ack may take the held one along.
        for body in (b"m5", b"m1", b"m2", b"m4"):
            by_body[body].ack()
        by_body[b"m3"].reject(True)
        (requeued,) = consumer.take(1)
        requeued.ack()
        consumer.assert_quiet()

    with Consumer(backend.broker()) as consumer:
        again = consumer.take(1)
        for delivery in again:
            delivery.ack()
        consumer.assert_quiet()

    assert requeued.body == b"m3"
    assert [d.body for d in again] == [b"m0"]
    assert_empty(backend.broker())


def test_reject_with_requeue_redelivers(backend: Backend) -> None:
    broker = backend.broker()
    broker.publish([b"retry me"])
    with Consumer(broker) as consumer:
        (first,) = consumer.take(1)
        assert not first.redelivered
        first.reject(True)

        (second,) = consumer.take(1)
        second.ack()
        consumer.assert_quiet()

    assert second.body == b"retry me"
    assert second.redelivered
    assert second.deliveries == 2


def test_reject_without_requeue_reaches_the_dead_letters(backend: Backend) -> None:
    broker = backend.broker()
    broker.publish([b"poison", b"fine"])
    with Consumer(broker) as consumer:
        for delivery in consumer.take(2):
            if delivery.body == b"poison":
                delivery.reject(False)
            else:
                delivery.ack()

        (dead,) = consumer.take_dead(1)
        assert dead.body == b"poison"
        dead.ack()
        consumer.assert_quiet()

    assert_empty(backend.broker())


def test_a_message_over_the_delivery_limit_is_dead_lettered(backend: Backend) -> None:
    limit = 2
    broker = backend.broker(delivery_limit=limit)
    broker.publish([b"crashes its worker"])

    counts = []
    with Consumer(broker) as consumer:
        # Delivered once, then redelivered up to the limit, as quorum queues do.
        for _ in range(limit + 1):
            (delivery,) = consumer.take(1)
            counts.append(delivery.deliveries)
            delivery.reject(True)

        (dead,) = consumer.take_dead(1)
        dead.ack()
        consumer.assert_quiet()

    assert counts == [1, 2, 3]
    assert dead.body == b"crashes its worker"
    assert_empty(backend.broker(delivery_limit=limit))


def test_prefetch_bounds_unsettled_deliveries(backend: Backend) -> None:
    broker = backend.broker()
    broker.publish([f"job-{n}".encode() for n in range(6)])

    with Consumer(broker, prefetch=3) as consumer:
        first_three = consumer.take(3)
        consumer.assert_quiet()

        # Settling one makes room for exactly one more.
        first_three[0].ack()
        fourth = consumer.take(1)
        consumer.assert_quiet()

        for delivery in first_three[1:] + fourth:
            delivery.ack()
        for delivery in consumer.take(2):
            delivery.ack()
        consumer.assert_quiet()


def test_ack_from_another_thread_settles(backend: Backend) -> None:
    broker = backend.broker()
    bodies = [f"threaded-{n}".encode() for n in range(10)]
    broker.publish(bodies)

    with Consumer(broker) as consumer:
        deliveries = consumer.take(len(bodies))
        workers = [threading.Thread(target=d.ack) for d in deliveries]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(5)
        consumer.assert_quiet()

    assert sorted(d.body for d in deliveries) == sorted(bodies)
    assert_empty(backend.broker())


def test_concurrent_publishers_lose_nothing(backend: Backend) -> None:
    broker = backend.broker()
    errors: list[BaseException] = []

    def publish_many(thread: int) -> None:
        try:
            for n in range(40):
                broker.publish([f"{thread}-{n}".encode()])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors

    expected = sorted(f"{t}-{n}".encode() for t in range(8) for n in range(40))
    with Consumer(broker, prefetch=100) as consumer:
        deliveries = []
        for _ in expected:
            (delivery,) = consumer.take(1)
            delivery.ack()
            deliveries.append(delivery)
        consumer.assert_quiet()
    assert sorted(d.body for d in deliveries) == expected


def test_a_killed_consumer_s_message_is_redelivered(backend: Backend) -> None:
    broker = backend.broker()
    broker.publish([b"in flight"])

    process = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_SCRIPT, *backend.consumer_argv],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
        },
    )
    stdout = process.stdout
    assert stdout is not None
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(stdout.readline()), daemon=True
        ).start()
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            pytest.fail("the consumer process received nothing within 30 s")
        assert line.strip() == "holding in flight"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        stdout.close()

    with Consumer(backend.broker()) as consumer:
        (delivery,) = consumer.take(1, timeout_s=20)
        delivery.ack()
        consumer.assert_quiet()

    assert delivery.body == b"in flight"
    assert delivery.redelivered
    assert delivery.deliveries == 2


def test_published_messages_survive_a_new_connection(backend: Backend) -> None:
    first = backend.broker()
    first.ping()
    first.publish([b"durable"])
    first.close()

    # RabbitMQ: new connections; SQLite: the file opened afresh.
    second = backend.broker()
    second.ping()
    with Consumer(second) as consumer:
        (delivery,) = consumer.take(1)
        delivery.ack()
    assert delivery.body == b"durable"
    assert not delivery.redelivered


def test_an_unreachable_broker_raises_broker_unavailable(backend: Backend) -> None:
    broker = backend.unreachable()
    backend.opened.append(broker)

    started_s = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        broker.publish([b"lost?"])
    with pytest.raises(BrokerUnavailable):
        broker.ping()
    assert time.monotonic() - started_s < 3.0
