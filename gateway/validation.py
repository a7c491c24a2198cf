"""Reading and checking what clients send: bodies, fields, parameters, headers.

Each check raises an ApiError whose message names the value received and
what is accepted instead.
"""

from __future__ import annotations

import ast
import base64
import binascii
import keyword
import math
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import orjson
from flask import request

from conveyor_core import codec
from conveyor_core.records import ALL_SCOPES, State
from conveyor_core.settings import Settings
from gateway.errors import BadRequest, InvalidJson, UnsupportedMediaType

FUNCTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

RESERVED_ENV_PREFIX = "CONVEYOR_"
MAX_ENV_VARS = 64
MAX_ENV_BYTES = 32 * 1024
MIN_MEMORY_MB = 32
MAX_IDEMPOTENCY_KEY_CHARS = 255
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

#: Fields the platform assigns; a body that tries to set one is told so.
ASSIGNED_FIELDS = frozenset(
    {
        "tenant",
        "status",
        "id",
        "version",
        "attempts",
        "created_at",
        "key",
        "key_hash",
        "result",
        "error",
    }
)
FUNCTION_FIELDS = frozenset(
    {"name", "source", "pickle", "entrypoint", "timeout_s", "memory_mb", "env"}
)
CALL_FIELDS = frozenset({"args", "kwargs"})
BATCH_FIELDS = frozenset({"items"})
KEY_FIELDS = frozenset({"tenant", "scopes"})

_STATES = {state.value: state for state in State}

# Any integer orjson cannot hold exactly has at least this many digits.
_LONG_NUMBER = re.compile(rb"\d{19}")

# Compiling user source can warn (an invalid escape, say); the warning is
# about the user's code, not the gateway's, so it is silenced. The filters
# are process-wide, hence one compilation at a time.
_compile_lock = threading.Lock()

_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def show(value: Any, limit: int = 60) -> str:
    """A short repr of a client's value, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Bodies.


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def read_json(*, required: bool) -> dict[str, Any]:
    """The request's JSON object body; an empty body is ``{}`` unless required."""
    if request.content_length and not _is_json(request.mimetype):
        raise _unsupported_media_type()

    data = request.get_data(cache=False)
    if not data:
        if required:
            raise BadRequest(
                "this endpoint needs a JSON object body; send one with "
                "Content-Type: application/json"
            )
        return {}
    if not _is_json(request.mimetype):
        raise _unsupported_media_type()

    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(
            f"the body is not valid JSON ({exc}); send a JSON object"
        ) from None
    if _LONG_NUMBER.search(data):
        # orjson reads integers beyond 64 bits as floats, which would change a
        # caller's arguments; the standard library reads them exactly. orjson
        # has checked the body is strict JSON, so only the numbers differ.
        try:
            doc = codec.loads(data)
        except RecursionError:
            raise BadRequest(
                "the body is nested too deeply; flatten it to a few hundred levels"
            ) from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the body must be a JSON object, got a JSON {json_type(doc)}")
    return doc


def _unsupported_media_type() -> UnsupportedMediaType:
    received = request.content_type or "no Content-Type"
    return UnsupportedMediaType(
        f"the body must be JSON sent with Content-Type: application/json; "
        f"got {show(received)}"
    )


