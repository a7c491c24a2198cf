"""How arguments and results travel: plain JSON as JSON, the rest pickled.

Plain JSON is a dict with string keys, a list, a string, a finite number, a
boolean or None, nested; such a value travels as itself, so HTTP callers and
SDK callers see the same data. Anything else (a tuple, a datetime, a
dataclass, an array) travels as ``{"__conveyor_pickle__": "<base64>"}``,
pickled with cloudpickle and unpickled only inside the function's process
and, for results, here on the caller's side.
"""

from __future__ import annotations

import base64
import pickle
from typing import Any

import cloudpickle

PICKLE_KEY = "__conveyor_pickle__"
MAX_DEPTH = 100


def is_plain_json(value: Any, depth: int = 0) -> bool:
    """Whether JSON carries the value exactly."""
    if depth > MAX_DEPTH:
        return False
    kind = type(value)
    if value is None or kind in (str, bool, int):
        return True
    if kind is float:
        return value == value and value not in (float("inf"), float("-inf"))
    if kind is list:
        return all(is_plain_json(item, depth + 1) for item in value)
    if kind is dict:
        return all(
            type(key) is str and is_plain_json(item, depth + 1)
            for key, item in value.items()
        )
    return False


def encode(value: Any) -> Any:
    """The value as it travels: itself if plain JSON, else its pickle."""
    if is_plain_json(value):
        return value
    return {PICKLE_KEY: base64.b64encode(cloudpickle.dumps(value)).decode("ascii")}


def decode(value: Any) -> Any:
    """What a travelled value stands for, unpickling a pickled one."""
    if isinstance(value, dict) and len(value) == 1 and PICKLE_KEY in value:
        return pickle.loads(base64.b64decode(value[PICKLE_KEY]))
    return value


def call_body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of one call."""
    return {
        "args": [encode(arg) for arg in args],
        "kwargs": {name: encode(arg) for name, arg in kwargs.items()},
    }
