"""The executor port: runs one invocation of a function version in isolation.

Backends live in ``runtime.executors``, one module each. An executor keeps
warm processes (or containers) per function version and reuses them across
invocations of that version only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from conveyor_core.records import FunctionVersion, Outcome


class Executor(ABC):
    """Runs function code away from the worker and measures how it went."""

    @abstractmethod
    def run(
        self, function: FunctionVersion, payload: bytes, invocation_id: str
    ) -> Outcome:
        """Run the function on ``payload`` and return the worker's verdict.

        ``payload`` is the JSON document ``{"args": [...], "kwargs": {...}}``
        as the client sent it; it is decoded only inside the executor's
        process. Safe to call from many threads at once. The function
        raising, timing out or exhausting its memory is an Outcome; only a
        fault of the platform itself raises (ExecutorError).
        """

    @abstractmethod
    def close(self) -> None:
        """Stop every warm process; nothing the executor started outlives it."""
