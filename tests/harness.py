"""Start Conveyor's processes as a user would, and talk to them over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ADMIN_KEY = "cvk_test-admin-" + uuid.uuid4().hex


def default_sandbox() -> str:
    """The process sandbox where it can run; elsewhere (a laptop without
    root) the suite runs functions unsandboxed rather than not at all."""
    from runtime.executors.sandbox import unavailable_reason

    return "process" if unavailable_reason() is None else "none"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Platform:
    """A running set of Conveyor processes sharing one configuration."""

    data_dir: Path
    env: dict[str, str]
    port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, role: str, command: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``conveyor <command>`` under the name ``role``."""
        log = open(self.data_dir / f"{role}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "conveyor.cli", command or role],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes[role] = process
        return process

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the role's session, children included."""
        process = self.processes.pop(role)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=60)
        if sig != signal.SIGKILL:
            # Reap anything the role left behind after a graceful stop.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for role in list(self.processes):
            self.kill(role, signal.SIGTERM)

    def log(self, role: str) -> str:
        return (self.data_dir / f"{role}.log").read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            for role, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{role} exited early:\n{self.log(role)}")
            try:
                answer = requests.get(self.url + "/readyz", timeout=2)
                if answer.status_code == 200:
                    return
                last = answer.text
            except requests.ConnectionError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"the platform did not become ready: {last}")

    def client(self, key: str = ADMIN_KEY) -> ApiClient:
        return ApiClient(self.url, key)


class ApiClient:
    """A thin HTTP client for the v1 API, as any non-Python caller would use it."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.request(method, self.url + path, **kwargs)

    def deploy(self, name: str, source: str, **fields: Any) -> dict[str, Any]:
        answer = self.request(
            "POST", "/v1/functions", json={"name": name, "source": source, **fields}
        )
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def invoke(
        self, name: str, *args: Any, wait_s: float | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = {"Prefer": f"wait={wait_s}"} if wait_s is not None else {}
        return self.request(
            "POST",
            f"/v1/functions/{name}/invocations",
            json={"args": list(args), "kwargs": kwargs},
            headers=headers,
        )

    def result(self, invocation_id: str, wait_s: float = 30.0) -> dict[str, Any]:
        """The invocation once it is terminal; fails the test if it never is."""
        deadline = time.monotonic() + wait_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            answer = self.request(
                "GET",
                f"/v1/invocations/{invocation_id}",
                params={"wait": min(left, 10)},
            )
            assert answer.status_code == 200, answer.text
            record = dict(answer.json())
            if record["status"] not in ("queued", "running") or left == 0:
                return record


@contextmanager
def platform(
    tmp_path: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[Platform]:
    """A configuration for Conveyor processes; stops whatever was started."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CONVEYOR_")
    }
    port = free_port()
    env.update(
        CONVEYOR_DATA_DIR=str(tmp_path),
        CONVEYOR_PORT=str(port),
        CONVEYOR_ADMIN_KEY=ADMIN_KEY,
        CONVEYOR_QUEUE=f"conveyor.test.{uuid.uuid4().hex[:12]}",
        CONVEYOR_GATEWAY_WORKERS="2",
        CONVEYOR_LOG_LEVEL="INFO",
        CONVEYOR_SANDBOX=default_sandbox(),
    )
    env.update(extra_env or {})
    running = Platform(tmp_path, env, port)
    try:
        yield running
    finally:
        running.stop()
        broker_url = env.get("CONVEYOR_BROKER_URL", "")
        if broker_url.startswith(("amqp://", "amqps://")):
            delete_rabbitmq_queues(broker_url, env["CONVEYOR_QUEUE"])


def delete_rabbitmq_queues(url: str, name: str) -> None:
    """Delete a test's queue and its dead-letter queue from RabbitMQ."""
    import pika

    from conveyor_core.brokers.rabbitmq import dead_letter_queue_for

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_delete(name)
        channel.queue_delete(dead_letter_queue_for(name))
    finally:
        connection.close()
