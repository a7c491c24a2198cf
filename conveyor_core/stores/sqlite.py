"""The SQLite store: the embedded twin of the MongoDB store.

One file serves many threads and several processes at once. Each thread has
its own connection, the file is in WAL mode so that readers never wait for
the writer, and every write is a single statement or one short
``BEGIN IMMEDIATE`` transaction, so the write lock is only held briefly.

Columns hold what queries filter on; everything else of a record is a JSON
document beside them. State transitions edit that document inside the same
``UPDATE … RETURNING`` statement, so each one is atomic without a
read-modify-write round trip.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor_core import codec
from conveyor_core.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidTransition,
    InvocationNotFound,
    KeyNotFound,
    MissingDependency,
    StoreUnavailable,
)
from conveyor_core.records import (
    ApiKey,
    FunctionSummary,
    FunctionVersion,
    Invocation,
    Outcome,
    Scope,
    State,
)
from conveyor_core.store import AttemptFinish, Store

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

try:
    import orjson
except ImportError:
    raise MissingDependency("orjson") from None

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0
WAL_RETRY_DELAY_S = 0.01

# Primary result codes that mean the file cannot be used right now, as opposed
# to a mistake in a statement, which is a bug and is raised as it is.
_UNUSABLE_CODES = frozenset(
    {
        5,  # SQLITE_BUSY: another connection held the lock past the timeout
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        8,  # SQLITE_READONLY
        10,  # SQLITE_IOERR
        11,  # SQLITE_CORRUPT
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
        26,  # SQLITE_NOTADB
    }
)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        is_admin INTEGER NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL,
        doc TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS keys_by_tenant ON keys (tenant, created_at, id)",
    "CREATE INDEX IF NOT EXISTS keys_by_admin ON keys (is_admin, revoked_at)",
    """
    CREATE TABLE IF NOT EXISTS functions (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (tenant, name, version)
    )
    """,
    # Outlives the versions it numbered, so a re-created name never reuses a
    # number: warm executors are keyed by (tenant, name, version).
    """
    CREATE TABLE IF NOT EXISTS function_counters (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        last_version INTEGER NOT NULL,
        PRIMARY KEY (tenant, name)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS invocations (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        function TEXT NOT NULL,
        status TEXT NOT NULL,
        idempotency_key TEXT,
        attempts INTEGER NOT NULL,
        doc TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS invocations_by_tenant ON invocations (tenant, id)",
    """
    CREATE INDEX IF NOT EXISTS invocations_by_function
    ON invocations (tenant, function, id)
    """,
    """
    CREATE INDEX IF NOT EXISTS invocations_by_status
    ON invocations (tenant, status, id)
    """,
    """
    CREATE UNIQUE INDEX IF NOT EXISTS invocations_by_idempotency_key
    ON invocations (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL
    """,
)

_KEY_COLUMNS = ("id", "tenant", "key_hash", "created_at", "revoked_at")
_KEY_SELECT = "SELECT id, tenant, key_hash, created_at, revoked_at, doc FROM keys"

_FUNCTION_SELECT = "SELECT tenant, name, version, doc FROM functions"

_INVOCATION_COLUMNS = (
    "id",
    "tenant",
    "function",
    "status",
    "idempotency_key",
    "attempts",
)
_INVOCATION_FIELDS = ", ".join(_INVOCATION_COLUMNS) + ", doc"
_INVOCATION_SELECT = f"SELECT {_INVOCATION_FIELDS} FROM invocations"
_INVOCATION_INSERT = (
    f"INSERT INTO invocations ({_INVOCATION_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_IDEMPOTENT_INSERT = (
    _INVOCATION_INSERT
    + " ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL"
    + " DO NOTHING"
)

# Timestamps and other numbers go in as JSON text through json(), because a
# REAL bound straight into a JSON function is printed with 15 digits only.
_START_ATTEMPT = f"""
    UPDATE invocations
    SET status = :running,
        attempts = attempts + 1,
        doc = json_set(
            doc,
            '$.started_at', json(:at),
            '$.attempt_log[#]', json_object(
                'number', attempts + 1,
                'worker', :worker,
                'started_at', json(:at),
                'finished_at', NULL,
                'status', NULL
            )
        )
    WHERE id = :id AND status IN (:queued, :running)
    RETURNING {_INVOCATION_FIELDS}
"""

_FINISH_ATTEMPT = f"""
    UPDATE invocations
    SET status = :status,
        doc = json_set(
            doc,
            '$.result', json(:result),
            '$.error', json(:error),
            '$.logs', :logs,
            '$.logs_truncated', json(:logs_truncated),
            '$.duration_ms', json(:duration_ms),
            '$.finished_at', json(:at),
            '$.attempt_log[#-1].finished_at', json(:at),
            '$.attempt_log[#-1].status', :status
        )
    WHERE id = :id AND status = :running AND attempts = :attempt
    RETURNING {_INVOCATION_FIELDS}
"""

_CANCEL = f"""
    UPDATE invocations
    SET status = :cancelled, doc = json_set(doc, '$.finished_at', json(:at))
    WHERE id = :id AND tenant = :tenant AND status = :queued
    RETURNING {_INVOCATION_FIELDS}
"""

_FAIL_QUEUED = """
    UPDATE invocations
    SET status = :failed,
        doc = json_set(doc, '$.error', json(:error), '$.finished_at', json(:at))
    WHERE id = :id AND status = :queued
"""

_Method = TypeVar("_Method", bound=Callable[..., Any])
_Record = TypeVar("_Record", bound="DataclassInstance")


class _Connection(sqlite3.Connection):
    """A connection the store can hold weakly, to close it when the store closes."""


def _unusable(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # Python 3.10 carries no error code: every operational error counts.
        return isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in _UNUSABLE_CODES


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc)
    return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED


def _translate_errors(method: _Method) -> _Method:
    """Raise StoreUnavailable where SQLite says the file cannot be used."""

    @functools.wraps(method)
    def guarded(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not _unusable(exc):
                raise
            raise StoreUnavailable(
                f"the SQLite store {self.path!r} cannot be used: {exc}"
            ) from exc

    return guarded  # type: ignore[return-value]


def _json(value: Any) -> str:
    return codec.dumps(value).decode()


def _build(cls: type[_Record], values: dict[str, Any]) -> _Record:
    """A record from stored values, ignoring fields the record no longer has."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if name in names})


class SQLiteStore(Store):
    """The store in one SQLite file, shared by threads and processes."""

    def __init__(self, path: str) -> None:
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise ConfigurationError(
                f"SQLiteStore needs a file, got {path!r}: each thread opens its "
                "own connection, and an in-memory database is private to one; "
                "pass a path such as /var/lib/conveyor/conveyor.sqlite3"
            )
        self.path = path
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._inherited: list[_Connection] = []
        self._closed = False
        self._warned_journal = False
        _open_stores.add(self)

        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise
        logger.debug("opened the SQLite store %s", path)

    # Connections.

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable(f"the SQLite store {self.path!r} is closed")
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def _connect(self) -> _Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
            factory=_Connection,
        )
        try:
            self._use_wal(connection)
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._connections.add(connection)
        return connection

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        """Put the file in WAL mode, waiting out other processes doing the same.

        Changing the journal mode does not go through the busy handler, so a
        process that opens a new file while another one is creating it retries
        here instead.
        """
        deadline_s = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() >= deadline_s:
                    raise
                time.sleep(WAL_RETRY_DELAY_S)

        if mode != "wal" and not self._warned_journal:
            self._warned_journal = True
            logger.warning(
                "the SQLite store %s cannot use WAL (its file system gave %s "
                "mode); readers will wait for writers",
                self.path,
                mode,
            )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the write lock from the first read, so no upgrade can deadlock."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _forget_connections(self) -> None:
        """Drop, without closing, the connections a fork copied into this child.

        SQLite forbids using a connection across fork(); closing one counts as
        using it, so they are kept referenced and never touched again.
        """
        self._inherited.extend(self._connections)
        self._connections = weakref.WeakSet()
        self._local = threading.local()
        self._lock = threading.Lock()

    @_translate_errors
    def _create_schema(self) -> None:
        with self._transaction() as connection:
            for statement in _SCHEMA:
                connection.execute(statement)

    # Keys.

    @_translate_errors
    def add_key(self, key: ApiKey) -> None:
        doc = dataclasses.asdict(key)
        columns = [doc.pop(name) for name in _KEY_COLUMNS]
        is_admin = Scope.ADMIN.value in key.scopes
        self._connection().execute(
            "INSERT INTO keys (id, tenant, key_hash, created_at, revoked_at, doc,"
            " is_admin) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*columns, _json(doc), is_admin),
        )

    @_translate_errors
    def find_key(self, key_hash: str) -> ApiKey | None:
        row = (
            self._connection()
            .execute(_KEY_SELECT + " WHERE key_hash = ?", (key_hash,))
            .fetchone()
        )
        return None if row is None else self._key(row)

    @_translate_errors
    def list_keys(self, tenant: str) -> list[ApiKey]:
        rows = self._connection().execute(
            _KEY_SELECT + " WHERE tenant = ? ORDER BY created_at, id", (tenant,)
        )
        return [self._key(row) for row in rows]

    @_translate_errors
    def revoke_key(self, tenant: str, key_id: str, at: float) -> None:
        # A key revoked twice keeps the time it was first revoked.
        cursor = self._connection().execute(
            "UPDATE keys SET revoked_at = coalesce(revoked_at, ?)"
            " WHERE id = ? AND tenant = ?",
            (at, key_id, tenant),
        )
        if cursor.rowcount == 0:
            raise KeyNotFound(key_id)

    @_translate_errors
    def has_admin_key(self) -> bool:
        row = (
            self._connection()
            .execute(
                "SELECT 1 FROM keys WHERE is_admin = 1 AND revoked_at IS NULL LIMIT 1"
            )
            .fetchone()
        )
        return row is not None

    @staticmethod
    def _key(row: tuple[Any, ...]) -> ApiKey:
        values = orjson.loads(row[-1])
        values.update(zip(_KEY_COLUMNS, row[:-1], strict=True))
        return _build(ApiKey, values)

    # Functions.

    @_translate_errors
    def add_function_version(self, function: FunctionVersion) -> FunctionVersion:
        doc = dataclasses.asdict(function)
        tenant, name = doc.pop("tenant"), doc.pop("name")
        del doc["version"]

        with self._transaction() as connection:
            (version,) = connection.execute(
                "INSERT INTO function_counters (tenant, name, last_version)"
                " VALUES (?, ?, 1) ON CONFLICT (tenant, name)"
                " DO UPDATE SET last_version = last_version + 1"
                " RETURNING last_version",
                (tenant, name),
            ).fetchone()
            connection.execute(
                "INSERT INTO functions (tenant, name, version, doc)"
                " VALUES (?, ?, ?, ?)",
                (tenant, name, version, _json(doc)),
            )
        return dataclasses.replace(function, version=version)

    @_translate_errors
    def get_function(
        self, tenant: str, name: str, version: int | None = None
    ) -> FunctionVersion:
        if version is None:
            query = " WHERE tenant = ? AND name = ? ORDER BY version DESC LIMIT 1"
            params: tuple[Any, ...] = (tenant, name)
        else:
            query = " WHERE tenant = ? AND name = ? AND version = ?"
            params = (tenant, name, version)
        row = self._connection().execute(_FUNCTION_SELECT + query, params).fetchone()
        if row is None:
            raise FunctionNotFound(name, version)
        return self._function(row)

    @_translate_errors
    def list_functions(self, tenant: str) -> list[FunctionSummary]:
        rows = self._connection().execute(
            "SELECT f.tenant, f.name, f.version, f.doc, latest.versions"
            " FROM (SELECT name, max(version) AS version, count(*) AS versions"
            "       FROM functions WHERE tenant = ? GROUP BY name) AS latest"
            " JOIN functions AS f ON f.tenant = ? AND f.name = latest.name"
            "  AND f.version = latest.version"
            " ORDER BY f.name",
            (tenant, tenant),
        )
        return [FunctionSummary(self._function(row), row[-1]) for row in rows]

    @_translate_errors
    def count_versions(self, tenant: str, name: str) -> int:
        (count,) = (
            self._connection()
            .execute(
                "SELECT count(*) FROM functions WHERE tenant = ? AND name = ?",
                (tenant, name),
            )
            .fetchone()
        )
        if count == 0:
            raise FunctionNotFound(name)
        return int(count)

    @_translate_errors
    def delete_function(self, tenant: str, name: str) -> None:
        cursor = self._connection().execute(
            "DELETE FROM functions WHERE tenant = ? AND name = ?", (tenant, name)
        )
        if cursor.rowcount == 0:
            raise FunctionNotFound(name)

    @staticmethod
    def _function(row: tuple[Any, ...]) -> FunctionVersion:
        values = orjson.loads(row[3])
        values.update(tenant=row[0], name=row[1], version=row[2])
        return _build(FunctionVersion, values)

    # Invocations.

    @_translate_errors
    def add_invocations(self, invocations: Sequence[Invocation]) -> list[Invocation]:
        if not invocations:
            return []
        rows = [self._invocation_row(invocation) for invocation in invocations]
        result = list(invocations)

        with self._transaction() as connection:
            connection.executemany(
                _INVOCATION_INSERT,
                [
                    row
                    for row, invocation in zip(rows, invocations, strict=True)
                    if invocation.idempotency_key is None
                ],
            )
            for index, invocation in enumerate(invocations):
                if invocation.idempotency_key is None:
                    continue
                if connection.execute(_IDEMPOTENT_INSERT, rows[index]).rowcount == 0:
                    result[index] = self._earlier(connection, invocation)
        return result

    def _earlier(
        self, connection: sqlite3.Connection, invocation: Invocation
    ) -> Invocation:
        """The invocation that already holds this one's idempotency key."""
        row = connection.execute(
            _INVOCATION_SELECT + " WHERE tenant = ? AND idempotency_key = ?",
            (invocation.tenant, invocation.idempotency_key),
        ).fetchone()
        return self._invocation(row)

    @_translate_errors
    def get_invocation(self, invocation_id: str, tenant: str | None) -> Invocation:
        query, params = " WHERE id = ?", [invocation_id]
        if tenant is not None:
            query += " AND tenant = ?"
            params.append(tenant)
        row = self._connection().execute(_INVOCATION_SELECT + query, params).fetchone()
        if row is None:
            raise InvocationNotFound(invocation_id)
        return self._invocation(row)

    @_translate_errors
    def list_invocations(
        self,
        tenant: str,
        function: str | None = None,
        status: State | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Invocation]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        clauses, params = ["tenant = ?"], [tenant]
        if function is not None:
            clauses.append("function = ?")
            params.append(function)
        if status is not None:
            clauses.append("status = ?")
            params.append(State(status).value)
        if before is not None:
            clauses.append("id < ?")
            params.append(before)

        query = (
            f"{_INVOCATION_SELECT} WHERE {' AND '.join(clauses)}"
            " ORDER BY id DESC LIMIT ?"
        )
        rows = self._connection().execute(query, (*params, limit))
        return [self._invocation(row) for row in rows]

    def start_attempt(
        self, invocation_id: str, worker: str, at: float
    ) -> Invocation | None:
        return self.start_attempts([invocation_id], worker, at)[0]

    @_translate_errors
    def start_attempts(
        self, invocation_ids: Sequence[str], worker: str, at: float
    ) -> list[Invocation | None]:
        common = {
            "worker": worker,
            "at": _json(at),
            "queued": State.QUEUED.value,
            "running": State.RUNNING.value,
        }
        rows = self._write_each(
            _START_ATTEMPT,
            [{**common, "id": invocation_id} for invocation_id in invocation_ids],
        )
        started: list[Invocation | None] = []
        for invocation_id, row in zip(invocation_ids, rows, strict=True):
            if row is None:
                logger.debug(
                    "invocation %s is settled or unknown; not started", invocation_id
                )
                started.append(None)
            else:
                started.append(self._invocation(row))
        return started

    def finish_attempt(
        self, invocation_id: str, attempt: int, outcome: Outcome, at: float
    ) -> Invocation | None:
        return self.finish_attempts(
            [AttemptFinish(invocation_id, attempt, outcome, at)]
        )[0]

    @_translate_errors
    def finish_attempts(
        self, finishes: Sequence[AttemptFinish]
    ) -> list[Invocation | None]:
        params = []
        for invocation_id, attempt, outcome, at in finishes:
            status = State(outcome.status)
            if not status.terminal:
                raise ValueError(
                    f"an attempt must finish in a terminal state, got {status.value!r}"
                )
            params.append(
                {
                    "id": invocation_id,
                    "attempt": attempt,
                    "status": status.value,
                    "running": State.RUNNING.value,
                    "result": _json(outcome.result),
                    "error": _json(outcome.error),
                    "logs": outcome.logs,
                    "logs_truncated": _json(outcome.logs_truncated),
                    "duration_ms": _json(outcome.duration_ms),
                    "at": _json(at),
                }
            )
        rows = self._write_each(_FINISH_ATTEMPT, params)
        finished: list[Invocation | None] = []
        for finish, row in zip(finishes, rows, strict=True):
            if row is None:
                logger.debug(
                    "invocation %s is no longer running attempt %d; outcome dropped",
                    finish.invocation_id,
                    finish.attempt,
                )
                finished.append(None)
            else:
                finished.append(self._invocation(row))
        return finished

    def _write_each(
        self, statement: str, params: Sequence[dict[str, Any]]
    ) -> list[tuple[Any, ...] | None]:
        """Run an ``UPDATE … RETURNING`` once per parameter set, atomically.

        One statement commits on its own; several share one transaction, which
        costs one commit instead of one each.
        """
        if not params:
            return []
        if len(params) == 1:
            return [self._connection().execute(statement, params[0]).fetchone()]
        with self._transaction() as connection:
            return [connection.execute(statement, p).fetchone() for p in params]

    @_translate_errors
    def cancel_invocation(
        self, tenant: str, invocation_id: str, at: float
    ) -> Invocation:
        connection = self._connection()
        row = connection.execute(
            _CANCEL,
            {
                "id": invocation_id,
                "tenant": tenant,
                "at": _json(at),
                "queued": State.QUEUED.value,
                "cancelled": State.CANCELLED.value,
            },
        ).fetchone()
        if row is not None:
            return self._invocation(row)

        current = connection.execute(
            "SELECT status FROM invocations WHERE id = ? AND tenant = ?",
            (invocation_id, tenant),
        ).fetchone()
        if current is None:
            raise InvocationNotFound(invocation_id)
        raise InvalidTransition(invocation_id, current[0], State.CANCELLED.value)

    @_translate_errors
    def fail_queued(
        self, invocation_ids: Sequence[str], error: dict[str, Any], at: float
    ) -> None:
        if not invocation_ids:
            return
        common = {
            "error": _json(error),
            "at": _json(at),
            "failed": State.FAILED.value,
            "queued": State.QUEUED.value,
        }
        with self._transaction() as connection:
            connection.executemany(
                _FAIL_QUEUED,
                [{**common, "id": invocation_id} for invocation_id in invocation_ids],
            )

    @staticmethod
    def _invocation_row(invocation: Invocation) -> tuple[Any, ...]:
        doc = invocation.to_doc()
        columns = [doc.pop(name) for name in _INVOCATION_COLUMNS]
        return (*columns, _json(doc))

    @staticmethod
    def _invocation(row: tuple[Any, ...]) -> Invocation:
        doc = codec.loads(row[-1])
        doc.update(zip(_INVOCATION_COLUMNS, row[:-1], strict=True))
        return Invocation.from_doc(doc)

    # Lifecycle.

    @_translate_errors
    def ping(self) -> None:
        self._connection().execute("SELECT 1 FROM invocations LIMIT 1").fetchall()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for connection in connections:
            connection.close()
        _open_stores.discard(self)
        logger.debug("closed the SQLite store %s", self.path)


_open_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._forget_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
