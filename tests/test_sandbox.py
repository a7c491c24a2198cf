"""The attack battery: hostile functions deployed and invoked through the API.

Each runs on ``conveyor server`` with each sandbox backend, the process
sandbox and the docker sandbox, and must neither reach the host, the
platform nor other tenants, nor leave anything behind. A backend that cannot
run here (not root, no bubblewrap, no docker daemon) is skipped, and fails
the suite instead when ``CI`` is set.
"""

from __future__ import annotations

import base64
import os
import pickle
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docker_image import runtime_image
from tests.harness import ApiClient, Platform, platform

pytestmark = pytest.mark.slow

SLOT_CGROUPS = [
    Path("/sys/fs/cgroup/memory/conveyor"),
    Path("/sys/fs/cgroup/pids/conveyor"),
    Path("/sys/fs/cgroup/unified/conveyor"),
]


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _sandbox_env(backend: str) -> dict[str, str]:
    env = {"CONVEYOR_SANDBOX": backend, "CONVEYOR_MAX_WARM_PROCESSES": "8"}
    if backend == "process":
        from runtime.executors.sandbox import unavailable_reason

        reason = unavailable_reason()
    else:
        from runtime.executors.container import unavailable_reason as docker_reason

        env["CONVEYOR_SANDBOX"] = "docker"
        if backend == "gvisor":
            env["CONVEYOR_DOCKER_RUNTIME"] = "runsc"
        image, reason = runtime_image()
        if image:
            reason = docker_reason(image, env.get("CONVEYOR_DOCKER_RUNTIME", ""))
        env["CONVEYOR_DOCKER_IMAGE"] = image
    if reason is not None:
        _unavailable(f"the {backend} sandbox cannot run here: {reason}")
    return env


