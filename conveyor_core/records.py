"""The records Conveyor keeps: API keys, function versions and invocations."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
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


def new_id(prefix: str) -> str:
    """A unique id that sorts by creation time (48 bits of ms, 80 random bits)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return prefix + "".join(reversed(chars))


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

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.tenant, self.name, self.version)

    def to_api(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "entrypoint": self.entrypoint,
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
        """A plain dict of every field, for stores and caches."""
        doc = dataclasses.asdict(self)
        doc["status"] = self.status.value
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Invocation:
        values = {f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc}
        values["status"] = State(values["status"])
        values["attempt_log"] = [Attempt(**a) for a in values.get("attempt_log", [])]
        return cls(**values)