def check_fields(doc: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    """Refuse fields outside ``allowed``, naming them and what is accepted."""
    unknown = doc.keys() - allowed
    if not unknown:
        return

    assigned = sorted(unknown & ASSIGNED_FIELDS)
    if assigned:
        names = ", ".join(repr(name) for name in assigned)
        raise BadRequest(
            f"{names} cannot be set in {where}: the platform assigns it; "
            "remove it from the body"
        )
    names = ", ".join(show(name, 40) for name in sorted(unknown)[:5])
    raise BadRequest(
        f"unknown field {names} in {where}; accepted fields are "
        f"{', '.join(sorted(allowed))}"
    )


# Functions.


@dataclass
class FunctionSpec:
    """A validated function upload."""

    name: str
    source: str
    entrypoint: str
    timeout_s: float
    memory_mb: int
    env: dict[str, str]
    kind: str = "source"


def parse_function(doc: dict[str, Any], settings: Settings) -> FunctionSpec:
    check_fields(doc, FUNCTION_FIELDS, "a function")
    name = doc.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise BadRequest(
            "'name' must be 1 to 63 letters, digits, '_' or '-', starting with a "
            f"letter; got {show(name)}"
        )

    common = {
        "name": name,
        "timeout_s": _timeout_s(doc.get("timeout_s"), settings),
        "memory_mb": _memory_mb(doc.get("memory_mb"), settings),
        "env": _env(doc.get("env")),
    }
    if "pickle" in doc:
        if "source" in doc:
            raise BadRequest(
                "send either 'source' (Python source) or 'pickle' (a pickled "
                "function, base64), not both"
            )
        return FunctionSpec(
            source=_pickle(doc["pickle"]),
            entrypoint=_pickled_entrypoint(doc.get("entrypoint"), name),
            kind="pickle",
            **common,
        )

    source = doc.get("source")
    if not isinstance(source, str) or not source.strip():
        raise BadRequest(
            "'source' must be a non-empty string of Python source; got "
            f"a JSON {json_type(source)}"
            + (" that is empty" if isinstance(source, str) else "")
        )

    entrypoint = _entrypoint(doc.get("entrypoint"), name)
    check_source(source, entrypoint, name)
    return FunctionSpec(source=source, entrypoint=entrypoint, **common)


def _pickle(value: Any) -> str:
    """The base64 text of a pickled function, checked as base64 only.

    The gateway never unpickles: only the function's own process does.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest(
            "'pickle' must be a non-empty base64 string of a pickled function; "
            f"got a JSON {json_type(value)}"
        )
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            "'pickle' is not valid base64; send the pickled function's bytes "
            "base64-encoded"
        ) from None
    return value


def _pickled_entrypoint(value: Any, name: str) -> str:
    """A pickled function is called as it is; the entrypoint only describes it."""
    if value is None:
        return name
    if not isinstance(value, str) or not value or len(value) > 200:
        raise BadRequest(
            "'entrypoint' must be a short string naming the function; got "
            + show(value)
        )
    return value


def _entrypoint(value: Any, name: str) -> str:
    if value is None:
        if name.isidentifier() and not keyword.iskeyword(name):
            return name
        raise BadRequest(
            f"'entrypoint' defaults to the name {name!r}, which is not a Python "
            "identifier; pass 'entrypoint' naming the function to call"
        )
    if (
        not isinstance(value, str)
        or not value.isidentifier()
        or keyword.iskeyword(value)
    ):
        raise BadRequest(
            "'entrypoint' must name a top-level Python function, like 'handler'; "
            f"got {show(value)}"
        )
    return value


def check_source(source: str, entrypoint: str, name: str) -> None:
    """Compile the source, without running it, and find the entry point in it."""
    filename = f"<function {name}>"
    try:
        with _compile_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename)
            compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f" on line {exc.lineno}" if exc.lineno else ""
        raise BadRequest(
            f"the source does not compile: {exc.msg}{where}; fix it and upload again"
        ) from None
    except (RecursionError, MemoryError):
        raise BadRequest(
            "the source is nested too deeply to compile; flatten its deepest "
            "expressions and upload again"
        ) from None
    except ValueError as exc:
        raise BadRequest(
            f"the source does not compile ({exc}); fix it and upload again"
        ) from None

    if not any(_binds(node, entrypoint) for node in tree.body):
        raise BadRequest(
            f"the source defines no top-level {entrypoint!r}; define it there with "
            "def, async def, class or an assignment, or set 'entrypoint' to the "
            "name it has"
        )


def _binds(node: ast.stmt, name: str) -> bool:
    """Whether a top-level statement binds ``name`` in the module."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(_target_binds(target, name) for target in node.targets)
    if isinstance(node, ast.AnnAssign):
        return node.value is not None and _target_binds(node.target, name)
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        # An imported callable is as good an entry point as a defined one.
        return any(
            (alias.asname or alias.name.split(".")[0]) == name for alias in node.names
        )
    return False


def _target_binds(target: ast.expr, name: str) -> bool:
    if isinstance(target, ast.Name):
        return target.id == name
    if isinstance(target, (ast.Tuple, ast.List)):
        return any(_target_binds(element, name) for element in target.elts)
    if isinstance(target, ast.Starred):
        return _target_binds(target.value, name)
    return False


def _timeout_s(value: Any, settings: Settings) -> float:
    if value is None:
        return float(settings.default_timeout_s)
    if (
        type(value) not in (int, float)
        or not math.isfinite(value)
        or not 0 < value <= settings.max_timeout_s
    ):
        raise BadRequest(
            "'timeout_s' must be a number of seconds above 0 and at most "
            f"{settings.max_timeout_s:g}; got {show(value)}"
        )
    return float(value)


def _memory_mb(value: Any, settings: Settings) -> int:
    if value is None:
        return settings.default_memory_mb
    if type(value) is not int or not MIN_MEMORY_MB <= value <= settings.max_memory_mb:
        raise BadRequest(
            f"'memory_mb' must be a whole number from {MIN_MEMORY_MB} to "
            f"{settings.max_memory_mb}; got {show(value)}"
        )
    return value


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(
            "'env' must be an object of names to strings; got a JSON "
            f"{json_type(value)}"
        )
    if len(value) > MAX_ENV_VARS:
        raise BadRequest(
            f"'env' has {len(value)} variables; at most {MAX_ENV_VARS} are allowed"
        )

    size = 0
    for name, text in value.items():
        if not ENV_NAME.fullmatch(name):
            raise BadRequest(
                f"env name {show(name)} is not valid; use letters, digits and '_', "
                "not starting with a digit, at most 128 characters"
            )
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            raise BadRequest(
                f"env name {name!r} is reserved: names starting with "
                f"{RESERVED_ENV_PREFIX} belong to the platform; rename it"
            )
        if not isinstance(text, str) or "\0" in text:
            raise BadRequest(
                f"env {name!r} must be a string without NUL characters; got "
                f"{show(text)}"
            )
        size += len(name) + len(text.encode())
    if size > MAX_ENV_BYTES:
        raise BadRequest(
            f"'env' holds {size} bytes of names and values; at most "
            f"{MAX_ENV_BYTES} are allowed"
        )
    return value


# Invocations.


def parse_call(doc: dict[str, Any], where: str = "the body") -> bytes:
    """The ``{"args", "kwargs"}`` payload, as the JSON the runtime receives."""
    if doc.keys() - CALL_FIELDS:
        check_fields(doc, CALL_FIELDS, where)
    args = doc.get("args")
    if args is None:
        args = []
    elif not isinstance(args, list):
        raise BadRequest(
            f"'args' in {where} must be a JSON array; got a JSON {json_type(args)}"
        )
    kwargs = doc.get("kwargs")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, dict):
        raise BadRequest(
            f"'kwargs' in {where} must be a JSON object; got a JSON {json_type(kwargs)}"
        )
    return codec.dumps({"args": args, "kwargs": kwargs})


