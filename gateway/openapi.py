"""The OpenAPI 3.1 document of the gateway's HTTP API, written by hand."""

from __future__ import annotations

from typing import Any

from conveyor_core.records import ALL_SCOPES, State
from conveyor_core.settings import Settings
from gateway.validation import (
    DEFAULT_PAGE_SIZE,
    MAX_ENV_VARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_PAGE_SIZE,
    MIN_MEMORY_MB,
)

Doc = dict[str, Any]

_TIMESTAMP: Doc = {"type": ["string", "null"], "format": "date-time"}
_ANY_JSON: Doc = {}


def _ref(name: str) -> Doc:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Doc, description: str) -> Doc:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _errors(*statuses: int) -> Doc:
    return {
        str(status): {"$ref": f"#/components/responses/{_ERRORS[status][0]}"}
        for status in statuses
    }


def _body(schema: Doc, required: bool = True) -> Doc:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str, description: str) -> Doc:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, description: str, schema: Doc) -> Doc:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Bad input: malformed JSON, a wrong type or an unknown field."),
    401: ("Unauthorized", "No API key, a malformed one, or an unknown or revoked key."),
    403: ("Forbidden", "The key lacks the scope the endpoint needs."),
    404: ("NotFound", "No such resource for the key's tenant."),
    409: ("Conflict", "The resource's state forbids the request."),
    413: ("PayloadTooLarge", "The body is larger than the configured limit."),
    415: ("UnsupportedMediaType", "A body was sent that is not application/json."),
    503: ("Unavailable", "A backend is down; retry after the Retry-After delay."),
}

_AUTHED = (400, 401, 403, 503)


def _schemas(settings: Settings) -> Doc:
    states = [state.value for state in State]
    return {
        "Error": {
            "type": "object",
            "required": ["error", "request_id"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {
                            "type": "string",
                            "enum": [
                                "bad_request",
                                "invalid_json",
                                "unauthorized",
                                "forbidden",
                                "not_found",
                                "method_not_allowed",
                                "conflict",
                                "payload_too_large",
                                "unsupported_media_type",
                                "unavailable",
                                "internal",
                            ],
                        },
                        "message": {"type": "string"},
                    },
                },
                "request_id": {"type": "string"},
            },
        },
        "NewKey": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scopes"],
            "properties": {
                "tenant": {
                    "type": "string",
                    "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$",
                    "description": "Defaults to the caller's tenant.",
                },
                "scopes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "enum": list(ALL_SCOPES)},
                },
            },
        },
        "KeyCreated": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "key": {
                    "type": "string",
                    "description": "The secret, shown only once.",
                },
                "tenant": {"type": "string"},
                "scopes": {"type": "array", "items": {"type": "string"}},
            },
        },
        "ApiKey": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "tenant": {"type": "string"},
                "scopes": {"type": "array", "items": {"type": "string"}},
                "created_at": _TIMESTAMP,
                "revoked": {"type": "boolean"},
            },
        },
        "FunctionUpload": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "oneOf": [{"required": ["source"]}, {"required": ["pickle"]}],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_-]{0,62}$"},
                "source": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Python source defining the entry point.",
                },
                "pickle": {
                    "type": "string",
                    "minLength": 1,
                    "contentEncoding": "base64",
                    "description": (
                        "A pickled callable (cloudpickle), base64; unpickled "
                        "only inside the function's process."
                    ),
                },
                "entrypoint": {
                    "type": "string",
                    "description": "The callable to run; defaults to the name.",
                },
                "timeout_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": settings.max_timeout_s,
                    "default": settings.default_timeout_s,
                },
                "memory_mb": {
                    "type": "integer",
                    "minimum": MIN_MEMORY_MB,
                    "maximum": settings.max_memory_mb,
                    "default": settings.default_memory_mb,
                },
                "env": {
                    "type": "object",
                    "maxProperties": MAX_ENV_VARS,
                    "additionalProperties": {"type": "string"},
                    "description": "Variables; no name may start with CONVEYOR_.",
                },
            },
        },
        "FunctionCreated": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "version": {"type": "integer"}},
        },
        "FunctionVersion": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "integer"},
                "entrypoint": {"type": "string"},
                "kind": {"type": "string", "enum": ["source", "pickle"]},
                "timeout_s": {"type": "number"},
                "memory_mb": {"type": "integer"},
                "env": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "The names of the environment variables.",
                },
                "created_at": _TIMESTAMP,
                "versions": {
                    "type": "integer",
                    "description": "How many versions exist.",
                },
            },
        },
        "Call": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "args": {"type": "array", "items": _ANY_JSON, "default": []},
                "kwargs": {"type": "object", "default": {}},
            },
        },
        "Batch": {
            "type": "object",
            "additionalProperties": False,
            "required": ["items"],
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_batch,
                    "items": _ref("Call"),
                }
            },
        },
        "Accepted": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "status": {"type": "string", "enum": states},
            },
        },
        "BatchAccepted": {
            "type": "object",
            "properties": {"invocations": {"type": "array", "items": _ref("Accepted")}},
        },
        "Invocation": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "function": {"type": "string"},
                "version": {"type": "integer"},
                "status": {"type": "string", "enum": states},
                "result": _ANY_JSON,
                "error": {"type": ["object", "null"]},
                "attempts": {"type": "integer"},
                "attempt_log": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "number": {"type": "integer"},
                            "worker": {"type": "string"},
                            "started_at": _TIMESTAMP,
                            "finished_at": _TIMESTAMP,
                            "status": {"type": ["string", "null"]},
                        },
                    },
                },
                "created_at": _TIMESTAMP,
                "started_at": _TIMESTAMP,
                "finished_at": _TIMESTAMP,
                "duration_ms": {"type": ["number", "null"]},
                "logs_truncated": {"type": "boolean"},
            },
        },
        "InvocationPage": {
            "type": "object",
            "properties": {
                "invocations": {"type": "array", "items": _ref("Invocation")},
                "next": {
                    "type": ["string", "null"],
                    "description": "The next page's 'before'; null at the end.",
                },
            },
        },
        "Logs": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "logs": {"type": "string"},
                "truncated": {"type": "boolean"},
            },
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "backends": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "string",
                        "enum": ["ok", "unavailable"],
                    },
                },
            },
        },
    }


