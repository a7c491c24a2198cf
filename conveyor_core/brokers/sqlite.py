"""The embedded broker: a durable queue in one SQLite file.

A publisher process and a consumer process may share the file. Each consumer
registers a row with a heartbeat it refreshes; it claims messages in batches,
and a message claimed by a consumer whose heartbeat went stale is released
for redelivery. Counting follows RabbitMQ's quorum queues, so the two
backends dead-letter a message after the same number of deliveries.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from conveyor_core.broker import Broker, Delivery, DeliveryHandler
from conveyor_core.errors import BrokerUnavailable, ConfigurationError
from conveyor_core.names import INVOCATIONS_QUEUE

logger = logging.getLogger(__name__)

MESSAGES = "broker_messages"
DEAD_LETTERS = "broker_dead_letters"
CONSUMERS = "broker_consumers"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {MESSAGES} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    consumer TEXT
);
CREATE INDEX IF NOT EXISTS {MESSAGES}_by_state ON {MESSAGES} (queue, consumer, id);
CREATE TABLE IF NOT EXISTS {DEAD_LETTERS} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    consumer TEXT,
    reason TEXT NOT NULL,
    source_deliveries INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS {DEAD_LETTERS}_by_state
    ON {DEAD_LETTERS} (queue, consumer, id);
CREATE TABLE IF NOT EXISTS {CONSUMERS} (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
"""

_BUSY_TIMEOUT_S = 5.0

# Between polls the consumer waits a tenth of the time since it last saw a
# message or a settle, within these bounds: a busy queue is polled every
# millisecond, an idle one fifty times a second.
_POLL_MIN_S = 0.001
_POLL_MAX_S = 0.02
_POLL_IDLE_FRACTION = 0.1

_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0

# Mirrors the RabbitMQ backend, whose dead-letter consumer holds one message.
_DEAD_LETTER_PREFETCH = 1

REASON_REJECTED = "rejected"
REASON_DELIVERY_LIMIT = "delivery_limit"


def _check_prefetch(prefetch: int) -> None:
    if prefetch < 1:
        raise ConfigurationError(
            f"prefetch={prefetch!r} would hand out no messages; use 1 or more"
        )


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the lock up front, so it never deadlocks."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise


@dataclass
class _Batch:
    """One publish() call's rows, waiting for a commit that includes them."""

    rows: list[tuple[str, bytes]]
    done: bool = False
    error: sqlite3.Error | None = None


@dataclass
class _Claim:
    """One delivery: a row claimed by a consumer, identified by its count."""

    table: str
    id: int
    deliveries: int
    settled: bool = False


