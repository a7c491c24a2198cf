"""The gateway's Flask application factory and its per-request bookkeeping."""

from __future__ import annotations

import logging
import os
import re
import time

from flask import Flask, Response, g, request

from conveyor_core.broker import Broker
from conveyor_core.cache import Cache
from conveyor_core.settings import Settings
from conveyor_core.store import Store
from gateway.context import Backends
from gateway.errors import PayloadTooLarge, register_error_handlers
from gateway.functions import FunctionsApi
from gateway.health import HealthApi
from gateway.invocations import InvocationsApi
from gateway.keys import KeysApi

access_logger = logging.getLogger("gateway.access")

#: What an incoming X-Request-Id may look like to be kept as is.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

EXTENSION = "conveyor"


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    broker: Broker | None = None,
    cache: Cache | None = None,
) -> Flask:
    """Build the gateway; backends not given are opened from the settings.

    Those are opened on first use in each process, so the application can be
    built before gunicorn forks its workers.
    """
    settings = settings if settings is not None else Settings.from_env()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    backends = Backends(settings, store, broker, cache)
    app.extensions[EXTENSION] = backends

    _install_request_hooks(app, settings.max_body_bytes)
    register_error_handlers(app)
    for api in (
        KeysApi(backends),
        FunctionsApi(backends),
        InvocationsApi(backends),
        HealthApi(backends),
    ):
        api.register(app)
    return app


def _install_request_hooks(app: Flask, max_body_bytes: int) -> None:
    @app.before_request
    def begin() -> None:
        g.started = time.perf_counter()
        incoming = request.environ.get("HTTP_X_REQUEST_ID")
        g.request_id = (
            incoming
            if incoming is not None and REQUEST_ID.fullmatch(incoming)
            else os.urandom(8).hex()
        )

        # Refused before anything reads the body; a body without a declared
        # length is cut off at the same limit by MAX_CONTENT_LENGTH.
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(
                f"the body has {length} bytes, over the limit of {max_body_bytes}; "
                "send less, or split a batch into smaller ones"
            )

    @app.after_request
    def finish(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id is None:
            request_id = g.request_id = os.urandom(8).hex()
        response.headers["X-Request-Id"] = request_id

        if access_logger.isEnabledFor(logging.INFO):
            started = g.get("started")
            duration_ms = (
                round((time.perf_counter() - started) * 1000, 3)
                if started is not None
                else 0.0
            )
            access_logger.info(
                "%s %s %d %.1fms",
                request.method,
                request.path,
                response.status_code,
                duration_ms,
                extra={
                    "request_id": request_id,
                    "tenant": g.get("tenant"),
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": duration_ms,
                },
            )
        return response
