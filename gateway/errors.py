"""The gateway's error answers: one exception per HTTP error, one JSON shape.

Every error leaves as ``{"error": {"code", "message"}, "request_id"}`` with a
stable code; only a fault of the platform itself becomes a 500, and its
traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from conveyor_core.errors import (
    BackendUnavailable,
    BrokerUnavailable,
    CacheUnavailable,
    ConveyorError,
    InvalidTransition,
    NotFound,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

#: Seconds a client is asked to wait before retrying after a 503.
RETRY_AFTER_S = 2

_WWW_AUTHENTICATE = 'Bearer realm="conveyor"'

# Werkzeug raises these for routing and body limits; each gets our stable code.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


class ApiError(ConveyorError):
    """Raised by a request handler to answer the client with a JSON error."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequest(ApiError):
    """Raised when a field, parameter or header has a wrong type or value."""


class InvalidJson(ApiError):
    """Raised when the body is not parseable JSON."""

    code = "invalid_json"


class Unauthorized(ApiError):
    """Raised when the API key is missing, malformed, unknown or revoked."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        challenge = _WWW_AUTHENTICATE
        if invalid_token:
            challenge += ', error="invalid_token"'
        super().__init__(message, {"WWW-Authenticate": challenge})


class Forbidden(ApiError):
    """Raised when the API key lacks the scope the endpoint needs."""

    status = 403
    code = "forbidden"


class ResourceNotFound(ApiError):
    """Raised when the addressed resource does not exist for the tenant."""

    status = 404
    code = "not_found"


class Conflict(ApiError):
    """Raised when the resource is in a state that forbids the request."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    """Raised when the body is larger than the configured limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    """Raised when a body is sent with a content type other than JSON."""

    status = 415
    code = "unsupported_media_type"


class Unavailable(ApiError):
    """Raised when a backend the request needs cannot be reached."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"Retry-After": str(RETRY_AFTER_S)})


def error_response(
    status: int, code: str, message: str, headers: dict[str, Any] | None = None
) -> Response:
    """The JSON error body every failing request answers with."""
    body = orjson.dumps(
        {
            "error": {"code": code, "message": message},
            "request_id": g.get("request_id"),
        }
    )
    return Response(body, status, headers, mimetype="application/json")


def register_error_handlers(app: Flask) -> None:
    """Turn every exception a request can raise into a JSON error."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(NotFound, _not_found)
    app.register_error_handler(InvalidTransition, _invalid_transition)
    app.register_error_handler(BackendUnavailable, _backend_unavailable)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _internal_error)


def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def _not_found(exc: NotFound) -> Response:
    return error_response(404, "not_found", str(exc))


def _invalid_transition(exc: InvalidTransition) -> Response:
    return error_response(409, "conflict", str(exc))


def backend_name(exc: BackendUnavailable) -> str:
    if isinstance(exc, StoreUnavailable):
        return "store"
    if isinstance(exc, BrokerUnavailable):
        return "broker"
    if isinstance(exc, CacheUnavailable):
        return "cache"
    return "backend"


def _backend_unavailable(exc: BackendUnavailable) -> Response:
    backend = backend_name(exc)
    logger.warning(
        "%s unavailable during %s %s: %s",
        backend,
        request.method,
        request.path,
        exc,
        extra={
            "request_id": g.get("request_id"),
            "tenant": g.get("tenant"),
            "backend": backend,
        },
    )
    message = f"the {backend} is unavailable ({exc}); retry in {RETRY_AFTER_S} s"
    return error_response(
        503, "unavailable", message, {"Retry-After": str(RETRY_AFTER_S)}
    )


def _http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal")
    headers: dict[str, Any] = {}

    if status == 404:
        message = (
            f"no endpoint at {request.path}; the API is described at /openapi.json"
        )
    elif status == 405:
        allowed = sorted(getattr(exc, "valid_methods", None) or [])
        headers["Allow"] = ", ".join(allowed)
        message = (
            f"{request.method} is not allowed on {request.path}; "
            f"use one of {', '.join(allowed)}"
        )
    elif status == 413:
        limit = request.max_content_length
        message = (
            f"the body is larger than the limit of {limit} bytes; send less, "
            "or split a batch into smaller ones"
        )
    else:
        message = exc.description or exc.name
    return error_response(status, code, message, headers)


def _internal_error(exc: Exception) -> Response:
    logger.error(
        "internal error on %s %s",
        request.method,
        request.path,
        exc_info=exc,
        extra={"request_id": g.get("request_id"), "tenant": g.get("tenant")},
    )
    message = (
        "the gateway failed on its side; retry later, and quote the request id "
        "if it keeps failing"
    )
    return error_response(500, "internal", message)
