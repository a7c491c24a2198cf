"""The docker sandbox at the executor's level: containers as warm processes.

Needs a docker daemon and the runtime image built from this tree (see
``tests/docker_image.py``); skipped without them, failed when ``CI`` is set.
The attack battery in ``test_sandbox.py`` runs the same backend end to end.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor_core.errors import ConfigurationError
from conveyor_core.records import FunctionVersion, State
from runtime.executors.container import (
    OWNER_LABEL,
    DockerSandbox,
    seccomp_profile,
    unavailable_reason,
)
from runtime.executors.process import ProcessExecutor
from tests.docker_image import runtime_image

pytestmark = pytest.mark.slow

PAYLOAD = b'{"args": [], "kwargs": {}}'


def version(source: str, number: int = 1, timeout_s: float = 10) -> FunctionVersion:
    return FunctionVersion(
        tenant="t",
        name="boxed",
        version=number,
        source=source,
        entrypoint="main",
        timeout_s=timeout_s,
        memory_mb=64,
        env={"GREETING": "hi"},
        created_at=0.0,
    )


@pytest.fixture(scope="module")
def image() -> str:
    built, reason = runtime_image()
    if built:
        reason = unavailable_reason(built)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the docker sandbox cannot run here: {reason}")
        pytest.skip(f"the docker sandbox cannot run here: {reason}")
    return built


@pytest.fixture
def executor(image: str, tmp_path: Path) -> Iterator[ProcessExecutor]:
    launcher = DockerSandbox(image, 4, str(tmp_path))
    with ProcessExecutor(max_processes=4, launcher=launcher) as running:
        yield running


def test_the_profile_refuses_what_the_process_sandbox_refuses() -> None:
    rules = seccomp_profile()["syscalls"]
    denied = {name for rule in rules if "args" not in rule for name in rule["names"]}
    assert {"ptrace", "mount", "unshare", "setns", "bpf", "keyctl"} <= denied
    families = {
        rule["args"][0]["value"]
        for rule in rules
        if rule["names"] == ["socket"] and rule["errnoRet"] == errno.EACCES
    }
    assert families == {socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, 17}
    json.dumps(seccomp_profile())


def test_a_warm_container_serves_the_next_invocation(executor: ProcessExecutor):
    source = (
        "import os\ncalls = 0\n\ndef main():\n    global calls\n    calls += 1\n"
        "    print('call', calls)\n    return [calls, os.environ['GREETING']]\n"
    )
    first = executor.run(version(source), PAYLOAD, "inv-1")
    second = executor.run(version(source), PAYLOAD, "inv-2")
    assert (first.status, first.result, first.logs) == (
        State.SUCCEEDED,
        [1, "hi"],
        "call 1\n",
    )
    assert (second.result, second.logs) == ([2, "hi"], "call 2\n")


def test_an_exit_and_a_signal_are_reported_from_the_worker_side(
    executor: ProcessExecutor,
) -> None:
    exited = executor.run(
        version("import os\ndef main():\n    os._exit(3)\n"), PAYLOAD, "inv-exit"
    )
    assert exited.status is State.FAILED
    assert exited.error["message"].endswith("exited with code 3 before it replied")

    killed = executor.run(
        version("import os, signal\ndef main():\n    os.kill(os.getpid(), 9)\n", 2),
        PAYLOAD,
        "inv-kill",
    )
    assert killed.status is State.FAILED
    assert "killed by signal SIGKILL" in killed.error["message"]


def test_a_timeout_removes_the_container(image: str, executor: ProcessExecutor) -> None:
    import docker

    outcome = executor.run(
        version("import time\ndef main():\n    time.sleep(60)\n", timeout_s=1),
        PAYLOAD,
        "inv-slow",
    )
    assert outcome.status is State.TIMED_OUT

    client = docker.from_env()
    try:
        owner = f"{socket.gethostname()}:{os.getpid()}"
        left = client.containers.list(
            all=True, filters={"label": f"{OWNER_LABEL}={owner}"}
        )
    finally:
        client.close()
    assert left == []


def test_containers_of_a_dead_runtime_are_swept(image: str, tmp_path: Path) -> None:
    import docker

    client = docker.from_env()
    try:
        stale = client.containers.create(
            image, ["true"], labels={OWNER_LABEL: f"{socket.gethostname()}:999999"}
        )
        DockerSandbox(image, 4, str(tmp_path))
        remaining = [c.id for c in client.containers.list(all=True)]
    finally:
        client.close()
    assert stale.id not in remaining


def test_a_missing_image_says_how_to_build_it(image: str) -> None:
    reason = unavailable_reason("conveyor-runtime:no-such-tag")
    assert reason is not None and "docker build -f Dockerfile.runtime" in reason
    with pytest.raises(ConfigurationError, match="no-such-tag"):
        DockerSandbox("conveyor-runtime:no-such-tag", 4, "/tmp")
