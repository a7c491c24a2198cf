"""Serving the gateway with gunicorn: forked workers, each with a thread pool.

``conveyor gateway`` (or ``python -m gateway.wsgi``) runs it with the settings
from the environment.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from conveyor_core.settings import Settings
from gateway.app import create_app

logger = logging.getLogger(__name__)

#: Seconds a worker gets to finish its requests on shutdown, beyond the longest
#: wait a client may ask for.
SHUTDOWN_GRACE_S = 5


class PlatformLogger(GunicornLogger):  # type: ignore[misc]
    """Gunicorn's own messages through the platform's handlers (JSON lines)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """Gunicorn with ``gthread`` workers, configured from Conveyor's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for name, value in gunicorn_options(self.settings).items():
            # Options newer than the installed gunicorn are left out.
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self) -> Flask:
        return create_app(self.settings)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return {
        "bind": [f"{host}:{settings.port}"],
        "worker_class": "gthread",
        "workers": settings.gateway_workers,
        "threads": settings.gateway_threads,
        "graceful_timeout": int(settings.max_wait_s) + SHUTDOWN_GRACE_S,
        "keepalive": 5,
        # The application logs one line per request on gateway.access itself.
        "accesslog": None,
        "loglevel": settings.log_level.lower(),
        "logger_class": PlatformLogger,
        "proc_name": "conveyor-gateway",
        # Gunicorn 25+ opens a control socket at one fixed path per user, which
        # two gateways on one machine would fight over; nothing here uses it.
        "control_socket_disable": True,
    }


def serve(settings: Settings | None = None) -> None:
    """Run the gateway until gunicorn is told to stop."""
    settings = settings if settings is not None else Settings.from_env()
    logger.info(
        "gateway listening on %s:%d with %d workers of %d threads",
        settings.host,
        settings.port,
        settings.gateway_workers,
        settings.gateway_threads,
    )
    GatewayServer(settings).run()


if __name__ == "__main__":
    # The same as ``conveyor gateway``: logging set up, the admin key ensured.
    from conveyor_core.serve import main

    sys.exit(main("gateway"))
