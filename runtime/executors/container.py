"""The docker sandbox: each warm process is a container of its own.

A warm process of a function version runs the runtime image's interpreter
and bootstrap in a container made through the docker SDK, with no network,
a read-only root, a small tmpfs ``/tmp``, no capabilities, no-new-privileges,
a uid of the slot's own, a seccomp filter (the process sandbox's rules), and
limits on memory, CPU, processes, open files and file size. Docker's init is
its PID 1, so a timeout's kill of the container ends everything the function
started, ``setsid()`` daemons included. ``CONVEYOR_DOCKER_RUNTIME=runsc``
runs the containers under gVisor.

A container inherits no descriptors, so the worker hands it the three pipes
of the executor's protocol over a Unix socket in a directory mounted into
that container alone: the bootstrap connects and receives them (SCM_RIGHTS).
The kernel's credentials of that connection name the bootstrap's pid, which
the worker watches through a pidfd, without asking the daemon.

The worker takes its verdicts from its own side: exit statuses from the
daemon, out-of-memory kills and leftover processes from the container's
cgroups (or the daemon's inspection where those are out of sight).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor_core.errors import ConfigurationError, ExecutorError
from runtime.executors.process import Launcher
from runtime.executors.sandbox import (
    CLONE_NEWUSER,
    DENIED_SOCKET_FAMILIES,
    DENIED_SYSCALLS,
    oom_kill_count,
)

logger = logging.getLogger(__name__)

#: Where Dockerfile.runtime puts the interpreter and the bootstrap.
IMAGE_PYTHON = "/opt/conveyor/venv/bin/python"
IMAGE_BOOTSTRAP = "/opt/conveyor/runtime/executors/bootstrap.py"

#: Where a container sees its own socket directory.
SOCKET_MOUNT = "/run/conveyor"
SOCKET_NAME = "fds.sock"

#: The label that marks a container as a warm process of a runtime; its
#: value names the runtime, ``host:pid``, so that one that died can be swept.
OWNER_LABEL = "io.conveyor.runtime"

#: Processes (threads count) one container may have at once. gVisor's own
#: threads count against the limit too, and it fails to start below ~100.
PIDS_MAX = 64
GVISOR_PIDS_MAX = 128
CPU_CORES = 1.0
TMP_BYTES = 64 * 1024 * 1024
NOFILE = 256
#: Beyond the address-space limit, for docker's init, page tables and the
#: kernel's own accounting.
CGROUP_SLACK_BYTES = 16 * 1024 * 1024

#: Each runtime process takes a range of uids of its own, one per slot.
UID_BASE = 2_000_000
UID_SPAN = 100

#: How long a new container gets to connect for its descriptors.
START_TIMEOUT_S = 30.0
#: How long a killed container gets to be reported exited.
KILL_WAIT_S = 10.0
#: How long calls to the daemon may take.
API_TIMEOUT_S = 60

#: docker's init and the bootstrap: an idle warm container has no others.
IDLE_PROCESSES = 2

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def unavailable_reason(image: str, runtime: str = "") -> str | None:
    """Why the docker sandbox cannot run here, or None if it can."""
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        return "the docker SDK is not installed; pip install 'conveyor[server]'"

    try:
        client = docker.from_env(timeout=API_TIMEOUT_S)
    except DockerException as exc:
        return f"no docker daemon answers ({exc}); start dockerd or set DOCKER_HOST"
    try:
        client.ping()
        client.images.get(image)
        if runtime and runtime not in client.info().get("Runtimes", {}):
            return (
                f"the docker daemon has no runtime {runtime!r}; add it to "
                "daemon.json, or unset CONVEYOR_DOCKER_RUNTIME"
            )
    except ImageNotFound:
        return (
            f"the image {image!r} is not there; build it with docker build "
            f"-f Dockerfile.runtime -t {image} . (or set CONVEYOR_DOCKER_IMAGE)"
        )
    except DockerException as exc:
        return f"the docker daemon cannot be used: {exc}"
    finally:
        client.close()
    return None


@dataclass(eq=False)
class Container:
    """A warm process the docker sandbox started: its container, and the
    bootstrap inside it as the worker sees it."""

    pid: int
    container: Any
    pidfd: int
    slot: int
    directory: Path
    memory_cgroup: Path | None = None
    pids_cgroup: Path | None = None
    oom_kills_at_start: int | None = None
    returncode: int | None = None
    removed: bool = False


class DockerSandbox(Launcher):
    """Starts each bootstrap process in a container of its own."""

    def __init__(
        self,
        image: str,
        max_processes: int,
        data_dir: str,
        runtime: str = "",
    ) -> None:
        reason = unavailable_reason(image, runtime)
        if reason is not None:
            raise ConfigurationError(f"the docker sandbox cannot run here: {reason}")
        if max_processes > UID_SPAN:
            raise ConfigurationError(
                f"the docker sandbox gives each of at most {UID_SPAN} warm "
                f"processes a uid of its own; lower CONVEYOR_MAX_WARM_PROCESSES "
                f"from {max_processes}"
            )
        import docker

        self._client = docker.from_env(timeout=API_TIMEOUT_S)
        self._image = image
        self._runtime = runtime
        self._gvisor = runtime == "runsc"
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._uid_base = UID_BASE + (os.getpid() % 10_000) * UID_SPAN
        self._lock = threading.Lock()
        self._free = list(range(UID_SPAN))
        self._seccomp = json.dumps(seccomp_profile())

        # Host users must not reach the sockets: only root traverses this.
        # Runtimes of several hosts (or containers) may share the data
        # directory, each under its host name.
        root = Path(data_dir) / "docker-sockets"
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self._sockets = root / socket.gethostname()
        self._sockets.mkdir(exist_ok=True)
        self._sweep_stale()

    def start(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str],
        cwd: str,
        pass_fds: Sequence[int],
        output_fd: int,
        memory_bytes: int,
    ) -> Container:
        """Start a container and hand it the pipes.

        The container runs the image's own interpreter and bootstrap, so the
        host paths of ``command`` and ``cwd`` are not used; ``pass_fds`` are
        the request and reply ends the bootstrap needs.
        """
        request_fd, reply_fd = pass_fds
        slot = self._take_slot()
        directory = self._sockets / f"{os.getpid()}-{slot}-{secrets.token_hex(4)}"
        listener = None
        container = None
        try:
            directory.mkdir()
            # Traversable by the container's uid, whatever the umask.
            directory.chmod(0o711)
            listener = _listen(directory / SOCKET_NAME)
            container = self._run(slot, directory, env, memory_bytes)
            pid, pidfd = _hand_over(
                listener, container, (request_fd, reply_fd, output_fd)
            )
        except BaseException as exc:
            if container is not None:
                _remove(container)
            shutil.rmtree(directory, ignore_errors=True)
            self._free_slot(slot)
            if isinstance(exc, Exception) and not isinstance(exc, ExecutorError):
                raise ExecutorError(f"cannot start a container: {exc}") from exc
            raise
        finally:
            if listener is not None:
                listener.close()

        groups = _cgroups_of(pid)
        started = Container(pid, container, pidfd, slot, directory)
        started.memory_cgroup = groups.get("memory")
        started.pids_cgroup = groups.get("pids")
        started.oom_kills_at_start = _oom_kills(started.memory_cgroup)
        return started

    def kill(self, popen: Container) -> None:  # type: ignore[override]
        """Kill the container, and with its init everything in it."""
        if popen.returncode is not None:
            return
        if not self.has_exited(popen):
            try:
                popen.container.kill()
            except Exception as exc:
                # Already gone, or exiting by itself: the wait below tells.
                logger.debug("kill of container %s: %s", popen.container.id, exc)
        popen.returncode = _exit_status(popen)

    def release(self, popen: Container) -> None:  # type: ignore[override]
        """Remove the container and free its slot; kill() has run."""
        if popen.removed:
            return
        popen.removed = True
        _remove(popen.container)
        os.close(popen.pidfd)
        shutil.rmtree(popen.directory, ignore_errors=True)
        self._free_slot(popen.slot)

    def has_exited(self, popen: Container) -> bool:  # type: ignore[override]
        if popen.returncode is not None:
            return True
        poller = select.poll()
        poller.register(popen.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def exit_code(self, popen: Container) -> int | None:  # type: ignore[override]
        return popen.returncode

    def ran_out_of_memory(self, popen: Container) -> bool:  # type: ignore[override]
        """Whether the container's memory cgroup killed something in it."""
        kills = _oom_kills(popen.memory_cgroup)
        if kills is not None:
            return kills > (popen.oom_kills_at_start or 0)
        # The cgroup is gone with the container's end, or out of sight.
        try:
            popen.container.reload()
        except Exception:
            return False
        return bool(popen.container.attrs.get("State", {}).get("OOMKilled"))

    def has_leftovers(self, popen: Container) -> bool:  # type: ignore[override]
        """Whether processes beyond docker's init and the bootstrap live on.

        Where they cannot be counted from outside, under gVisor (whose
        processes are not the host's) or without a visible pids cgroup, any
        may have, so the container serves no further invocation.
        """
        if popen.pids_cgroup is None or self._gvisor:
            return True
        try:
            procs = (popen.pids_cgroup / "cgroup.procs").read_text().split()
        except OSError:
            return True
        return len(procs) > IDLE_PROCESSES

    def _run(
        self, slot: int, directory: Path, env: dict[str, str], memory_bytes: int
    ) -> Any:
        from docker.types import LogConfig, Ulimit

        uid = self._uid_base + slot
        limit = memory_bytes + CGROUP_SLACK_BYTES
        options: dict[str, Any] = {}
        if self._runtime:
            options["runtime"] = self._runtime
        # The image's own environment (and docker's additions) would reach
        # the function: it starts from nothing but what it was deployed with.
        environment = [f"{name}={value}" for name, value in env.items()]
        command = [
            "/usr/bin/env",
            "-i",
            *environment,
            "HOME=/tmp",
            IMAGE_PYTHON,
            "-I",
            "-S",
            IMAGE_BOOTSTRAP,
            "--receive",
            f"{SOCKET_MOUNT}/{SOCKET_NAME}",
        ]
        return self._client.containers.run(
            self._image,
            command,
            detach=True,
            name=f"conveyor-{directory.name}",
            labels={OWNER_LABEL: self._owner},
            init=True,
            user=f"{uid}:{uid}",
            working_dir="/tmp",
            hostname="conveyor",
            network_mode="none",
            ipc_mode="private",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={TMP_BYTES},mode=1777"},
            volumes={str(directory): {"bind": SOCKET_MOUNT, "mode": "ro"}},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges", f"seccomp={self._seccomp}"],
            mem_limit=limit,
            memswap_limit=limit,
            nano_cpus=int(CPU_CORES * 1e9),
            pids_limit=GVISOR_PIDS_MAX if self._gvisor else PIDS_MAX,
            ulimits=[
                Ulimit(name="as", soft=memory_bytes, hard=memory_bytes),
                Ulimit(name="core", soft=0, hard=0),
                Ulimit(name="nofile", soft=NOFILE, hard=NOFILE),
                Ulimit(name="fsize", soft=TMP_BYTES, hard=TMP_BYTES),
            ],
            log_config=LogConfig(type="none"),
            **options,
        )

    def _take_slot(self) -> int:
        with self._lock:
            if not self._free:
                raise ExecutorError("no sandbox slot is free")
            return self._free.pop(0)

    def _free_slot(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def _sweep_stale(self) -> None:
        """Remove the containers and sockets of runtimes that died on this host.

        Those of other hosts sharing the daemon are theirs to sweep.
        """
        host = socket.gethostname()
        stale = self._client.containers.list(all=True, filters={"label": OWNER_LABEL})
        for container in stale:
            owner = container.labels.get(OWNER_LABEL, "")
            owner_host, _, pid = owner.rpartition(":")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            logger.info("removing the container %s of a stopped runtime", owner)
            _remove(container)
        for directory in self._sockets.iterdir():
            pid = directory.name.split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(directory, ignore_errors=True)


def seccomp_profile() -> dict[str, Any]:
    """The process sandbox's seccomp rules, as a docker seccomp profile."""
    rules: list[dict[str, Any]] = [
        {
            "names": list(DENIED_SYSCALLS),
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
        },
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ]
    for family in DENIED_SOCKET_FAMILIES:
        rules.append(
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EACCES,
                "args": [{"index": 0, "value": int(family), "op": "SCMP_CMP_EQ"}],
            }
        )
    for call in ("clone", "unshare"):
        rules.append(
            {
                "names": [call],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [
                    {
                        "index": 0,
                        "value": CLONE_NEWUSER,
                        "valueTwo": CLONE_NEWUSER,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            }
        )
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}


def _listen(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        # Any uid may connect: the directory is mounted into one container.
        path.chmod(0o666)
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


def _hand_over(
    listener: socket.socket, container: Any, fds: tuple[int, int, int]
) -> tuple[int, int]:
    """Wait for the container's bootstrap, send it the descriptors; its pid
    and a pidfd of it."""
    deadline_s = time.monotonic() + START_TIMEOUT_S
    listener.settimeout(1.0)
    while True:
        try:
            connection, _ = listener.accept()
            break
        except TimeoutError:
            pass
        container.reload()
        if container.status not in ("created", "running"):
            raise ExecutorError(
                f"the container {container.name} ended ({container.status}) before "
                f"its bootstrap connected: {_tail_of(container)}"
            )
        if time.monotonic() > deadline_s:
            raise ExecutorError(
                f"the container {container.name} did not connect within "
                f"{START_TIMEOUT_S:g} s"
            )
    with connection:
        credentials = connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        pid = struct.unpack("3i", credentials)[0]
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(connection, [b"\0"], list(fds))
        except BaseException:
            os.close(pidfd)
            raise
    return pid, pidfd


def _tail_of(container: Any) -> str:
    state = container.attrs.get("State", {})
    return state.get("Error") or f"exit status {state.get('ExitCode')}"


def _exit_status(popen: Container) -> int | None:
    """The exit status of a container that was killed or ended, as subprocess
    reports one: negative for a signal."""
    try:
        status = popen.container.wait(timeout=KILL_WAIT_S)["StatusCode"]
    except Exception as exc:
        # The SDK raises requests' ConnectionError on a timeout.
        logger.warning("container %s did not end: %s", popen.container.id, exc)
        return None
    # docker's init reports a child killed by signal N as 128 + N.
    if status > 128:
        return -(status - 128)
    return int(status)


def _remove(container: Any) -> None:
    try:
        container.remove(force=True)
    except Exception as exc:
        logger.debug("removing container %s: %s", container.id, exc)


def _cgroups_of(pid: int) -> dict[str, Path]:
    """The cgroup v1 directories that hold ``pid``, by controller."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return {}
    groups = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in filter(None, controllers.split(",")):
            directory = _CGROUP_ROOT / controller / path.lstrip("/")
            if directory.is_dir():
                groups[controller] = directory
    return groups


def _oom_kills(memory_cgroup: Path | None) -> int | None:
    return None if memory_cgroup is None else oom_kill_count(memory_cgroup)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
