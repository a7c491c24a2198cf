"""JSON for documents that carry user data, exact for every value.

orjson is fast but reads integers beyond 64 bits as floats and refuses to
write them, and a user's arguments or result may hold such integers (a big
Fibonacci number, say). Writing tries orjson first and falls back to the
standard library. Reading uses orjson unless the text holds a run of nineteen
or more digits, where an integer might not fit, or orjson refuses it; the
standard library, which is exact, reads those.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Serialise to compact JSON bytes; raises TypeError for non-JSON values."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# orjson reads integers from -2**63 to 2**64 - 1; anything shorter than
# nineteen digits is inside that range.
_LONG_DIGITS = re.compile(rb"[0-9]{19,}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19,}")


def loads(data: bytes | str) -> Any:
    """Parse JSON exactly; raises ValueError when it is not JSON."""
    pattern = _LONG_DIGITS if isinstance(data, bytes) else _LONG_DIGITS_TEXT
    if pattern.search(data) is None:  # type: ignore[arg-type]
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
