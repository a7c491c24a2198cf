"""The store port: where keys, function versions and invocations are kept.

Every method that reads or writes a tenant's data takes the tenant, and a
record of another tenant is reported exactly as a missing one. Backends live
in ``conveyor_core.stores``, one module each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

from conveyor_core.records import (
    ApiKey,
    FunctionSummary,
    FunctionVersion,
    Invocation,
    Outcome,
    State,
)


class AttemptFinish(NamedTuple):
    """The arguments of one ``finish_attempt``, for ``finish_attempts``."""

    invocation_id: str
    attempt: int
    outcome: Outcome
    at: float


class Store(ABC):
    """Durable records of the platform, with conditional state transitions."""

    # Keys.

    @abstractmethod
    def add_key(self, key: ApiKey) -> None:
        """Keep a new API key."""

    @abstractmethod
    def find_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not, or None."""

    @abstractmethod
    def list_keys(self, tenant: str) -> list[ApiKey]:
        """The tenant's keys, revoked ones included, oldest first."""

    @abstractmethod
    def revoke_key(self, tenant: str, key_id: str, at: float) -> None:
        """Mark the key revoked; raises KeyNotFound."""

    @abstractmethod
    def has_admin_key(self) -> bool:
        """Whether any unrevoked key with the admin scope exists."""

    # Functions.

    @abstractmethod
    def add_function_version(self, function: FunctionVersion) -> FunctionVersion:
        """Keep a new version of the function and return it with its number.

        The number is one more than the highest this name ever had for the
        tenant (1 for a new name), assigned atomically: two concurrent
        uploads get two different numbers. ``function.version`` is ignored.
        """

    @abstractmethod
    def get_function(
        self, tenant: str, name: str, version: int | None = None
    ) -> FunctionVersion:
        """That version, or the latest; raises FunctionNotFound."""

    @abstractmethod
    def list_functions(self, tenant: str) -> list[FunctionSummary]:
        """Each of the tenant's functions, by name."""

    @abstractmethod
    def count_versions(self, tenant: str, name: str) -> int:
        """How many versions the function has; raises FunctionNotFound."""

    @abstractmethod
    def delete_function(self, tenant: str, name: str) -> None:
        """Remove every version of the function; raises FunctionNotFound."""

    # Invocations.

    @abstractmethod
    def add_invocations(self, invocations: Sequence[Invocation]) -> list[Invocation]:
        """Keep new queued invocations, all or none.

        Where one carries an ``idempotency_key`` the tenant already used, the
        earlier invocation is returned in its place and nothing new is kept
        for it. The result lines up with the argument.
        """

    @abstractmethod
    def get_invocation(self, invocation_id: str, tenant: str | None) -> Invocation:
        """The invocation; raises InvocationNotFound.

        ``tenant`` None is the platform's own look-up, across tenants.
        """

    @abstractmethod
    def list_invocations(
        self,
        tenant: str,
        function: str | None = None,
        status: State | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Invocation]:
        """Newest first; ``before`` is an id, for the next page."""

    @abstractmethod
    def start_attempt(
        self, invocation_id: str, worker: str, at: float
    ) -> Invocation | None:
        """Move a queued or running invocation to running with one more attempt.

        A running one is an attempt a dead worker left behind. Returns the
        updated invocation, or None when it is terminal or unknown.
        """

    @abstractmethod
    def finish_attempt(
        self, invocation_id: str, attempt: int, outcome: Outcome, at: float
    ) -> Invocation | None:
        """Record the outcome if the invocation is still running that attempt.

        Returns the updated invocation, or None when another attempt or a
        terminal state got there first (the outcome is then not recorded).
        """

    def start_attempts(
        self, invocation_ids: Sequence[str], worker: str, at: float
    ) -> list[Invocation | None]:
        """``start_attempt`` for each id, lined up with them.

        Backends that can write several records at once override this, so a
        bundle of invocations costs one write rather than one each.
        """
        return [self.start_attempt(i, worker, at) for i in invocation_ids]

    def finish_attempts(
        self, finishes: Sequence[AttemptFinish]
    ) -> list[Invocation | None]:
        """``finish_attempt`` for each finish, lined up with them.

        Raises ValueError, having recorded nothing, when any outcome is not
        terminal.
        """
        for finish in finishes:
            if not State(finish.outcome.status).terminal:
                raise ValueError(
                    "an attempt must finish in a terminal state, got "
                    f"{State(finish.outcome.status).value!r}"
                )
        return [self.finish_attempt(*finish) for finish in finishes]

    @abstractmethod
    def cancel_invocation(
        self, tenant: str, invocation_id: str, at: float
    ) -> Invocation:
        """Cancel a queued invocation.

        Raises InvocationNotFound, or InvalidTransition when it is not queued.
        """

    @abstractmethod
    def fail_queued(
        self, invocation_ids: Sequence[str], error: dict[str, Any], at: float
    ) -> None:
        """Mark still-queued invocations failed with the error, e.g. not enqueued."""

    # Lifecycle.

    @abstractmethod
    def ping(self) -> None:
        """Return if the store answers; raise StoreUnavailable otherwise."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
