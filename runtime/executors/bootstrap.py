"""The program each warm process runs: load one function, then serve its calls.

It is started as ``python -I -S bootstrap.py REQUEST_FD REPLY_FD [PATHS]``,
PATHS being more import directories joined by os.pathsep, and imports
nothing outside the standard library, so it runs unchanged inside a sandbox
with a read-only tree. The worker imports it only for the protocol constants.

In a container, which inherits no descriptors from the worker, it is started
as ``python -I -S bootstrap.py --receive SOCKET [PATHS]`` instead: it
connects to the Unix socket SOCKET and receives the request, reply and
output descriptors over it (SCM_RIGHTS), the output one becoming its fds 1
and 2.

Every message on the two pipes is a frame: an 8-byte prefix holding the
lengths of a JSON header and of a body (two big-endian uint32), then the
header, then the body.

- The first request is the init frame: ``{"name", "entrypoint", "kind"}``
  with the function as body: Python source for kind ``source`` (loaded as a
  module whose ``entrypoint`` is called), or a pickled callable for kind
  ``pickle``. The worker sends it only after it has set the process's
  resource limits, so no code of the function ever runs without them.
- Each further request is ``{"id", "marker"}`` with the JSON payload
  ``{"args": [...], "kwargs": {...}}`` as body.
- Each reply is ``{"id", "ok": true}`` with the result's JSON as body, or
  ``{"id", "ok": false, "error": {"type", "message", "traceback"}}`` with an
  empty body. Before replying, the process flushes its output and writes the
  request's marker to fd 1, which tells the worker where that invocation's
  output ends.

Values that JSON cannot carry exactly travel pickled: an argument, or the
result, of ``{"__conveyor_pickle__": "<base64>"}`` is the pickle in it. Such
bytes are only ever unpickled here, inside the function's process. Plain JSON
is a dict with string keys, a list, a string, a finite number, a boolean or
None, nested; anything else, a tuple included, is pickled.
"""

from __future__ import annotations

import io
import json
import os
import sys
import types
from collections.abc import Callable

PREFIX_BYTES = 8

# When even the report of a MemoryError cannot be built, the process exits
# with this code so that the worker can still name the cause.
EXIT_OUT_OF_MEMORY = 113

# Longest message or traceback sent back, in characters; the header of a
# reply must stay far below the worker's cap on it even when JSON-escaped.
MAX_ERROR_CHARS = 32 * 1024

# Freed when the function runs out of memory, so that the report of it can
# still be built.
RESERVE_BYTES = 1024 * 1024
_reserve: list[bytearray] = []

MODULE_NAME = "conveyor_function"

PICKLE_KEY = "__conveyor_pickle__"


def encode_frame(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "big") + len(body).to_bytes(4, "big") + head + body


def decode_prefix(prefix: bytes) -> tuple[int, int]:
    return int.from_bytes(prefix[:4], "big"), int.from_bytes(prefix[4:8], "big")


class Function:
    """The loaded entrypoint of one function version, or why it failed to load."""

    def __init__(self, name: str, entrypoint: str, kind: str, body: bytes) -> None:
        self.filename = f"<{name}>.py"
        self.source = body.decode("utf-8", "surrogatepass") if kind == "source" else ""
        self.call: Callable[..., object] | None = None
        self.load_error: dict | None = None
        try:
            if kind == "pickle":
                self.call = self._unpickle(body)
            else:
                self.call = self._load(entrypoint)
        except BaseException as exc:
            # Whatever the source raises, SystemExit included, is the
            # function's failure and the answer to each of its invocations.
            self.load_error = describe(exc, self)

    def _load(self, entrypoint: str) -> Callable[..., object]:
        code = compile(self.source, self.filename, "exec", dont_inherit=True)

        # A module object of its own, registered so that code relying on
        # sys.modules[__module__] (dataclasses, pickle) finds it.
        module = types.ModuleType(MODULE_NAME)
        sys.modules[MODULE_NAME] = module
        exec(code, module.__dict__)

        try:
            # Instances of the module's classes are then pickled with their
            # class, which the caller's side cannot import by name.
            import cloudpickle

            cloudpickle.register_pickle_by_value(module)
        except ImportError:
            pass

        call = module.__dict__.get(entrypoint)
        if call is None:
            raise EntrypointNotFound(
                f"the source defines no {entrypoint!r}; the entrypoint must name "
                "a function defined at the top level of the source"
            )
        if not callable(call):
            raise EntrypointNotFound(
                f"{entrypoint!r} is a {type(call).__name__}, not a function; "
                "the entrypoint must name a function"
            )
        return call

    @staticmethod
    def _unpickle(body: bytes) -> Callable[..., object]:
        call = unpickle(body)
        if not callable(call):
            raise EntrypointNotFound(
                f"the pickled function is a {type(call).__name__}, not a function"
            )
        return call


