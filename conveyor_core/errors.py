"""The platform's exception hierarchy: one root, one base per subsystem."""

from __future__ import annotations


class ConveyorError(Exception):
    """Root of every error the Conveyor platform raises on purpose."""


class ConfigurationError(ConveyorError):
    """Raised when a setting is missing, malformed or names an unknown backend."""


class MissingDependency(ConfigurationError):
    """Raised when an optional package a backend needs is not installed."""

    def __init__(self, package: str, extra: str = "server") -> None:
        super().__init__(
            f"the {package!r} package is required here; "
            f"install it with: pip install 'conveyor[{extra}]'"
        )


class BackendUnavailable(ConveyorError):
    """Raised when a backend server cannot be reached or answers with a fault."""


# The store.


class StoreError(ConveyorError):
    """Base of errors raised by an invocation store."""


class StoreUnavailable(StoreError, BackendUnavailable):
    """Raised when the store cannot be reached."""


class NotFound(StoreError):
    """Base of lookups that found nothing (or only another tenant's record)."""


class FunctionNotFound(NotFound):
    """Raised when no function of that name (or version) exists for the tenant."""

    def __init__(self, name: str, version: int | None = None) -> None:
        self.name = name
        self.version = version
        what = (
            f"function {name!r}" if version is None else f"{name!r} version {version}"
        )
        super().__init__(f"no {what} exists")


class InvocationNotFound(NotFound):
    """Raised when no invocation with that id exists for the tenant."""

    def __init__(self, invocation_id: str) -> None:
        self.invocation_id = invocation_id
        super().__init__(f"no invocation {invocation_id!r} exists")


class KeyNotFound(NotFound):
    """Raised when no API key with that id exists for the tenant."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"no API key {key_id!r} exists")


class InvalidTransition(StoreError):
    """Raised when an invocation cannot move from its current state as asked."""

    def __init__(self, invocation_id: str, state: str, wanted: str) -> None:
        self.invocation_id = invocation_id
        self.state = state
        super().__init__(
            f"invocation {invocation_id!r} is {state}; only a queued invocation "
            f"can be {wanted}"
        )


# The broker.


class BrokerError(ConveyorError):
    """Base of errors raised by a message broker adapter."""


class BrokerUnavailable(BrokerError, BackendUnavailable):
    """Raised when a message could not be durably enqueued or consumed."""


# The cache.


class CacheError(ConveyorError):
    """Base of errors raised by a result cache."""


class CacheUnavailable(CacheError, BackendUnavailable):
    """Raised when the result cache cannot be reached."""


# Execution.


class ExecutorError(ConveyorError):
    """Base of errors raised by an executor for faults of the platform itself."""


class SandboxUnavailable(ExecutorError):
    """Raised when the configured sandbox cannot run on this host."""