def parse_batch(doc: dict[str, Any], max_batch: int) -> list[bytes]:
    check_fields(doc, BATCH_FIELDS, "a batch")
    items = doc.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= max_batch:
        received = (
            f"{len(items)} items"
            if isinstance(items, list)
            else f"a JSON {json_type(items)}"
        )
        raise BadRequest(
            f"'items' must be an array of 1 to {max_batch} calls; got {received}"
        )

    payloads = []
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(
                f"{where} must be an object with 'args' and 'kwargs'; got a JSON "
                f"{json_type(item)}"
            )
        payloads.append(parse_call(item, where))
    return payloads


def idempotency_key() -> str | None:
    value: str | None = request.environ.get("HTTP_IDEMPOTENCY_KEY")
    if not value:
        return None
    if len(value) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise BadRequest(
            f"the Idempotency-Key header has {len(value)} characters; at most "
            f"{MAX_IDEMPOTENCY_KEY_CHARS} are allowed"
        )
    return value


def prefer_wait(max_wait_s: float) -> float | None:
    """Seconds of the ``Prefer: wait=N`` preference (RFC 7240), capped, or None.

    As RFC 7240 asks, a preference that cannot be understood is ignored, not
    refused; only its first instance counts. The WSGI server joins repeated
    Prefer headers with commas, so one environ look-up sees them all.
    """
    header = request.environ.get("HTTP_PREFER")
    if not header:
        return None
    for preference in header.split(","):
        token = preference.split(";", 1)[0]
        name, _, raw = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            wait_s = float(raw.strip().strip('"'))
        except ValueError:
            return None
        if not math.isfinite(wait_s) or wait_s <= 0:
            return None
        return min(wait_s, max_wait_s)
    return None


def format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


# Query parameters.


def wait_param(raw: str | None, max_wait_s: float) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = math.nan
    if not math.isfinite(wait_s) or wait_s < 0:
        raise BadRequest(
            f"'wait' must be a number of seconds from 0 to {max_wait_s:g}; "
            f"got {show(raw)}"
        )
    return min(wait_s, max_wait_s)


def _is_number(raw: str) -> bool:
    """Whether ``raw`` is a short run of ASCII digits that int() can take."""
    return len(raw) <= 9 and raw.isascii() and raw.isdigit()


def limit_param(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_PAGE_SIZE
    if not _is_number(raw) or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise BadRequest(
            f"'limit' must be a whole number from 1 to {MAX_PAGE_SIZE}; got {show(raw)}"
        )
    return int(raw)


def version_param(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not _is_number(raw) or int(raw) < 1:
        raise BadRequest(
            f"'version' must be a version number, 1 or more; got {show(raw)}"
        )
    return int(raw)


def status_param(raw: str | None) -> State | None:
    if raw is None or raw == "":
        return None
    state = _STATES.get(raw)
    if state is None:
        raise BadRequest(
            f"'status' {show(raw)} is not a state; use one of {', '.join(_STATES)}"
        )
    return state


# Keys.


def parse_tenant(value: Any, field: str = "'tenant'") -> str:
    if not isinstance(value, str) or not TENANT_NAME.fullmatch(value):
        raise BadRequest(
            f"{field} must be 1 to 63 lowercase letters, digits, '_' or '-', "
            f"starting with a letter or digit; got {show(value)}"
        )
    return value


def parse_scopes(value: Any) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or any(scope not in ALL_SCOPES for scope in value)
    ):
        raise BadRequest(
            f"'scopes' must be a non-empty array of {', '.join(ALL_SCOPES)}; "
            f"got {show(value)}"
        )
    return list(dict.fromkeys(value))
