"""The process sandbox: each warm process in its own namespaces and cgroups.

A sandboxed process is started by bubblewrap in new network, PID, IPC, UTS,
mount (and, where possible, cgroup) namespaces. Its file system holds only
``/usr``, the interpreter's tree, the SDK and the bootstrap, all read-only,
with a private ``/proc``, a minimal ``/dev`` and a small tmpfs ``/tmp``;
the host's ``/etc``, ``/home``, sockets and the platform's files are not
there. Inside, ``setpriv`` drops to a uid of the slot's own, clears groups,
capabilities and sets no-new-privileges; ``prlimit`` sets the rlimits; and
a seccomp filter refuses sockets other than AF_UNIX, ptrace, mount,
unshare, setns, bpf, keyrings, io_uring, module and kexec calls, and new
user namespaces. cgroup v1 limits memory, CPU and the number of processes;
a cgroup v2 group per process lets the worker kill everything it started at
once, ``setsid()`` children included.

The process waits (bubblewrap's ``--block-fd``) until the worker has moved
it into its cgroups, so no code of the function runs outside them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conveyor_core.errors import ConfigurationError, ExecutorError
from runtime.executors.process import Launcher

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu")
V2_ROOT = CGROUP_ROOT / "unified"

#: Processes (threads count) one sandboxed process may have at once.
PIDS_MAX = 64
#: CPU one sandboxed process may use, in cores.
CPU_CORES = 1.0
CPU_PERIOD_US = 100_000
#: Size of the private /tmp.
TMP_BYTES = 64 * 1024 * 1024
#: Extra memory the cgroup allows beyond the address-space limit's share, for
#: page tables and the kernel's own accounting.
CGROUP_SLACK_BYTES = 16 * 1024 * 1024

#: The first uid of this worker's slots: each runtime process takes a range
#: of its own, so two runtimes on one host do not share uids.
UID_BASE = 1_000_000
UID_SPAN = 100

#: How long bubblewrap gets to report its child's pid.
START_TIMEOUT_S = 10.0

DENIED_SYSCALLS = (
    "ptrace",
    "mount",
    "umount2",
    "unshare",
    "setns",
    "pivot_root",
    "chroot",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "perf_event_open",
    "userfaultfd",
    "process_vm_readv",
    "process_vm_writev",
    "open_by_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
)
DENIED_SOCKET_FAMILIES = (
    socket.AF_INET,
    socket.AF_INET6,
    socket.AF_NETLINK,
    socket.AF_PACKET,
)
CLONE_NEWUSER = 0x10000000
_TOOLS = ("bwrap", "setpriv", "prlimit")


def unavailable_reason() -> str | None:
    """Why the process sandbox cannot run on this host, or None if it can."""
    if sys.platform != "linux":
        return "it needs Linux"
    if os.geteuid() != 0:
        return "it needs root, to set up namespaces, cgroups and uids"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"{', '.join(missing)} not found; install bubblewrap and util-linux "
            "(apt-get install bubblewrap)"
        )
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"pyseccomp cannot load libseccomp ({exc}); pip install pyseccomp"
    for controller in V1_CONTROLLERS:
        if not os.access(CGROUP_ROOT / controller, os.W_OK):
            return f"the cgroup v1 {controller} controller is not writable"
    if not (V2_ROOT / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy at {V2_ROOT}, needed to kill a process tree"
    return None


@dataclass
class _Slot:
    number: int
    cgroups: list[Path] = field(default_factory=list)
    kill_group: Path | None = None
    oom_kills_at_start: int = 0


class ProcessSandbox(Launcher):
    """Starts each bootstrap process inside bubblewrap with its own limits."""

    def __init__(self, max_processes: int) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise ConfigurationError(f"the process sandbox cannot run here: {reason}")
        if max_processes > UID_SPAN:
            raise ConfigurationError(
                f"the process sandbox gives each of at most {UID_SPAN} warm "
                f"processes a uid of its own; lower CONVEYOR_MAX_WARM_PROCESSES "
                f"from {max_processes}"
            )
        self._uid_base = UID_BASE + (os.getpid() % 10_000) * UID_SPAN
        self._group = f"conveyor-{os.getpid()}"
        self._lock = threading.Lock()
        self._free = list(range(UID_SPAN))
        self._slots: dict[int, _Slot] = {}
        self._seccomp = _seccomp_program()
        _sweep_stale_groups()
        self._python = os.path.realpath(sys.executable)
        self._prefix = os.path.realpath(sys.prefix)
        self._base_prefix = os.path.realpath(sys.base_prefix)

    def start(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str],
        cwd: str,
        pass_fds: Sequence[int],
        output_fd: int,
        memory_bytes: int,
    ) -> subprocess.Popen[bytes]:
        slot = self._take_slot()
        info_r = info_w = block_r = block_w = program = -1
        try:
            self._make_cgroups(slot, memory_bytes)
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            program = _program_fd(self._seccomp)
            uid = self._uid_base + slot.number
            argv = self._bwrap_argv(
                command, env, info_w, block_r, program, uid, memory_bytes
            )
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output_fd,
                stderr=output_fd,
                pass_fds=(*pass_fds, info_w, block_r, program),
                start_new_session=True,
            )
        except BaseException:
            for fd in (info_r, info_w, block_r, block_w, program):
                if fd >= 0:
                    os.close(fd)
            self._drop_slot(slot)
            raise
        os.close(info_w)
        os.close(block_r)
        os.close(program)
        try:
            child = _read_child_pid(info_r, popen)
            for group in [*slot.cgroups, slot.kill_group]:
                assert group is not None
                (group / "cgroup.procs").write_text(str(child))
            # Let the sandboxed process go on, inside its cgroups from now on.
            os.write(block_w, b"1")
        except BaseException:
            _kill(popen)
            self._drop_slot(slot)
            raise
        finally:
            os.close(info_r)
            os.close(block_w)
        with self._lock:
            self._slots[popen.pid] = slot
        return popen

    def kill(self, popen: subprocess.Popen[bytes]) -> None:
        """Kill everything the process started, wherever it went."""
        slot = self._slots.get(popen.pid)
        if slot is not None and slot.kill_group is not None:
            try:
                (slot.kill_group / "cgroup.kill").write_text("1")
            except OSError as exc:
                logger.debug("cgroup.kill of %s failed: %s", slot.kill_group, exc)
        _kill(popen)

    def release(self, popen: subprocess.Popen[bytes]) -> None:
        """Remove the process's cgroups and free its slot; it has been reaped."""
        with self._lock:
            slot = self._slots.pop(popen.pid, None)
        if slot is not None:
            self._drop_slot(slot)

    def has_leftovers(self, popen: subprocess.Popen[bytes]) -> bool:
        """Whether processes beyond the warm process itself are alive in it.

        The sandbox's own init and the interpreter are the only ones an idle
        warm process has; anything else was started by the function and must
        not outlive its invocation.
        """
        slot = self._slots.get(popen.pid)
        if slot is None or slot.kill_group is None:
            return False
        try:
            procs = (slot.kill_group / "cgroup.procs").read_text().split()
        except OSError:
            return True
        return len(procs) > 2

    def ran_out_of_memory(self, popen: subprocess.Popen[bytes]) -> bool:
        """Whether the memory cgroup killed something of this process."""
        slot = self._slots.get(popen.pid)
        if slot is None:
            return False
        return _oom_kills(slot) > slot.oom_kills_at_start

    # Slots and cgroups.

    def _take_slot(self) -> _Slot:
        with self._lock:
            if not self._free:
                raise ExecutorError("no sandbox slot is free")
            return _Slot(self._free.pop(0))

    def _drop_slot(self, slot: _Slot) -> None:
        for group in [slot.kill_group, *slot.cgroups]:
            if group is not None:
                _remove_cgroup(group)
        with self._lock:
            self._free.append(slot.number)

    def _make_cgroups(self, slot: _Slot, memory_bytes: int) -> None:
        name = f"{self._group}-{slot.number}"
        for controller in V1_CONTROLLERS:
            group = CGROUP_ROOT / controller / "conveyor" / name
            _remove_cgroup(group)
            group.mkdir(parents=True)
            slot.cgroups.append(group)
        memory, pids, cpu = slot.cgroups
        limit = memory_bytes + CGROUP_SLACK_BYTES
        (memory / "memory.limit_in_bytes").write_text(str(limit))
        try:
            (memory / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            # No swap accounting on this kernel: the memory limit alone holds.
            pass
        (pids / "pids.max").write_text(str(PIDS_MAX))
        (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(int(CPU_PERIOD_US * CPU_CORES)))
        slot.oom_kills_at_start = _oom_kills(slot)

        kill_group = V2_ROOT / "conveyor" / name
        _remove_cgroup(kill_group)
        kill_group.mkdir(parents=True)
        slot.kill_group = kill_group

    # The command.

    def _bwrap_argv(
        self,
        command: Sequence[str],
        env: dict[str, str],
        info_fd: int,
        block_fd: int,
        program_fd: int,
        uid: int,
        memory_bytes: int,
    ) -> list[str]:
        argv = [
            "bwrap",
            "--unshare-net",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "conveyor",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--symlink",
            "usr/bin",
            "/bin",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(TMP_BYTES),
            "--perms",
            "1777",
            "--tmpfs",
            "/tmp",
        ]
        seen: set[str] = set()
        for path in self._read_only_paths(command):
            argv += _bind_with_parents(path, seen)
        argv += ["--chdir", "/tmp", "--clearenv"]
        for name, value in env.items():
            argv += ["--setenv", name, value]
        argv += [
            "--setenv",
            "HOME",
            "/tmp",
            "--info-fd",
            str(info_fd),
            "--block-fd",
            str(block_fd),
            "--seccomp",
            str(program_fd),
            "--",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "prlimit",
            f"--as={memory_bytes}",
            "--core=0",
            f"--nofile={256}",
            f"--fsize={TMP_BYTES}",
            "--",
            *command,
        ]
        return argv

    def _read_only_paths(self, command: Sequence[str]) -> list[str]:
        """The interpreter's trees and every path the command names."""
        paths = [self._base_prefix, self._prefix]
        for part in command[1:]:
            if part.startswith("/"):
                paths += [p for p in part.split(os.pathsep) if p]
        # Ones already under /usr are bound with it.
        return [
            path
            for path in dict.fromkeys(paths)
            if os.path.exists(path) and not path.startswith("/usr/")
        ]


def _bind_with_parents(path: str, seen: set[str]) -> list[str]:
    """Arguments binding ``path`` read-only, its parents traversable."""
    argv: list[str] = []
    parents = []
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        parents.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(parents):
        if directory not in seen:
            seen.add(directory)
            argv += ["--perms", "0755", "--dir", directory]
    if path not in seen:
        seen.add(path)
        argv += ["--ro-bind", path, path]
    return argv


def _seccomp_program() -> bytes:
    """The compiled seccomp filter, for bwrap's --seccomp."""
    import pyseccomp as seccomp

    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for family in DENIED_SOCKET_FAMILIES:
        rules.add_rule(
            seccomp.ERRNO(errno.EACCES), "socket", seccomp.Arg(0, seccomp.EQ, family)
        )
    for name in DENIED_SYSCALLS:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):
            # A call this architecture does not have.
            logger.debug("seccomp: no syscall %s here", name)
    for call in ("clone", "unshare"):
        rules.add_rule(
            seccomp.ERRNO(errno.EPERM),
            call,
            seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER),
        )
    # clone3 passes its flags in memory, out of a filter's reach: refusing it
    # makes the C library fall back to clone, which the rule above checks.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


