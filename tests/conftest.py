"""Shared fixtures: where the real servers are, and how to give up on them.

A test that needs a server skips when the server is missing on a laptop,
but fails when ``CI`` is set, so a green CI run never hides a skipped suite.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.harness import Platform, platform

BROKER_URL = os.environ.get(
    "CONVEYOR_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
)
CACHE_URL = os.environ.get("CONVEYOR_TEST_CACHE_URL", "redis://127.0.0.1:6379/15")
MONGO_URL = os.environ.get("CONVEYOR_TEST_MONGO_URL", "")


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_server(what: str, url: str) -> None:
    """Skip (or, under CI, fail) the calling test when the server is down."""
    if url and reachable(url):
        return
    message = f"{what} is not reachable at {url or '(no URL set)'}"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must provide it")
    pytest.skip(message)


@pytest.fixture
def rabbitmq_url() -> str:
    require_server("RabbitMQ", BROKER_URL)
    return BROKER_URL


@pytest.fixture
def redis_url() -> str:
    require_server("Redis", CACHE_URL)
    return CACHE_URL


@pytest.fixture(scope="module", params=["embedded", "rabbitmq-redis"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """``conveyor server`` on the embedded defaults, then on RabbitMQ and Redis,
    shared by the tests of one module."""
    env = {}
    if request.param == "rabbitmq-redis":
        require_server("RabbitMQ", BROKER_URL)
        require_server("Redis", CACHE_URL)
        env = {"CONVEYOR_BROKER_URL": BROKER_URL, "CONVEYOR_CACHE_URL": CACHE_URL}
    with platform(tmp_path_factory.mktemp(request.param), env) as started:
        started.start("server")
        started.wait_ready()
        yield started