class SQLiteBroker(Broker):
    """The embedded broker: a queue in one SQLite file, durable across restart."""

    def __init__(
        self,
        path: str,
        delivery_limit: int = 5,
        *,
        queue: str = INVOCATIONS_QUEUE,
        lease_timeout_s: float = 10.0,
    ) -> None:
        if delivery_limit < 0:
            raise ConfigurationError(
                f"delivery_limit={delivery_limit!r} is negative; use 0 or more "
                "redeliveries before a message is dead-lettered"
            )
        if lease_timeout_s <= 0:
            raise ConfigurationError(
                f"lease_timeout_s={lease_timeout_s!r} must be positive; a few "
                "seconds is usual"
            )
        self.path = path
        self.queue = queue
        self.delivery_limit = delivery_limit
        self.lease_timeout_s = lease_timeout_s
        self.heartbeat_s = min(1.0, lease_timeout_s / 4)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._generation = 0
        self._schema_ready = False
        # Threads of one process take turns here rather than in SQLite's busy
        # handler, which sleeps in steps of milliseconds.
        self._write_lock = threading.Lock()
        self._waiting: list[_Batch] = []
        self._sessions: set[_Session] = set()

    def connection(self) -> sqlite3.Connection:
        """This thread's publishing connection, opened on first use."""
        cached = getattr(self._local, "cached", None)
        if cached is not None and cached[0] == self._generation:
            return cached[1]

        # A confirmed publish must survive a power cut, not just a crash.
        connection = self.open_connection(synchronous="FULL")
        with self._lock:
            self._connections.append(connection)
            self._local.cached = (self._generation, connection)
        return connection

    def open_connection(self, synchronous: str) -> sqlite3.Connection:
        """A new connection to the file, with the schema in place."""
        connection = sqlite3.connect(
            self.path,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={synchronous}")
            self._ensure_schema(connection)
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    @contextmanager
    def write(self, connection: sqlite3.Connection) -> Iterator[None]:
        """A write transaction, taken by one thread of this process at a time."""
        with self._write_lock, _transaction(connection):
            yield

    def _ensure_schema(self, connection: sqlite3.Connection) -> None:
        # Not under the write lock: a publisher opens its connection while
        # holding it.
        if self._schema_ready:
            return
        with _transaction(connection):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
        self._schema_ready = True

    def publish(self, bodies: Sequence[bytes]) -> None:
        if not bodies:
            return
        batch = _Batch([(self.queue, body) for body in bodies])
        with self._lock:
            self._waiting.append(batch)

        # Group commit: whoever holds the write lock commits every batch that
        # is waiting by then, so concurrent callers share one fsync.
        with self._write_lock:
            if not batch.done:
                self._commit_waiting()
        if batch.error is not None:
            raise BrokerUnavailable(
                f"could not enqueue {len(bodies)} message(s) in {self.path}: "
                f"{batch.error}"
            ) from batch.error

        logger.debug("published %d message(s) to %s", len(bodies), self.queue)
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.wake()

    def _commit_waiting(self) -> None:
        with self._lock:
            group, self._waiting = self._waiting, []
        error = None
        try:
            connection = self.connection()
            with _transaction(connection):
                connection.executemany(
                    f"INSERT INTO {MESSAGES} (queue, body) VALUES (?, ?)",
                    [row for batch in group for row in batch.rows],
                )
        except sqlite3.Error as exc:
            error = exc
        for batch in group:
            batch.error = error
            batch.done = True

    def ping(self) -> None:
        try:
            self.connection().execute(f"SELECT 1 FROM {CONSUMERS} LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise BrokerUnavailable(
                f"the broker file {self.path} cannot be used: {exc}"
            ) from exc

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._generation += 1
        for connection in connections:
            connection.close()

    def consume(
        self,
        on_message: DeliveryHandler,
        on_dead_letter: DeliveryHandler,
        prefetch: int,
        stop: threading.Event,
    ) -> None:
        _check_prefetch(prefetch)
        session = _Session(self, on_message, on_dead_letter, prefetch, stop)
        with self._lock:
            self._sessions.add(session)
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)


