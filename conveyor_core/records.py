"""The records Conveyor keeps: API keys, function versions and invocations."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any


class State(str, Enum):
    """Where an invocation is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELLED}
)


class Scope(str, Enum):
    """What an API key may do."""

    ADMIN = "admin"
    DEPLOY = "deploy"
    INVOKE = "invoke"
    READ = "read"


ALL_SCOPES = tuple(scope.value for scope in Scope)

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


_RANDOM_BITS = 80
_id_lock = threading.Lock()
_last_id = 0


def new_id(prefix: str) -> str:
    """A unique id that sorts by creation time (48 bits of ms, 80 random bits).

    Within one process ids also sort in the order they were made: one made
    in the same millisecond as the previous one (or while the clock went
    back) is the previous one plus one.
    """
    global _last_id
    fresh = (int(time.time() * 1000) << _RANDOM_BITS) | int.from_bytes(
        os.urandom(_RANDOM_BITS // 8), "big"
    )
    with _id_lock:
        if fresh >> _RANDOM_BITS <= _last_id >> _RANDOM_BITS:
            fresh = _last_id + 1
        _last_id = value = fresh
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return prefix + "".join(reversed(chars))


def _forget_last_id() -> None:
    # A forked child would otherwise count on from its parent's last id, as
    # would its siblings, and the ids would collide.
    global _last_id
    _last_id = 0


os.register_at_fork(after_in_child=_forget_last_id)


def new_api_key() -> str:
    return "cvk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def iso(ts: float | None) -> str | None:
    """Render an epoch timestamp as ISO 8601 in UTC with milliseconds."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ApiKey:
    """An API key of a tenant; only the hash of the secret is kept."""

    id: str
    tenant: str
    scopes: list[str]
    key_hash: str
    created_at: float
    revoked_at: float | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "created_at": iso(self.created_at),
            "revoked": self.revoked_at is not None,
        }


@dataclass
class FunctionVersion:
    """One immutable version of a registered function."""

    tenant: str
    name: str
    version: int
    source: str
    entrypoint: str
    timeout_s: float
    memory_mb: int
    env: dict[str, str]
    created_at: float
    #: "source": ``source`` is Python source defining ``entrypoint``;
    #: "pickle": ``source`` is the base64 of a pickled callable.
    kind: str = "source"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.tenant, self.name, self.version)

    def to_api(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "entrypoint": self.entrypoint,
            "kind": self.kind,
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "env": sorted(self.env),
            "created_at": iso(self.created_at),
        }


@dataclass
class FunctionSummary:
    """The latest version of a function with how many versions it has."""

    latest: FunctionVersion
    versions: int

    def to_api(self) -> dict[str, Any]:
        return {**self.latest.to_api(), "versions": self.versions}


@dataclass
class Attempt:
    """One execution attempt of an invocation, as the worker measured it."""

    number: int
    worker: str
    started_at: float
    finished_at: float | None = None
    status: str | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "worker": self.worker,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "status": self.status,
        }


@dataclass
class Outcome:
    """How one attempt ended, as the worker decided it."""

    status: State
    result: Any = None
    error: dict[str, Any] | None = None
    logs: str = ""
    logs_truncated: bool = False
    duration_ms: float = 0.0


@dataclass
class Invocation:
    """One call of a function version, from queued to a terminal state."""

    id: str
    tenant: str
    function: str
    version: int
    status: State = State.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    duration_ms: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    attempt_log: list[Attempt] = field(default_factory=list)
    logs: str = ""
    logs_truncated: bool = False
    idempotency_key: str | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "function": self.function,
            "version": self.version,
            "status": self.status.value,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "attempt_log": [attempt.to_api() for attempt in self.attempt_log],
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "logs_truncated": self.logs_truncated,
        }

    def to_doc(self) -> dict[str, Any]:
        """A plain dict of every field, for stores and caches.

        The result and error are the record's own objects, not copies.
        """
        return {
            "id": self.id,
            "tenant": self.tenant,
            "function": self.function,
            "version": self.version,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "attempt_log": [dataclasses.asdict(a) for a in self.attempt_log],
            "logs": self.logs,
            "logs_truncated": self.logs_truncated,
            "idempotency_key": self.idempotency_key,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Invocation:
        values = {f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc}
        values["status"] = State(values["status"])
        values["attempt_log"] = [Attempt(**a) for a in values.get("attempt_log", [])]
        return cls(**values)
