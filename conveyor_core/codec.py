"""JSON for documents that carry user data, exact for every value.

orjson is fast but reads integers beyond 64 bits as floats and refuses to
write them, and a user's arguments or result may hold such integers (a big
Fibonacci number, say). Writing tries orjson first and falls back to the
standard library; reading uses the standard library, which is exact.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Serialise to compact JSON bytes; raises TypeError for non-JSON values."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON exactly; raises ValueError when it is not JSON."""
    return json.loads(data)