def unpickle(data: bytes) -> object:
    import pickle

    try:
        # Pickles of functions and classes defined by value refer to it.
        import cloudpickle  # noqa: F401
    except ImportError:
        pass
    return pickle.loads(data)


def decode_value(value: object) -> object:
    """The value an argument stands for: itself, or what its pickle holds."""
    if isinstance(value, dict) and len(value) == 1 and PICKLE_KEY in value:
        import base64

        data = value[PICKLE_KEY]
        if not isinstance(data, str):
            raise TypeError(f"{PICKLE_KEY} must hold a base64 string")
        return unpickle(base64.b64decode(data, validate=True))
    return value


def is_plain_json(value: object, depth: int = 0) -> bool:
    """Whether JSON carries the value exactly (see the module's docstring)."""
    if depth > 100:
        return False
    if value is None or isinstance(value, (str, bool, int)):
        return type(value) in (str, bool, int, type(None))
    if type(value) is float:
        return value == value and value not in (float("inf"), float("-inf"))
    if type(value) is list:
        return all(is_plain_json(item, depth + 1) for item in value)
    if type(value) is dict:
        return all(
            type(key) is str and is_plain_json(item, depth + 1)
            for key, item in value.items()
        )
    return False


class EntrypointNotFound(Exception):
    """Raised when the source loads but defines no callable entrypoint."""


def describe(exc: BaseException, function: Function) -> dict:
    """The error report of an exception, with the traceback of the user's code."""
    import traceback

    _register_source(function)

    # Frames of this program (and of asyncio) come before the user's first
    # frame; they say nothing to the function's author.
    tb = exc.__traceback__
    while tb is not None and _is_platform_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {
        "type": type(exc).__name__,
        "message": _clip(_message(exc)),
        "traceback": _clip(text, keep_end=True),
    }


def _is_platform_frame(filename: str) -> bool:
    if filename == __file__ or filename.startswith("<frozen "):
        return True
    return os.sep + "asyncio" + os.sep in filename


def _register_source(function: Function) -> None:
    # The source is no file on disk; without this the traceback shows line
    # numbers but not the lines themselves.
    import linecache

    if not function.source:
        return
    lines = function.source.splitlines(keepends=True)
    linecache.cache[function.filename] = (
        len(function.source),
        None,
        lines,
        function.filename,
    )


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        # A broken __str__ must not cost the rest of the report.
        return f"<unprintable {type(exc).__name__}>"


def _clip(text: str, keep_end: bool = False) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    note = f"[{len(text) - MAX_ERROR_CHARS} characters cut]"
    if keep_end:
        return note + "\n" + text[-MAX_ERROR_CHARS:]
    return text[:MAX_ERROR_CHARS] + " " + note


def invoke(function: Function, payload: bytes) -> tuple[dict, bytes]:
    """Call the function on one payload; the reply's header fields and body."""
    call = function.call
    if call is None:
        return {"ok": False, "error": function.load_error}, b""
    try:
        request = json.loads(payload)
        args = request.get("args", []) if isinstance(request, dict) else None
        kwargs = request.get("kwargs", {}) if isinstance(request, dict) else None
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError(
                "the payload must be a JSON object with a list 'args' and an "
                f"object 'kwargs', got {payload[:100]!r}"
            )
        args = [decode_value(arg) for arg in args]
        kwargs = {key: decode_value(arg) for key, arg in kwargs.items()}
        result = call(*args, **kwargs)
        # Checked on the returned value rather than on the function, so that
        # a decorated coroutine function is awaited as well.
        if isinstance(result, types.CoroutineType):
            import asyncio

            result = asyncio.run(result)
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            _reserve.clear()
        return {"ok": False, "error": describe(exc, function)}, b""
    return _encode_result(result)