class _Session:
    """One consume() call: its consumer row, its claims, and pending settles."""

    def __init__(
        self,
        broker: SQLiteBroker,
        on_message: DeliveryHandler,
        on_dead_letter: DeliveryHandler,
        prefetch: int,
        stop: threading.Event,
    ) -> None:
        self.broker = broker
        self.id = uuid.uuid4().hex
        self.handlers = {MESSAGES: on_message, DEAD_LETTERS: on_dead_letter}
        self.budget = {MESSAGES: prefetch, DEAD_LETTERS: _DEAD_LETTER_PREFETCH}
        self.unsettled = {MESSAGES: 0, DEAD_LETTERS: 0}
        self.stop = stop
        self._lock = threading.Lock()
        self._open = True
        self._settles: deque[tuple[_Claim, bool, bool]] = deque()
        self._wake = threading.Event()
        self._connection: sqlite3.Connection | None = None
        self._registered = False

    def run(self) -> None:
        delay_s = _RETRY_MIN_S
        try:
            while not self.stop.is_set():
                try:
                    self._loop(self._connect())
                except sqlite3.Error as exc:
                    logger.warning(
                        "the SQLite consumer of %s failed (%s); retrying in %.1f s",
                        self.broker.queue,
                        exc,
                        delay_s,
                    )
                    self._disconnect()
                    self.stop.wait(delay_s)
                    delay_s = min(delay_s * 2, _RETRY_MAX_S)
        finally:
            self._leave()
            self._disconnect()

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            # Losing a claim or a settle to a power cut means a redelivery,
            # which at-least-once allows, so these commits skip the fsync.
            self._connection = self.broker.open_connection(synchronous="NORMAL")
        return self._connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _loop(self, connection: sqlite3.Connection) -> None:
        next_beat_s = 0.0
        active_s = time.monotonic()
        while not self.stop.is_set():
            now_s = time.monotonic()
            if now_s >= next_beat_s:
                self._beat(connection)
                next_beat_s = now_s + self.broker.heartbeat_s

            settled = self._apply_settles(connection)
            claimed = self._claim(connection)
            if claimed or settled:
                active_s = time.monotonic()
            if claimed:
                continue
            idle_s = time.monotonic() - active_s
            self._wake.wait(
                min(max(idle_s * _POLL_IDLE_FRACTION, _POLL_MIN_S), _POLL_MAX_S)
            )
            self._wake.clear()

    def wake(self) -> None:
        """Poll now: a publisher in this process has just committed."""
        self._wake.set()

    def _beat(self, connection: sqlite3.Connection) -> None:
        """Refresh this consumer's heartbeat and release the claims of dead ones."""
        broker = self.broker
        now_s = time.time()
        with broker.write(connection):
            refreshed = connection.execute(
                f"UPDATE {CONSUMERS} SET heartbeat = ? WHERE id = ?", (now_s, self.id)
            ).rowcount
            if not refreshed:
                connection.execute(
                    f"INSERT INTO {CONSUMERS} (id, queue, heartbeat) VALUES (?, ?, ?)",
                    (self.id, broker.queue, now_s),
                )
                if self._registered:
                    logger.warning(
                        "a consumer of %s missed its heartbeats for over %.1f s; "
                        "its messages went to other consumers",
                        broker.queue,
                        broker.lease_timeout_s,
                    )
                self._registered = True
            stale = connection.execute(
                f"DELETE FROM {CONSUMERS} WHERE queue = ? AND heartbeat < ? "
                "RETURNING id",
                (broker.queue, now_s - broker.lease_timeout_s),
            ).fetchall()
            orphaned = f"consumer NOT IN (SELECT id FROM {CONSUMERS})"
            released = _release(connection, broker, orphaned, ())
            released += _release_dead(connection, broker, orphaned, ())
        if stale or released:
            logger.warning(
                "released %d message(s) of %d consumer(s) of %s that stopped "
                "sending heartbeats",
                released,
                len(stale),
                broker.queue,
            )

    def _claim(self, connection: sqlite3.Connection) -> bool:
        room = {
            table: self.budget[table] - self.unsettled[table]
            for table in (MESSAGES, DEAD_LETTERS)
        }
        wanted = [
            t for t, n in room.items() if n > 0 and self._available(connection, t)
        ]
        if not wanted:
            return False

        claims: list[tuple[_Claim, bytes]] = []
        with self.broker.write(connection):
            for table in wanted:
                # A consumer presumed dead claims nothing until its next
                # heartbeat registers it again.
                rows = connection.execute(
                    f"UPDATE {table} SET consumer = :me, deliveries = deliveries + 1 "
                    f"WHERE id IN (SELECT id FROM {table} WHERE queue = :queue "
                    "AND consumer IS NULL ORDER BY id LIMIT :room) "
                    f"AND EXISTS (SELECT 1 FROM {CONSUMERS} WHERE id = :me) "
                    "RETURNING id, deliveries, body",
                    {"me": self.id, "queue": self.broker.queue, "room": room[table]},
                ).fetchall()
                claims.extend((_Claim(table, row[0], row[1]), row[2]) for row in rows)

        claims.sort(key=lambda item: (item[0].table, item[0].id))
        for claim, body in claims:
            self.unsettled[claim.table] += 1
            self.handlers[claim.table](self._delivery(claim, body))
        return bool(claims)

    def _available(self, connection: sqlite3.Connection, table: str) -> bool:
        # A read does not take the write lock, so idle polling stays out of
        # the publishers' way.
        row = connection.execute(
            f"SELECT 1 FROM {table} WHERE queue = ? AND consumer IS NULL LIMIT 1",
            (self.broker.queue,),
        ).fetchone()
        return row is not None

    def _delivery(self, claim: _Claim, body: bytes) -> Delivery:
        return Delivery(
            body=body,
            redelivered=claim.deliveries > 1,
            ack=lambda: self._settle(claim, True, False),
            reject=lambda requeue: self._settle(claim, False, requeue),
            deliveries=claim.deliveries,
        )

    def _settle(self, claim: _Claim, ack: bool, requeue: bool) -> None:
        """Hand a settle to the consuming thread; called from any thread."""
        with self._lock:
            if claim.settled:
                logger.warning(
                    "message %d was settled twice; the second call is ignored",
                    claim.id,
                )
                return
            claim.settled = True
            if not self._open:
                logger.debug(
                    "dropped the settle of message %d: its consumer has stopped "
                    "and released it",
                    claim.id,
                )
                return
            self._settles.append((claim, ack, requeue))
        self.wake()

    def _apply_settles(self, connection: sqlite3.Connection) -> bool:
        with self._lock:
            batch = list(self._settles)
            self._settles.clear()
        if not batch:
            return False

        try:
            with self.broker.write(connection):
                for claim, ack, requeue in batch:
                    self._apply(connection, claim, ack, requeue)
        except sqlite3.Error:
            # Keep them for the next attempt, in their order.
            with self._lock:
                self._settles.extendleft(reversed(batch))
            raise

        for claim, _ack, _requeue in batch:
            self.unsettled[claim.table] -= 1
        return True

    def _apply(
        self, connection: sqlite3.Connection, claim: _Claim, ack: bool, requeue: bool
    ) -> None:
        mine = "id = ? AND consumer = ? AND deliveries = ?"
        key = (claim.id, self.id, claim.deliveries)
        if ack or (claim.table == DEAD_LETTERS and not requeue):
            # A dead letter has nowhere further to go, as in RabbitMQ.
            count = connection.execute(
                f"DELETE FROM {claim.table} WHERE {mine}", key
            ).rowcount
        elif claim.table == DEAD_LETTERS:
            count = _release_dead(connection, self.broker, mine, key)
        elif not requeue:
            count = _bury(connection, mine, key, REASON_REJECTED)
        else:
            count = _release(connection, self.broker, mine, key)
        if not count:
            logger.debug(
                "dropped the settle of message %d: it was released while this "
                "consumer was presumed dead",
                claim.id,
            )

    def _leave(self) -> None:
        """Apply the settles handed over so far, then release everything else."""
        with self._lock:
            self._open = False
        try:
            connection = self._connect()
            self._apply_settles(connection)
            with self.broker.write(connection):
                _release(connection, self.broker, "consumer = ?", (self.id,))
                _release_dead(connection, self.broker, "consumer = ?", (self.id,))
                connection.execute(f"DELETE FROM {CONSUMERS} WHERE id = ?", (self.id,))
        except sqlite3.Error as exc:
            # Other consumers release the claims once the heartbeat goes stale.
            logger.warning(
                "the SQLite consumer of %s could not release its messages (%s); "
                "they return after %.1f s",
                self.broker.queue,
                exc,
                self.broker.lease_timeout_s,
            )


