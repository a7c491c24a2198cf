"""Building JSON responses without Flask's JSON provider, which is slower."""

from __future__ import annotations

from typing import Any

from flask import Response

from conveyor_core import codec


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    # codec writes integers beyond 64 bits too, which a result may hold.
    return Response(codec.dumps(doc), status, headers, mimetype="application/json")


def no_content() -> Response:
    return Response(status=204)
