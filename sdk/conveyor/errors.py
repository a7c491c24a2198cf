"""The SDK's errors: every one derives from ConveyorError."""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """The root of every error the SDK raises."""


class ConfigurationError(ConveyorError):
    """No gateway URL or API key could be found, or one is malformed."""


class GatewayUnreachable(ConveyorError):
    """The gateway could not be reached, or stopped answering."""


class APIError(ConveyorError):
    """The gateway refused a request; ``status`` and ``code`` say why."""

    def __init__(
        self, status: int, code: str, message: str, request_id: str | None = None
    ) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class AuthenticationError(APIError):
    """The API key is missing, wrong or revoked (401)."""


class PermissionDenied(APIError):
    """The API key lacks the scope the request needs (403)."""


class NotFound(APIError):
    """No such function or invocation for this key's tenant (404)."""


class InvalidRequest(APIError):
    """The gateway refused the request as malformed or too large (4xx)."""


class ServiceUnavailable(APIError):
    """A backend of the platform is down (503); retrying later may work."""


class RemoteError(ConveyorError):
    """The function raised; the message and traceback are the remote ones."""

    def __init__(
        self,
        error_type: str,
        message: str,
        traceback: str = "",
        invocation_id: str | None = None,
    ) -> None:
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.type = error_type
        self.message = message
        self.traceback = traceback
        self.invocation_id = invocation_id

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            return f"{text}\n\nRemote traceback:\n{self.traceback.rstrip()}"
        return text


class InvocationTimeout(ConveyorError):
    """The invocation ran past its time limit, or the caller's wait ran out."""

    def __init__(self, message: str, invocation_id: str | None = None) -> None:
        super().__init__(message)
        self.invocation_id = invocation_id


class InvocationCancelled(ConveyorError):
    """The invocation was cancelled before it ran."""

    def __init__(self, message: str, invocation_id: str | None = None) -> None:
        super().__init__(message)
        self.invocation_id = invocation_id


_BY_STATUS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    503: ServiceUnavailable,
}


def api_error(status: int, body: Any, request_id: str | None = None) -> APIError:
    """The APIError for an error answer of the gateway."""
    code, message = "http_error", ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", code))
        message = str(body["error"].get("message", ""))
        request_id = body.get("request_id", request_id)
    if not message:
        message = f"the gateway answered HTTP {status}"
    kind = _BY_STATUS.get(status)
    if kind is None:
        kind = InvalidRequest if 400 <= status < 500 else APIError
    return kind(status, code, message, request_id)
