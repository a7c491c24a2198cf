"""Conveyor's Python SDK: deploy plain functions and call them remotely.

import conveyor

@conveyor.task(timeout_s=30)
def add(a, b):
    return a + b

add.deploy()
add.remote(1, 2)            # 3, computed on the platform
handle = add.spawn(1, 2)    # returns at once
handle.result()             # 3
add.map(range(1000))        # one invocation per item, results in order
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from conveyor.errors import (  # noqa: E402
    APIError,
    AuthenticationError,
    ConfigurationError,
    ConveyorError,
    GatewayUnreachable,
    InvalidRequest,
    InvocationCancelled,
    InvocationTimeout,
    NotFound,
    PermissionDenied,
    RemoteError,
    ServiceUnavailable,
)
from conveyor.task import (  # noqa: E402
    Invocation,
    Task,
    default_client,
    set_default_client,
    task,
)

if TYPE_CHECKING:
    from conveyor.client import Client


def __getattr__(name: str) -> Any:
    # The client pulls in requests; a function that only uses the decorator,
    # as deployed code does, starts faster without it.
    if name == "Client":
        from conveyor.client import Client

        return Client
    raise AttributeError(f"module 'conveyor' has no attribute {name!r}")


__all__ = [
    "APIError",
    "AuthenticationError",
    "Client",
    "ConfigurationError",
    "ConveyorError",
    "GatewayUnreachable",
    "InvalidRequest",
    "Invocation",
    "InvocationCancelled",
    "InvocationTimeout",
    "NotFound",
    "PermissionDenied",
    "RemoteError",
    "ServiceUnavailable",
    "Task",
    "__version__",
    "default_client",
    "set_default_client",
    "task",
]