def _release(
    connection: sqlite3.Connection,
    broker: SQLiteBroker,
    condition: str,
    params: tuple[object, ...],
) -> int:
    """Return claimed messages to the queue, dead-lettering those over the limit.

    Like a quorum queue, a message may be returned ``delivery_limit`` times;
    the return after that sends it to the dead letters instead.
    """
    scope = f"queue = ? AND consumer IS NOT NULL AND {condition}"
    scoped = (broker.queue, *params)
    buried = _bury(
        connection,
        f"{scope} AND deliveries > ?",
        (*scoped, broker.delivery_limit),
        REASON_DELIVERY_LIMIT,
    )
    released = connection.execute(
        f"UPDATE {MESSAGES} SET consumer = NULL WHERE {scope}", scoped
    ).rowcount
    return buried + released


def _release_dead(
    connection: sqlite3.Connection,
    broker: SQLiteBroker,
    condition: str,
    params: tuple[object, ...],
) -> int:
    """Return claimed dead letters to the dead-letter queue."""
    return connection.execute(
        f"UPDATE {DEAD_LETTERS} SET consumer = NULL "
        f"WHERE queue = ? AND consumer IS NOT NULL AND {condition}",
        (broker.queue, *params),
    ).rowcount


def _bury(
    connection: sqlite3.Connection,
    condition: str,
    params: tuple[object, ...],
    reason: str,
) -> int:
    """Move the matching messages to the dead letters."""
    rows = connection.execute(
        f"DELETE FROM {MESSAGES} WHERE {condition} RETURNING queue, body, deliveries",
        params,
    ).fetchall()
    connection.executemany(
        f"INSERT INTO {DEAD_LETTERS} (queue, body, reason, source_deliveries) "
        "VALUES (?, ?, ?, ?)",
        [(queue, body, reason, deliveries) for queue, body, deliveries in rows],
    )
    for _queue, _body, deliveries in rows:
        logger.debug(
            "dead-lettered a message after %d deliveries (%s)", deliveries, reason
        )
    return len(rows)
