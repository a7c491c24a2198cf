"""``@task``: a plain function that can also run on a Conveyor platform."""

from __future__ import annotations

import base64
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar, overload

from conveyor.errors import (
    ConveyorError,
    InvocationCancelled,
    InvocationTimeout,
    RemoteError,
)

if TYPE_CHECKING:
    from conveyor.client import Client

R = TypeVar("R")

#: The longest single long-poll (the gateway caps waits at 60 s by default).
MAX_POLL_S = 50.0

#: Invocation states after which nothing changes.
TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled"})

#: How many results ``map`` waits for at once.
MAP_WAITERS = 16
#: ``map`` shows a progress bar on a terminal from this many items on.
PROGRESS_FROM = 50

_default_lock = threading.Lock()
_default_client: Client | None = None
#: How many callers need each module pickled by value right now.
_by_value_users: dict[str, int] = {}


def default_client() -> Client:
    """The module-wide client the decorator uses, made on first need."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            from conveyor.client import Client

            _default_client = Client()
        return _default_client


def set_default_client(client: Client | None) -> None:
    """Make ``client`` the one tasks use (None: build one from the settings)."""
    global _default_client
    with _default_lock:
        _default_client = client


class Invocation:
    """A handle on one invocation, spawned here or rebuilt from its id."""

    def __init__(self, invocation_id: str, client: Client | None = None) -> None:
        self.id = invocation_id
        self._client = client

    def __repr__(self) -> str:
        return f"Invocation({self.id!r})"

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def info(self, wait_s: float = 0.0) -> dict[str, Any]:
        """The invocation's record as the API shows it."""
        return self.client.invocation(self.id, wait_s)

    def status(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed``, ``timed_out`` or
        ``cancelled``."""
        return str(self.info()["status"])

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the invocation and return its result.

        Raises RemoteError when the function raised, InvocationTimeout when
        it ran past its time limit or ``timeout`` seconds pass first, and
        InvocationCancelled when it was cancelled.
        """
        return result_of(self.wait(timeout))

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The record once the invocation is finished; InvocationTimeout if not
        within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = MAX_POLL_S if deadline is None else deadline - time.monotonic()
            record = self.info(max(0.0, min(remaining, MAX_POLL_S)))
            if record["status"] in TERMINAL:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise InvocationTimeout(
                    f"invocation {self.id} did not finish within {timeout:g} s; "
                    f"it is {record['status']}",
                    self.id,
                )

    def logs(self) -> str:
        """What the function printed in this invocation."""
        return str(self.client.logs(self.id)["logs"])

    def cancel(self) -> None:
        """Cancel the invocation if it is still queued (APIError otherwise)."""
        self.client.cancel(self.id)


def result_of(record: Mapping[str, Any]) -> Any:
    """The result of a finished invocation's record, or its error raised."""
    status = record["status"]
    invocation_id = record.get("id")
    if status == "succeeded":
        from conveyor.serialization import decode

        return decode(record.get("result"))
    error = record.get("error") or {}
    if status == "timed_out":
        raise InvocationTimeout(
            f"invocation {invocation_id} ran past its time limit: "
            f"{error.get('message', 'timed out')}",
            invocation_id,
        )
    if status == "cancelled":
        raise InvocationCancelled(
            f"invocation {invocation_id} was cancelled", invocation_id
        )
    raise RemoteError(
        str(error.get("type") or "RemoteError"),
        str(error.get("message") or ""),
        str(error.get("traceback") or ""),
        invocation_id,
    )


class Task(Generic[R]):
    """A decorated function: call it to run it here, or deploy and run it there."""

    def __init__(
        self,
        func: Callable[..., R],
        *,
        name: str | None = None,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        client: Client | None = None,
    ) -> None:
        self.func = func
        self.name = name or func.__name__.lstrip("_") or "task"
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.env = dict(env or {})
        self._client = client
        self.version: int | None = None
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return f"<conveyor task {self.name!r} of {self.func.__qualname__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (with a function that refers to it by its global name), a
        # task travels as the plain function: never with its client or key.
        return (_plain, (self.func,))

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def deploy(self) -> int:
        """Register the function as a new version; returns the version number.

        A function from an importable file travels as that file's source. One
        defined in a script run as ``__main__``, in a notebook, or inside
        another function travels by value, pickled with what it uses.
        """
        source = _module_source(self.func)
        options = {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "env": self.env or None,
        }
        if source is not None:
            answer = self.client.deploy(
                self.name, source=source, entrypoint=self.func.__name__, **options
            )
        else:
            pickled = base64.b64encode(_pickle_by_value(self.func)).decode("ascii")
            answer = self.client.deploy(
                self.name,
                pickled=pickled,
                entrypoint=self.func.__qualname__,
                **options,
            )
        self.version = int(answer["version"])
        return self.version

    def remote(self, *args: Any, **kwargs: Any) -> R:
        """Run it on the platform and return its result, as a local call would."""
        with by_value(self.func):
            record = self.client.invoke(self.name, args, kwargs, wait_s=MAX_POLL_S)
        if record["status"] not in TERMINAL:
            record = Invocation(record["id"], self._client).wait()
        return result_of(record)  # type: ignore[no-any-return]

    def spawn(self, *args: Any, **kwargs: Any) -> Invocation:
        """Start it on the platform and return a handle at once."""
        with by_value(self.func):
            record = self.client.invoke(self.name, args, kwargs)
        return Invocation(record["id"], self._client)

    def map(self, items: Iterable[Any], *, return_exceptions: bool = False) -> list[R]:
        """Invoke once per item (as the only argument); the results in order.

        With ``return_exceptions``, a failed item's error takes its place in
        the list instead of being raised.
        """
        return self._many((((item,), {}) for item in items), return_exceptions)

    def starmap(
        self, items: Iterable[Sequence[Any]], *, return_exceptions: bool = False
    ) -> list[R]:
        """Invoke once per tuple of arguments; the results in order."""
        return self._many(((tuple(args), {}) for args in items), return_exceptions)

    def _many(
        self,
        calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
        return_exceptions: bool,
    ) -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        calls = list(calls)
        if not calls:
            return []
        with by_value(self.func):
            ids = self.client.invoke_many(self.name, calls)
        progress = _Progress(len(ids), self.name)
        handles = [Invocation(invocation_id, self._client) for invocation_id in ids]

        def finish(handle: Invocation) -> dict[str, Any]:
            record = handle.wait()
            progress.advance()
            return record

        pool = ThreadPoolExecutor(MAP_WAITERS, thread_name_prefix="conveyor-map")
        try:
            with pool:
                records = list(pool.map(finish, handles))
        finally:
            progress.close()

        results: list[Any] = []
        for record in records:
            try:
                results.append(result_of(record))
            except ConveyorError as exc:
                if not return_exceptions:
                    raise
                results.append(exc)
        return results


@overload
def task(func: Callable[..., R], /) -> Task[R]: ...


@overload
def task(
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    env: Mapping[str, str] | None = None,
    client: Client | None = None,
) -> Callable[[Callable[..., R]], Task[R]]: ...


def task(
    func: Callable[..., R] | None = None,
    /,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    env: Mapping[str, str] | None = None,
    client: Client | None = None,
) -> Task[R] | Callable[[Callable[..., R]], Task[R]]:
    """Make a function deployable: ``@task`` or ``@task(name=..., ...)``.

    The function still runs locally when called; ``.deploy()`` registers it,
    ``.remote()`` runs it on the platform and ``.spawn()`` starts it there.
    """

    def wrap(function: Callable[..., R]) -> Task[R]:
        return Task(
            function,
            name=name,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            env=env,
            client=client,
        )

    return wrap(func) if func is not None else wrap


def _pickle_by_value(func: Callable[..., Any]) -> bytes:
    """The function pickled with what its own module gives it (helpers,
    globals); what it imports from elsewhere is referred to by name."""
    import cloudpickle

    with by_value(func):
        return bytes(cloudpickle.dumps(func))


@contextmanager
def by_value(func: Callable[..., Any]) -> Iterator[None]:
    """Within it, what the function's module defines is pickled by value.

    The platform cannot import the caller's modules, so instances of their
    classes sent as arguments must carry the class along.
    """
    import cloudpickle

    module = sys.modules.get(func.__module__)
    if module is None or func.__module__ == "__main__":
        yield
        return
    name = module.__name__
    with _default_lock:
        counted = True
        if not _by_value_users.get(name):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                # One cloudpickle cannot take by value, or registered by
                # the caller's own code, which then keeps it registered.
                counted = False
        if counted:
            _by_value_users[name] = _by_value_users.get(name, 0) + 1
    if not counted:
        yield
        return
    try:
        yield
    finally:
        with _default_lock:
            _by_value_users[name] -= 1
            if not _by_value_users[name]:
                del _by_value_users[name]
                cloudpickle.unregister_pickle_by_value(module)


def _plain(func: Callable[..., Any]) -> Callable[..., Any]:
    return func


def _module_source(func: Callable[..., Any]) -> str | None:
    """The source of the function's file if it can travel as source, else None."""
    if "<locals>" in func.__qualname__ or func.__module__ == "__main__":
        return None
    module = sys.modules.get(func.__module__)
    if module is None or not getattr(module, "__file__", None):
        return None
    import inspect

    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


class _Progress:
    """A one-line progress bar on stderr when it is a terminal."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._total = total
        self._label = label
        self._done = 0
        self._lock = threading.Lock()
        self._shown = total >= PROGRESS_FROM and self._stream.isatty()
        self._last_draw = 0.0

    def advance(self) -> None:
        if not self._shown:
            return
        with self._lock:
            self._done += 1
            now = time.monotonic()
            if self._done == self._total or now - self._last_draw > 0.1:
                self._last_draw = now
                self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self._done // self._total
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {self._done}/{self._total}")
        self._stream.flush()

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