def _paths(settings: Settings) -> Doc:
    name = _path_param("name", "The function's name.")
    invocation_id = _path_param("invocation_id", "The invocation's id.")
    tenant = _query(
        "tenant", "The tenant; defaults to the caller's.", {"type": "string"}
    )
    wait_header = {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": (
            "RFC 7240 'wait=N': answer 200 with the finished invocation if it "
            f"finishes within N seconds (at most {settings.max_wait_s:g}), else 202."
        ),
        "schema": {"type": "string", "examples": ["wait=10"]},
    }
    idempotency = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": (
            "A retry with the same key returns the earlier invocation instead of "
            "enqueuing a new one; for a batch, item i uses the key suffixed '#i'."
        ),
        "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
    }
    accepted_headers = {"Preference-Applied": {"schema": {"type": "string"}}}

    return {
        "/v1/keys": {
            "post": {
                "operationId": "createKey",
                "summary": "Create an API key (admin).",
                "tags": ["keys"],
                "requestBody": _body(_ref("NewKey")),
                "responses": {
                    "201": _json(_ref("KeyCreated"), "The key, with its secret."),
                    **_errors(*_AUTHED, 413, 415),
                },
            },
            "get": {
                "operationId": "listKeys",
                "summary": "List a tenant's API keys (admin).",
                "tags": ["keys"],
                "parameters": [tenant],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "keys": {"type": "array", "items": _ref("ApiKey")}
                            },
                        },
                        "The keys, revoked ones included.",
                    ),
                    **_errors(*_AUTHED),
                },
            },
        },
        "/v1/keys/{key_id}": {
            "delete": {
                "operationId": "revokeKey",
                "summary": "Revoke an API key (admin).",
                "tags": ["keys"],
                "parameters": [_path_param("key_id", "The key's id."), tenant],
                "responses": {
                    "204": {"description": "Revoked."},
                    **_errors(*_AUTHED, 404),
                },
            }
        },
        "/v1/functions": {
            "post": {
                "operationId": "registerFunction",
                "summary": "Register a function, or a new version of it (deploy).",
                "tags": ["functions"],
                "requestBody": _body(_ref("FunctionUpload")),
                "responses": {
                    "201": _json(_ref("FunctionCreated"), "The new version."),
                    **_errors(*_AUTHED, 413, 415),
                },
            },
            "get": {
                "operationId": "listFunctions",
                "summary": "List the tenant's functions (read).",
                "tags": ["functions"],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "functions": {
                                    "type": "array",
                                    "items": _ref("FunctionVersion"),
                                }
                            },
                        },
                        "Each function's latest version and version count.",
                    ),
                    **_errors(401, 403, 503),
                },
            },
        },
        "/v1/functions/{name}": {
            "get": {
                "operationId": "getFunction",
                "summary": "Describe a function version, the latest by default (read).",
                "tags": ["functions"],
                "parameters": [
                    name,
                    _query(
                        "version",
                        "A version number.",
                        {"type": "integer", "minimum": 1},
                    ),
                ],
                "responses": {
                    "200": _json(_ref("FunctionVersion"), "The version."),
                    **_errors(*_AUTHED, 404),
                },
            },
            "delete": {
                "operationId": "deleteFunction",
                "summary": "Delete a function and all its versions (deploy).",
                "tags": ["functions"],
                "parameters": [name],
                "responses": {
                    "204": {"description": "Deleted."},
                    **_errors(*_AUTHED, 404),
                },
            },
        },
        "/v1/functions/{name}/invocations": {
            "post": {
                "operationId": "invoke",
                "summary": "Invoke the latest version of a function (invoke).",
                "tags": ["invocations"],
                "parameters": [name, wait_header, idempotency],
                "requestBody": _body(_ref("Call"), required=False),
                "responses": {
                    "200": _json(_ref("Invocation"), "Finished within the wait."),
                    "202": {
                        **_json(_ref("Accepted"), "Queued (or still running)."),
                        "headers": accepted_headers,
                    },
                    **_errors(*_AUTHED, 404, 413, 415),
                },
            }
        },
        "/v1/functions/{name}/invocations/batch": {
            "post": {
                "operationId": "invokeBatch",
                "summary": "Invoke a function many times at once (invoke).",
                "tags": ["invocations"],
                "parameters": [name, idempotency],
                "requestBody": _body(_ref("Batch")),
                "responses": {
                    "202": _json(_ref("BatchAccepted"), "All queued, in order."),
                    **_errors(*_AUTHED, 404, 413, 415),
                },
            }
        },
        "/v1/invocations": {
            "get": {
                "operationId": "listInvocations",
                "summary": "List invocations, newest first (read).",
                "tags": ["invocations"],
                "parameters": [
                    _query("function", "Only this function's.", {"type": "string"}),
                    _query(
                        "status",
                        "Only those in this state.",
                        {"type": "string", "enum": [state.value for state in State]},
                    ),
                    _query(
                        "limit",
                        "Page size.",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_PAGE_SIZE,
                            "default": DEFAULT_PAGE_SIZE,
                        },
                    ),
                    _query(
                        "before", "The 'next' of the previous page.", {"type": "string"}
                    ),
                ],
                "responses": {
                    "200": _json(_ref("InvocationPage"), "One page."),
                    **_errors(*_AUTHED),
                },
            }
        },
        "/v1/invocations/{invocation_id}": {
            "get": {
                "operationId": "getInvocation",
                "summary": "An invocation's state, result or error (read).",
                "tags": ["invocations"],
                "parameters": [
                    invocation_id,
                    _query(
                        "wait",
                        "Seconds to wait for it to finish (long poll).",
                        {
                            "type": "number",
                            "minimum": 0,
                            "maximum": settings.max_wait_s,
                        },
                    ),
                ],
                "responses": {
                    "200": _json(_ref("Invocation"), "The invocation."),
                    **_errors(*_AUTHED, 404),
                },
            }
        },
        "/v1/invocations/{invocation_id}/logs": {
            "get": {
                "operationId": "getInvocationLogs",
                "summary": "What the function printed (read).",
                "tags": ["invocations"],
                "parameters": [invocation_id],
                "responses": {
                    "200": _json(_ref("Logs"), "The logs."),
                    **_errors(*_AUTHED, 404),
                },
            }
        },
        "/v1/invocations/{invocation_id}/cancel": {
            "post": {
                "operationId": "cancelInvocation",
                "summary": "Cancel a queued invocation (invoke).",
                "tags": ["invocations"],
                "parameters": [invocation_id],
                "responses": {
                    "200": _json(_ref("Invocation"), "The cancelled invocation."),
                    **_errors(*_AUTHED, 404, 409),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness.",
                "tags": ["health"],
                "security": [],
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"status": {"const": "ok"}}},
                        "Alive.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness of each backend.",
                "tags": ["health"],
                "security": [],
                "responses": {
                    "200": _json(_ref("Readiness"), "Every backend answers."),
                    "503": _json(_ref("Readiness"), "A backend does not answer."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "tags": ["health"],
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "The OpenAPI document.")
                },
            }
        },
    }


def document(settings: Settings) -> Doc:
    """The whole OpenAPI document, with the limits of these settings."""
    responses = {
        name: {**_json(_ref("Error"), description)}
        for name, description in _ERRORS.values()
    }
    responses["Unauthorized"]["headers"] = {
        "WWW-Authenticate": {"schema": {"type": "string"}}
    }
    responses["Unavailable"]["headers"] = {
        "Retry-After": {"schema": {"type": "integer"}}
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conveyor",
            "version": "1",
            "description": (
                "Register Python functions and invoke them over HTTP. Every error "
                'is JSON: {"error": {"code", "message"}, "request_id"}.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(settings),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: 'Authorization: Bearer <key>'.",
                }
            },
            "schemas": _schemas(settings),
            "responses": responses,
        },
    }