@pytest.fixture(scope="module", params=["process", "docker", "gvisor"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    env = _sandbox_env(request.param)
    with platform(tmp_path_factory.mktemp(request.param), env) as started:
        started.start("server")
        started.wait_ready()
        # Runtimes of other tests may be sandboxing now; only what this one
        # adds must be gone at the end.
        started.env["BEFORE_CGROUPS"] = " ".join(_slot_cgroups())
        yield started


@pytest.fixture(scope="module")
def client(running: Platform) -> ApiClient:
    return running.client()


def run(
    client: ApiClient, source: str, *args: Any, timeout_s: float = 10, **fields: Any
) -> dict[str, Any]:
    """Deploy ``main`` under a fresh name, invoke it, return the finished record."""
    name = "f" + uuid.uuid4().hex[:12]
    client.deploy(
        name,
        textwrap.dedent(source),
        entrypoint="main",
        timeout_s=timeout_s,
        **fields,
    )
    answer = client.invoke(name, *args)
    assert answer.status_code == 202, answer.text
    return client.result(answer.json()["id"], wait_s=60)


def succeeded(record: dict[str, Any]) -> Any:
    assert record["status"] == "succeeded", record["error"]
    return record["result"]


def test_no_network_to_the_platform_or_outside(
    running: Platform, client: ApiClient
) -> None:
    result = succeeded(
        run(
            client,
            """
            import socket

            def main(ports):
                with open("/proc/net/route") as table:
                    routes = table.read().splitlines()[1:]
                outcomes = {"routes": len(routes)}
                for host, port in ports:
                    if routes and not host.startswith("127."):
                        # Never let a test's packet leave the machine.
                        outcomes[f"{host}:{port}"] = "not tried: there is a route"
                        continue
                    try:
                        socket.create_connection((host, port), timeout=2).close()
                        outcomes[f"{host}:{port}"] = "connected"
                    except OSError as exc:
                        outcomes[f"{host}:{port}"] = type(exc).__name__
                return outcomes
            """,
            [
                ["127.0.0.1", 6379],
                ["127.0.0.1", 5672],
                ["127.0.0.1", running.port],
                ["192.0.2.1", 80],
            ],
        )
    )
    assert result.pop("routes") == 0, result
    assert "connected" not in result.values(), result


def test_host_files_environment_and_processes_are_out_of_sight(
    client: ApiClient,
) -> None:
    secret = Path("/tmp") / f"conveyor-host-{uuid.uuid4().hex}"
    secret.write_text("host secret")
    secret.chmod(0o644)
    host_files = {}
    for path in (secret, Path("/etc/passwd"), Path("/etc/hostname")):
        host_files[str(path)] = path.read_bytes().hex()
    try:
        result = succeeded(
            run(
                client,
                """
                import os

                def main(secret):
                    seen = {}
                    for path in (secret, "/etc/passwd", "/etc/hostname",
                                 "/work/main/pyproject.toml", "/root/.bash_history"):
                        try:
                            with open(path, "rb") as handle:
                                seen[path] = handle.read().hex()
                        except OSError as exc:
                            seen[path] = type(exc).__name__
                    pids = [name for name in os.listdir("/proc") if name.isdigit()]
                    return {
                        "files": seen,
                        "env": sorted(os.environ),
                        "pids": len(pids),
                        "uid": os.getuid(),
                    }
                """,
                str(secret),
                env={"GREETING": "hi"},
            )
        )
    finally:
        secret.unlink()
    # A container has an /etc of its own image; none of the host's is there.
    for path, seen in result["files"].items():
        assert seen != host_files.get(path), f"{path} of the host was read"
    assert not any(name.startswith("CONVEYOR_") for name in result["env"])
    assert "GREETING" in result["env"]
    assert result["pids"] <= 3
    assert result["uid"] >= 1_000_000


def test_writes_outside_tmp_are_refused(client: ApiClient) -> None:
    result = succeeded(
        run(
            client,
            """
            import os
            import sys

            def main():
                targets = [sys.executable, os.__file__, __file__ if "__file__" in
                           globals() else "/usr/lib/x", "/evil", "/usr/evil"]
                refused = {}
                for path in targets:
                    try:
                        with open(path, "a") as handle:
                            handle.write("x")
                        refused[path] = False
                    except OSError:
                        refused[path] = True
                with open("/tmp/scratch", "w") as handle:
                    handle.write("fine")
                return refused
            """,
        )
    )
    assert all(result.values()), result


def test_privileged_calls_are_refused(client: ApiClient) -> None:
    result = succeeded(
        run(
            client,
            """
            import ctypes
            import os

            libc = ctypes.CDLL(None, use_errno=True)

            def attempt(call):
                try:
                    value = call()
                except OSError as exc:
                    return exc.errno
                if value == -1:
                    return ctypes.get_errno()
                return "allowed"

            def main():
                return {
                    "setuid": attempt(lambda: os.setuid(0)),
                    "mount": attempt(lambda: libc.mount(b"none", b"/tmp",
                                                        b"tmpfs", 0, None)),
                    "unshare": attempt(lambda: libc.unshare(0x00020000)),
                    "unshare_user": attempt(lambda: libc.unshare(0x10000000)),
                    "ptrace": attempt(lambda: libc.ptrace(16, 1, None, None)),
                    "bpf": attempt(lambda: libc.syscall(321, 0, None, 0)),
                }
            """,
        )
    )
    assert "allowed" not in result.values(), result


def test_timeouts_kill_loops_and_sleeps(client: ApiClient) -> None:
    for body in ("while True:\n        pass", "import time\n    time.sleep(60)"):
        started = time.monotonic()
        record = run(client, f"def main():\n    {body}\n", timeout_s=1)
        assert record["status"] == "timed_out"
        assert time.monotonic() - started < 15


def test_a_memory_bomb_is_a_memory_failure(client: ApiClient) -> None:
    record = run(
        client,
        """
        def main():
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        """,
        memory_mb=64,
    )
    assert record["status"] == "failed"
    assert "memory" in record["error"]["message"]


def test_memory_spread_over_children_is_a_memory_failure(client: ApiClient) -> None:
    # Each child stays under the address-space limit; together they pass the
    # memory cgroup's, whose kill the worker reads as the verdict.
    record = run(
        client,
        """
        import os
        import time

        def main():
            children = []
            for _ in range(3):
                pid = os.fork()
                if pid == 0:
                    hoard = []
                    try:
                        for _ in range(90):
                            hoard.append(bytearray(1 << 20))
                            time.sleep(0.002)
                    except MemoryError:
                        pass
                    time.sleep(1)
                    os._exit(0)
                children.append(pid)
            for pid in children:
                os.waitpid(pid, 0)
            return "survived"
        """,
        memory_mb=64,
    )
    assert record["status"] == "failed", record
    assert "memory" in record["error"]["message"]


def test_fork_and_thread_bombs_do_not_starve_another_tenant(
    running: Platform, client: ApiClient
) -> None:
    other = _other_tenant(running, client)
    other.deploy("quick", "def quick():\n    return 'done'\n")

    bombs = {
        "fork": """
            import os
            import time

            def main():
                while True:
                    try:
                        os.fork()
                    except OSError:
                        time.sleep(0.01)
            """,
        "thread": """
            import threading
            import time

            def main():
                while True:
                    try:
                        threading.Thread(target=time.sleep, args=(60,)).start()
                    except RuntimeError:
                        time.sleep(0.01)
            """,
    }
    for kind, source in bombs.items():
        name = f"bomb-{kind}"
        client.deploy(name, textwrap.dedent(source), entrypoint="main", timeout_s=4)
        bomb = client.invoke(name).json()["id"]
        time.sleep(1.0)

        started = time.monotonic()
        answer = other.invoke("quick", wait_s=20)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == "done"
        assert time.monotonic() - started < 5, kind

        status = client.result(bomb)["status"]
        if running.env.get("CONVEYOR_DOCKER_RUNTIME") == "runsc":
            # gVisor's own threads count against the container's pids limit,
            # so a bomb may take its sandbox down before the timeout.
            assert status in ("timed_out", "failed"), status
        else:
            assert status == "timed_out"


def test_a_daemonised_child_does_not_outlive_its_invocation(
    client: ApiClient,
) -> None:
    marker = f"conveyor-daemon-{uuid.uuid4().hex}"
    succeeded(
        run(
            client,
            f"""
            import os
            import time

            def main():
                if os.fork() == 0:
                    os.setsid()
                    if os.fork() == 0:
                        os.execv("/bin/sleep", ["sleep", "300", "{marker}"])
                    os._exit(0)
                time.sleep(0.2)
                return "left a daemon"
            """,
        )
    )
    deadline = time.monotonic() + 5
    while _host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _host_processes_with(marker)


def test_huge_output_is_cut_and_a_huge_result_refused(client: ApiClient) -> None:
    record = run(
        client,
        """
        import sys

        def main():
            line = "z" * 1023 + "\\n"
            for _ in range(30 * 1024):
                sys.stdout.write(line)
            return "printed"
        """,
    )
    assert succeeded(record) == "printed"
    logs = client.request("GET", f"/v1/invocations/{record['id']}/logs").json()
    assert logs["truncated"] is True
    assert len(logs["logs"]) <= 1024 * 1024

    record = run(client, "def main():\n    return 'r' * (20 * 1024 * 1024)\n")
    assert record["status"] == "failed"
    assert record["error"]["type"] == "result_too_large"


def test_a_malicious_pickle_runs_only_inside(client: ApiClient) -> None:
    evidence = Path("/tmp") / f"conveyor-pwned-{uuid.uuid4().hex}"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {evidence}",))

    payload = base64.b64encode(pickle.dumps(Exploit())).decode()
    name = "f" + uuid.uuid4().hex[:12]
    answer = client.request(
        "POST", "/v1/functions", json={"name": name, "pickle": payload}
    )
    assert answer.status_code == 201, answer.text
    assert not evidence.exists(), "the gateway unpickled the upload"

    answer = client.invoke(name)
    record = client.result(answer.json()["id"])
    assert record["status"] == "failed"
    assert not evidence.exists(), "the pickle ran outside the sandbox"

    source = "def main(value):\n    return type(value).__name__\n"
    name = "f" + uuid.uuid4().hex[:12]
    client.deploy(name, source, entrypoint="main")
    answer = client.invoke(name, {"__conveyor_pickle__": payload})
    record = client.result(answer.json()["id"])
    assert record["status"] == "succeeded"
    assert not evidence.exists(), "an argument's pickle ran outside the sandbox"


def test_after_the_battery_nothing_is_left_and_work_goes_on(
    running: Platform, client: ApiClient
) -> None:
    source = """
        def main(a, b):
            with open("/proc/1/cmdline", "rb") as init:
                return [a + b, init.read().split(b"\\0")[0].decode()]
        """
    total, init = succeeded(run(client, source, 2, 3))
    assert total == 5

    # The first process of the sandbox's PID namespace is its init.
    if running.env["CONVEYOR_SANDBOX"] == "docker":
        assert init.endswith("docker-init"), init
        _stop_leaves_no_container(running)
    else:
        assert init == "bwrap", init
        _stop_leaves_no_cgroup(running)


def _stop_leaves_no_cgroup(running: Platform) -> None:
    before_groups = set(running.env["BEFORE_CGROUPS"].split())
    before_processes = set(_sandboxed())
    runtime_cgroups = {name.split("-")[1] for name in _slot_cgroups()} - {
        name.split("-")[1] for name in before_groups
    }
    assert runtime_cgroups, "the battery ran outside the process sandbox"

    running.kill("server", 15)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _ours(runtime_cgroups):
        time.sleep(0.1)
    assert _ours(runtime_cgroups) == []
    assert set(_sandboxed()) <= before_processes


def _stop_leaves_no_container(running: Platform) -> None:
    import docker

    from runtime.executors.container import OWNER_LABEL

    def containers() -> list[str]:
        return [
            container.name
            for container in client.containers.list(
                all=True, filters={"label": OWNER_LABEL}
            )
            if container.image.tags == [running.env["CONVEYOR_DOCKER_IMAGE"]]
        ]

    client = docker.from_env()
    try:
        running.kill("server", 15)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and containers():
            time.sleep(0.2)
        assert containers() == [], "containers outlived their runtime"
    finally:
        client.close()
    sockets = Path(running.data_dir) / "docker-sockets"
    assert list(sockets.glob("*/*")) == []


def _other_tenant(running: Platform, client: ApiClient) -> ApiClient:
    answer = client.request(
        "POST", "/v1/keys", json={"tenant": "rival", "scopes": ["deploy", "invoke"]}
    )
    assert answer.status_code == 201, answer.text
    return running.client(answer.json()["key"])


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def _slot_cgroups() -> list[str]:
    return [
        child.name
        for root in SLOT_CGROUPS
        if root.exists()
        for child in root.iterdir()
        if child.is_dir()
    ]


def _ours(owners: set[str]) -> list[str]:
    return [name for name in _slot_cgroups() if name.split("-")[1] in owners]


def _sandboxed() -> list[int]:
    return [
        pid
        for pid in _host_processes_with("bwrap")
        if b"--unshare-net" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