def _encode_result(result: object) -> tuple[dict, bytes]:
    try:
        if is_plain_json(result):
            body = json.dumps(result, separators=(",", ":"))
        else:
            body = json.dumps({PICKLE_KEY: _pickle(result)})
    except Exception as exc:
        error = {
            "type": "TypeError",
            "message": _clip(
                "the function's result is neither plain JSON nor picklable: "
                f"{type(exc).__name__}: {_message(exc)}"
            ),
            "traceback": "",
        }
        return {"ok": False, "error": error}, b""
    return {"ok": True}, body.encode()


def _pickle(value: object) -> str:
    import base64

    try:
        import cloudpickle

        data = cloudpickle.dumps(value)
    except ImportError:
        import pickle

        data = pickle.dumps(value)
    return base64.b64encode(data).decode("ascii")


def finish_output(fd: int, marker: bytes) -> None:
    """Flush what the function printed, then mark the end of its output."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            # A stream the function closed or replaced loses only its own
            # bytes; the marker below must still be written.
            continue
    try:
        os.write(fd, marker)
    except OSError:
        # The function closed or replaced fd 1; the worker notices the
        # missing marker and retires this process.
        pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(requests: io.BufferedReader, reply_fd: int) -> None:
    """Load the function from the init frame, then answer requests until EOF."""
    init = read_frame(requests)
    if init is None:
        return
    header, body = init
    function = Function(
        header["name"], header["entrypoint"], header.get("kind", "source"), body
    )
    _reserve.append(bytearray(RESERVE_BYTES))

    while True:
        frame = read_frame(requests)
        if frame is None:
            return
        header, payload = frame
        try:
            reply, body = invoke(function, payload)
        except MemoryError:
            # Raised again while the report was built: send the least that
            # still names the cause.
            _reserve.clear()
            reply, body = {"ok": False, "error": {"type": "MemoryError"}}, b""
        reply["id"] = header["id"]
        finish_output(1, header["marker"].encode())
        write_all(reply_fd, encode_frame(reply, body))


def read_frame(stream: io.BufferedReader) -> tuple[dict, bytes] | None:
    prefix = stream.read(PREFIX_BYTES)
    if len(prefix) < PREFIX_BYTES:
        return None
    header_len, body_len = decode_prefix(prefix)
    header = json.loads(stream.read(header_len))
    body = stream.read(body_len)
    if len(body) < body_len:
        return None
    return header, body


def receive_descriptors(path: str) -> tuple[int, int]:
    """Take the request and reply descriptors, and the output as fds 1 and 2,
    from the worker listening on the Unix socket ``path``."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
        channel.connect(path)
        _, fds, _, _ = socket.recv_fds(channel, 1, 3)
    if len(fds) != 3:
        raise SystemExit(f"bootstrap: expected 3 descriptors on {path}, got {fds}")
    request_fd, reply_fd, output_fd = fds
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    return request_fd, reply_fd


def main(argv: list[str]) -> int:
    if argv[1] == "--receive":
        request_fd, reply_fd = receive_descriptors(argv[2])
    else:
        request_fd, reply_fd = int(argv[1]), int(argv[2])
    sys.argv = [argv[0]]
    _add_site_packages()
    # Where the worker found the SDK, for code that imports conveyor (its
    # @task decorator) when it is not installed in site-packages.
    for path in argv[3].split(os.pathsep) if len(argv) > 3 else ():
        if path and path not in sys.path:
            sys.path.append(path)

    # Line buffering keeps what the function prints on stdout and stderr in
    # the order it printed it, since both share one pipe.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)

    with open(request_fd, "rb") as requests:
        try:
            serve(requests, reply_fd)
        except MemoryError:
            os._exit(EXIT_OUT_OF_MEMORY)
    return 0


def _add_site_packages() -> None:
    # The interpreter starts with -S: processing the .pth files of
    # site-packages costs more than the rest of the start-up and runs code
    # of the host. The packages themselves stay importable.
    import site

    for path in site.getsitepackages():
        if path not in sys.path and os.path.isdir(path):
            sys.path.append(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
