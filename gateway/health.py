"""Liveness, readiness and the API document; none of them needs a key."""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from flask import Flask, Response

from gateway.context import Backends
from gateway.errors import RETRY_AFTER_S
from gateway.openapi import document
from gateway.responses import json_response

logger = logging.getLogger(__name__)

_ALIVE = orjson.dumps({"status": "ok"})


class HealthApi:
    """Views of ``/healthz``, ``/readyz`` and ``/openapi.json``."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self._openapi = orjson.dumps(document(backends.settings))

    def register(self, app: Flask) -> None:
        app.add_url_rule("/healthz", "healthz", self.healthz, methods=["GET"])
        app.add_url_rule("/readyz", "readyz", self.readyz, methods=["GET"])
        app.add_url_rule("/openapi.json", "openapi", self.openapi, methods=["GET"])

    def healthz(self) -> Response:
        return Response(_ALIVE, mimetype="application/json")

    def readyz(self) -> Response:
        backends = self.backends
        checks: dict[str, Callable[[], object]] = {
            "store": lambda: backends.store.ping(),
            "broker": lambda: backends.broker.ping(),
            "cache": lambda: backends.cache.ping(),
        }
        states = {name: self._ping(name, check) for name, check in checks.items()}
        if all(state == "ok" for state in states.values()):
            return json_response({"status": "ok", "backends": states})
        return json_response(
            {"status": "unavailable", "backends": states},
            503,
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    def openapi(self) -> Response:
        return Response(self._openapi, mimetype="application/json")

    def _ping(self, name: str, check: Callable[[], object]) -> str:
        """Open the backend if need be and ping it: "ok" or "unavailable"."""
        try:
            check()
        except Exception as exc:
            logger.warning(
                "readiness check: the %s is unavailable: %s",
                name,
                exc,
                extra={"backend": name},
            )
            return "unavailable"
        return "ok"