def _program_fd(program: bytes) -> int:
    """A descriptor of its own to read the filter from: bwrap reads it to the
    end, which would leave a shared one empty for the next process."""
    fd = os.memfd_create("conveyor-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_child_pid(fd: int, popen: subprocess.Popen[bytes]) -> int:
    """The pid bubblewrap reports for its child on the info fd."""
    deadline = time.monotonic() + START_TIMEOUT_S
    data = b""
    while b"child-pid" not in data or not data.rstrip().endswith(b"}"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            raise ExecutorError("bubblewrap did not report its child in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            code = popen.poll()
            raise ExecutorError(
                f"bubblewrap exited (status {code}) before starting the function's "
                "process; its error is in the invocation's output"
            )
        data += chunk
    return int(json.loads(data)["child-pid"])


def _kill(popen: subprocess.Popen[bytes]) -> None:
    if popen.returncode is None:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait()


def _oom_kills(slot: _Slot) -> int:
    if not slot.cgroups:
        return 0
    return oom_kill_count(slot.cgroups[0]) or 0


def oom_kill_count(memory_cgroup: Path) -> int | None:
    """How many processes the cgroup v1 memory group has killed, or None
    when the group is gone or out of sight."""
    try:
        text = (memory_cgroup / "memory.oom_control").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return None


def _sweep_stale_groups() -> None:
    """Remove the cgroups of runtimes that died without cleaning up."""
    for root in [CGROUP_ROOT / c / "conveyor" for c in V1_CONTROLLERS] + [
        V2_ROOT / "conveyor"
    ]:
        if not root.is_dir():
            continue
        for group in root.iterdir():
            owner = group.name.split("-")
            if len(owner) != 3 or owner[0] != "conveyor" or not owner[1].isdigit():
                continue
            if Path(f"/proc/{owner[1]}").exists():
                continue
            if root.parent == V2_ROOT:
                try:
                    (group / "cgroup.kill").write_text("1")
                except OSError:
                    pass
            _remove_cgroup(group)


def _remove_cgroup(group: Path) -> None:
    """Remove a cgroup once its processes are gone; quietly if it is absent."""
    if not group.exists():
        return
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # Processes are still leaving it.
            time.sleep(0.01)
    logger.warning("could not remove the cgroup %s", group)
