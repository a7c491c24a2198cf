"""End to end: start Conveyor as the README says and use it over HTTP.

Runs on the embedded defaults (``conveyor server`` on a bare machine), and as
separate ``conveyor gateway`` and ``conveyor runtime`` processes on the real
RabbitMQ and Redis of the machine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from functions import source
from tests.harness import ADMIN_KEY, ApiClient, Platform, platform

pytestmark = pytest.mark.slow


def _exercise(client: ApiClient) -> None:
    """What every deployment must do: run, fail, time out, log, list."""
    client.deploy("wordcount", source("wordcount"))
    answer = client.invoke("wordcount", "the cat and the hat", top=1, wait_s=30)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["status"] == "succeeded"
    assert record["result"] == [["the", 2]]
    assert record["attempts"] == 1
    assert record["duration_ms"] > 0
    logs = client.request("GET", f"/v1/invocations/{record['id']}/logs").json()
    assert logs["logs"] == "counted 5 words\n"

    client.deploy("failing", source("failing"))
    answer = client.invoke("failing", {"quantity": -1})
    assert answer.status_code == 202
    record = client.result(answer.json()["id"])
    assert record["status"] == "failed"
    assert record["error"]["type"] == "ValueError"
    assert "quantity must be positive, got -1" in record["error"]["message"]
    assert "check_order" in record["error"]["traceback"]

    client.deploy("sleepy", source("sleepy"), timeout_s=0.5)
    record = client.result(client.invoke("sleepy", 30).json()["id"])
    assert record["status"] == "timed_out"
    assert record["duration_ms"] < 5000

    listed = client.request("GET", "/v1/invocations", params={"function": "failing"})
    assert [item["status"] for item in listed.json()["invocations"]] == ["failed"]


def test_server_on_embedded_defaults(tmp_path: Path) -> None:
    with platform(tmp_path) as running:
        running.start("server")
        running.wait_ready()
        _exercise(running.client())

        answer = requests.post(
            running.url + "/v1/functions/wordcount/invocations",
            data=b"{not json",
            headers={
                "Authorization": f"Bearer {ADMIN_KEY}",
                "Content-Type": "application/json",
            },
            timeout=10,
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_json"
        answer = requests.get(running.url + "/v1/functions", timeout=10)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"


def test_server_prints_a_new_admin_key_once(tmp_path: Path) -> None:
    with platform(tmp_path, {"CONVEYOR_ADMIN_KEY": ""}) as running:
        running.start("server")
        running.wait_ready()
        printed = [
            line.strip()
            for line in running.log("server").splitlines()
            if line.strip().startswith("cvk_")
        ]
        assert len(printed) == 1
        assert running.client(printed[0]).request("GET", "/v1/keys").status_code == 200

        running.kill("server", signal.SIGTERM)
        running.start("server-again", "server")
        running.wait_ready()
        assert "cvk_" not in running.log("server-again")

        # Gunicorn's own lines included, every log line is one JSON object.
        lines = running.log("server-again").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        assert {"gunicorn.error", "runtime.worker"} <= {r["logger"] for r in records}


def _submit_batch(client: ApiClient, name: str, items: list[dict]) -> list[str]:
    answer = client.request(
        "POST", f"/v1/functions/{name}/invocations/batch", json={"items": items}
    )
    assert answer.status_code == 202, answer.text
    return [item["id"] for item in answer.json()["invocations"]]


def test_embedded_server_restart_keeps_queued_invocations(tmp_path: Path) -> None:
    settings = {"CONVEYOR_CONCURRENCY": "1", "CONVEYOR_PREFETCH": "1"}
    with platform(tmp_path, settings) as running:
        running.start("server")
        running.wait_ready()
        client = running.client()
        client.deploy("sleepy", source("sleepy"))
        ids = _submit_batch(client, "sleepy", [{"args": [0.3]} for _ in range(8)])

        running.kill("server", signal.SIGKILL)
        statuses = {}
        running.start("server-again", "server")
        running.wait_ready()
        for invocation_id in ids:
            record = client.result(invocation_id, wait_s=60)
            statuses[invocation_id] = record["status"]
            assert record["status"] == "succeeded", record
        assert len(statuses) == 8


@pytest.fixture
def real_backends(rabbitmq_url: str, redis_url: str) -> dict[str, str]:
    return {"CONVEYOR_BROKER_URL": rabbitmq_url, "CONVEYOR_CACHE_URL": redis_url}


def _separate(running: Platform, runtimes: int) -> None:
    running.start("gateway")
    for number in range(runtimes):
        running.start(f"runtime-{number}", "runtime")
    running.wait_ready()


def test_gateway_and_runtime_on_embedded_defaults(tmp_path: Path) -> None:
    with platform(tmp_path) as running:
        _separate(running, runtimes=1)
        _exercise(running.client())


def test_gateway_and_runtimes_on_rabbitmq_and_redis(
    tmp_path: Path, real_backends: dict[str, str]
) -> None:
    with platform(tmp_path, real_backends) as running:
        _separate(running, runtimes=2)
        client = running.client()
        _exercise(client)

        client.deploy("fibonacci", source("fibonacci"))
        ids = _submit_batch(client, "fibonacci", [{"args": [n]} for n in range(200)])
        results = [client.result(invocation_id)["result"] for invocation_id in ids]
        assert results[:8] == [0, 1, 1, 2, 3, 5, 8, 13]
        assert results[199] == 173402521172797813159685037284371942044301


def test_runtime_killed_mid_invocation_is_redelivered(
    tmp_path: Path, real_backends: dict[str, str]
) -> None:
    with platform(tmp_path, real_backends) as running:
        _separate(running, runtimes=2)
        client = running.client()
        client.deploy("sleepy", source("sleepy"))
        invocation_id = client.invoke("sleepy", 2).json()["id"]

        deadline = time.monotonic() + 20
        record = {}
        while time.monotonic() < deadline:
            record = client.request("GET", f"/v1/invocations/{invocation_id}").json()
            if record["status"] == "running":
                break
            time.sleep(0.02)
        assert record["status"] == "running"
        victim_pid = int(record["attempt_log"][0]["worker"].rsplit(":", 1)[1])
        victim = next(
            role
            for role, process in running.processes.items()
            if process.pid == victim_pid
        )
        running.kill(victim, signal.SIGKILL)

        record = client.result(invocation_id, wait_s=60)
        assert record["status"] == "succeeded"
        assert record["attempts"] == 2
        workers = [attempt["worker"] for attempt in record["attempt_log"]]
        assert len(workers) == 2
        assert workers[0] != workers[1]
        assert record["attempt_log"][1]["status"] == "succeeded"


def test_a_runtime_stops_on_signals_that_arrive_together(tmp_path: Path) -> None:
    # A process manager's stop often reaches a runtime twice at once: once
    # for its process group and once from its supervisor.
    with platform(tmp_path) as running:
        _separate(running, runtimes=1)
        client = running.client()
        client.deploy("wordcount", source("wordcount"))
        answer = client.invoke("wordcount", "one two", wait_s=30)
        assert answer.status_code == 200, answer.text

        runtime = running.processes.pop("runtime-0")
        for _ in range(500):
            try:
                os.kill(runtime.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        assert runtime.wait(timeout=30) == 0
