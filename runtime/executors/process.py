"""The process executor: warm local Python processes, a pool per function version.

Each process runs ``bootstrap.py`` (whose docstring describes the protocol on
its two control pipes), loads one function version once and then serves its
invocations one at a time. Its stdout and stderr share a third pipe, which
the thread running an invocation drains while it waits for the reply; the
marker the process writes at the end of each invocation separates one
invocation's output from the next.

The worker decides every verdict itself: the duration on its own clock, the
timeout, the size caps. Whatever the process writes can at worst mangle the
outcome of its own invocation, never crash ``run()`` or another function's
invocation.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import importlib.util
import json
import logging
import math
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conveyor_core.errors import ConfigurationError, ExecutorError
from conveyor_core.records import FunctionVersion, Outcome, State
from conveyor_core.settings import Settings
from runtime.executor import Executor
from runtime.executors import bootstrap

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
BOOTSTRAP_PATH = str(Path(bootstrap.__file__).resolve())

# Address space the interpreter and the bootstrap take before the function
# allocates anything, so that memory_mb is what the function itself gets:
# measured as VmPeak, a loaded bootstrap takes 14 MB here, 27 MB once asyncio
# (imported for coroutine functions) has run.
INTERPRETER_ALLOWANCE_BYTES = 32 * MIB

# Room for an error report in a reply header; the bootstrap clips messages
# and tracebacks to far less.
MAX_REPLY_HEADER_BYTES = MIB

# How long to wait for the end-of-output marker once the reply is in. The
# process writes the marker before the reply, so it is normally in the pipe
# already.
MARKER_WAIT_S = 2.0

# How long a process whose reply pipe closed gets to finish exiting, so that
# its exit status can be reported.
EXIT_WAIT_S = 2.0

# How long to wait for the output of a killed process to reach its end.
DRAIN_WAIT_S = 1.0

READ_CHUNK_BYTES = 64 * 1024
MAX_READ_BYTES = MIB
PIPE_BYTES = MIB

CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
CHILD_LANG = "C.UTF-8"


class Launcher:
    """Starts bootstrap processes as plain local children with resource limits.

    A sandbox backend subclasses this to wrap the command in its own launcher.
    It must give the process the descriptors in ``pass_fds`` (at their
    numbers, or, for a container that inherits none, by handing them over),
    use ``env`` as given, make ``kill`` end everything the process started,
    and apply ``memory_bytes`` before the function's code can run. What it
    returns is opaque to the executor but for its ``pid``, and is passed back
    to the other methods.
    """

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
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output_fd,
            stderr=output_fd,
            cwd=cwd,
            env=env,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )

        # Set from here rather than in a preexec_fn, which is unsafe while
        # other threads run and forces fork() over vfork(). The bootstrap
        # reads the function's source only after the executor's first write,
        # which follows this call, so no code of the function runs unlimited.
        try:
            resource.prlimit(process.pid, resource.RLIMIT_AS, (memory_bytes,) * 2)
            resource.prlimit(process.pid, resource.RLIMIT_CORE, (0, 0))
        except OSError:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        return process

    def kill(self, popen: subprocess.Popen[bytes]) -> None:
        """Kill the process and all it started, then reap it."""
        if popen.returncode is None:
            # The unreaped leader keeps the group id from being reused.
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            popen.wait()

    def release(self, popen: subprocess.Popen[bytes]) -> None:
        """Free what the launcher holds for a process that has been reaped."""

    def has_exited(self, popen: subprocess.Popen[bytes]) -> bool:
        """Whether the process has ended, without reaping it."""
        return popen.returncode is not None or _has_exited(popen.pid)

    def exit_code(self, popen: subprocess.Popen[bytes]) -> int | None:
        """The exit status of a process that kill() has reaped: negative for a
        signal, as subprocess reports it."""
        return popen.returncode

    def ran_out_of_memory(self, popen: subprocess.Popen[bytes]) -> bool:
        """Whether a memory limit outside the process killed it."""
        return False

    def has_leftovers(self, popen: subprocess.Popen[bytes]) -> bool:
        """Whether the process has started others that are still alive."""
        return False


SANDBOXES = ("auto", "process", "docker", "none")


def make_launcher(settings: Settings) -> Launcher:
    """The launcher CONVEYOR_SANDBOX names.

    ``auto`` is the process sandbox where it can run, and a refusal to run
    functions where it cannot; ``docker`` runs each warm process in a
    container of its own; ``none`` runs them as plain processes, for trusted
    code only.
    """
    sandbox = settings.sandbox
    if sandbox not in SANDBOXES:
        raise ConfigurationError(
            f"CONVEYOR_SANDBOX={sandbox!r} names no sandbox; use one of "
            f"{', '.join(SANDBOXES)}"
        )
    if sandbox == "none":
        logger.warning(
            "functions run without a sandbox (CONVEYOR_SANDBOX=none): run only "
            "code you trust"
        )
        return Launcher()

    if sandbox == "docker":
        from runtime.executors.container import DockerSandbox

        launcher: Launcher = DockerSandbox(
            settings.docker_image,
            settings.max_warm_processes,
            settings.data_dir,
            runtime=settings.docker_runtime,
        )
        logger.info(
            "functions run in docker containers of %s%s",
            settings.docker_image,
            f" under {settings.docker_runtime}" if settings.docker_runtime else "",
        )
        return launcher

    from runtime.executors.sandbox import ProcessSandbox, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise ConfigurationError(
            f"the process sandbox cannot run here: {reason}. Functions are "
            "untrusted code, so the runtime does not run them unsandboxed; "
            "use CONVEYOR_SANDBOX=docker, or, to run trusted code only, "
            "CONVEYOR_SANDBOX=none"
        )
    logger.info("functions run in the process sandbox")
    return ProcessSandbox(settings.max_warm_processes)


class _Deadline(Exception):
    """Raised inside the executor when an invocation's timeout passes."""


class _Hangup(Exception):
    """Raised inside the executor when the process closed its reply pipe."""


class _BadReply(Exception):
    """Raised inside the executor when a reply breaks the protocol or a cap."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error = {"type": error_type, "message": message, "traceback": ""}


class _Output:
    """A process's output pipe, cut into invocations at their markers.

    No thread of its own reads it: the thread running an invocation drains
    it while it waits for the reply, so a process that prints much never
    blocks, and reading costs no extra wake-up per invocation. What arrives
    between invocations waits in the pipe and goes to the next one.
    """

    def __init__(self, fd: int, max_log_bytes: int) -> None:
        self.fd = fd
        self.eof = False
        self._max_log_bytes = max_log_bytes
        self._kept = bytearray()
        self._dropped_bytes = 0
        self._marker = b""
        self._held = b""
        self._finished: tuple[bytes, int] | None = None
        self._readable = select.poll()
        self._readable.register(fd, select.POLLIN)

    def expect(self, marker: bytes) -> None:
        """Start an invocation whose output ends where ``marker`` appears."""
        self._marker = marker
        self._finished = None

    def read_available(self) -> None:
        """Take in what the pipe holds now, without waiting for more.

        Stops after MAX_READ_BYTES, so that a process printing as fast as it
        is read cannot hold the caller past its deadline.
        """
        taken = 0
        while not self.eof and taken < MAX_READ_BYTES:
            try:
                chunk = os.read(self.fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            taken += len(chunk)
            self._feed(chunk)

    def wait_marker(self, timeout_s: float) -> bool:
        """Read until the current invocation's marker; False if it never came."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            self.read_available()
            if self._finished is not None:
                return True
            remaining_s = deadline_s - time.monotonic()
            if self.eof or remaining_s <= 0:
                return False
            self._readable.poll(math.ceil(remaining_s * 1000))

    def read_to_end(self, timeout_s: float) -> None:
        """Read until the pipe closes, for a process that was killed."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            self.read_available()
            remaining_s = deadline_s - time.monotonic()
            if self.eof or remaining_s <= 0:
                return
            self._readable.poll(math.ceil(remaining_s * 1000))

    def collect(self) -> tuple[str, bool]:
        """The current invocation's output as text, and whether it was cut."""
        finished = self._finished
        if finished is None:
            # No marker came: all that arrived belongs to this invocation.
            self._keep(self._held)
            finished = self._finish()
        self._finished = None
        data, dropped_bytes = finished
        return data.decode("utf-8", "replace"), dropped_bytes > 0

    def _feed(self, chunk: bytes) -> None:
        if not self._marker:
            # Between invocations, or past the marker: it goes to the next one.
            self._keep(chunk)
            return

        data = self._held + chunk
        at = data.find(self._marker)
        if at < 0:
            # The last bytes may be the start of a marker split across two
            # reads: hold them back until the next read.
            cut = max(0, len(data) - len(self._marker) + 1)
            self._keep(data[:cut])
            self._held = data[cut:]
            return

        end = at + len(self._marker)
        self._keep(data[:at])
        self._finish()
        self._keep(data[end:])

    def _finish(self) -> tuple[bytes, int]:
        self._finished = (bytes(self._kept), self._dropped_bytes)
        self._kept = bytearray()
        self._dropped_bytes = 0
        self._held = b""
        self._marker = b""
        return self._finished

    def _keep(self, data: bytes) -> None:
        # Past the cap, bytes are only counted: a function printing without
        # end must not grow the worker's memory.
        room = self._max_log_bytes - len(self._kept)
        if room > 0:
            self._kept += data[:room]
        self._dropped_bytes += max(0, len(data) - max(0, room))


class _WarmProcess:
    """One bootstrap process bound to a function version, serving its calls."""

    def __init__(
        self,
        function: FunctionVersion,
        popen: subprocess.Popen[bytes],
        request_fd: int,
        reply_fd: int,
        output: _Output,
        workdir: str,
        max_result_bytes: int,
        launcher: Launcher,
    ) -> None:
        self.key = function.key
        self.pid = popen.pid
        self.last_used_s = time.monotonic()
        self.retired = False
        self._disposed = False
        self._popen = popen
        self._request_fd = request_fd
        self._reply_fd = reply_fd
        self._output = output
        self._workdir = workdir
        self._max_result_bytes = max_result_bytes
        self._launcher = launcher
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._readable = select.poll()
        self._readable.register(reply_fd, select.POLLIN)
        self._readable.register(output.fd, select.POLLIN)

        # Sent with the first request, under that invocation's timeout.
        init = {
            "name": function.name,
            "entrypoint": function.entrypoint,
            "kind": function.kind,
        }
        if function.kind == "pickle":
            # Only decoded from base64 here; unpickled inside the process.
            body = base64.b64decode(function.source)
        else:
            body = function.source.encode("utf-8", "surrogatepass")
        self._unsent = bootstrap.encode_frame(init, body)

    def alive(self) -> bool:
        return not self._launcher.has_exited(self._popen)

    def invoke(
        self, function: FunctionVersion, payload: bytes, invocation_id: str
    ) -> Outcome:
        marker = secrets.token_hex(16)
        request = bootstrap.encode_frame(
            {"id": invocation_id, "marker": marker}, payload
        )
        self._output.expect(marker.encode())
        started_s = time.monotonic()
        deadline_s = started_s + function.timeout_s
        try:
            self._write(self._unsent + request if self._unsent else request, deadline_s)
            self._unsent = b""
            header, body = self._read_reply(deadline_s)
            duration_ms = _elapsed_ms(started_s)
            outcome = _verdict(function, invocation_id, header, body)
        except _Deadline:
            # The worker logs the outcome; this says what was done about it.
            logger.info(
                "invocation %s of %s version %s timed out after %g s; killing "
                "process %s",
                invocation_id,
                function.name,
                function.version,
                function.timeout_s,
                self.pid,
                extra=_fields(function, invocation_id),
            )
            error = _timeout_error(function)
            return self._broken(State.TIMED_OUT, started_s, error)
        except _Hangup:
            return self._broken(State.FAILED, started_s, self._exit_error(function))
        except _BadReply as exc:
            logger.warning(
                "invocation %s: rejected the reply of process %s: %s",
                invocation_id,
                self.pid,
                exc,
                extra=_fields(function, invocation_id),
            )
            return self._broken(State.FAILED, started_s, exc.error)

        outcome.duration_ms = duration_ms
        self._settle(outcome, function)
        return outcome

    def _settle(self, outcome: Outcome, function: FunctionVersion) -> None:
        """Attach the invocation's output, retiring the process if it is unsound."""
        if outcome.error is not None and outcome.error["type"] == "MemoryError":
            # A process that ran out of memory may be left half broken.
            self.retired = True
        if self._buffer:
            # More bytes than one reply: replies are out of step from here on.
            self.retired = True
        if not self._output.wait_marker(MARKER_WAIT_S):
            # Late output would land in the next invocation's logs.
            self.retired = True
        if outcome.status is State.SUCCEEDED and self._launcher.ran_out_of_memory(
            self._popen
        ):
            # Something the function started was killed for memory: the
            # invocation used more than it was given, whatever it returned.
            outcome.status = State.FAILED
            outcome.result = None
            outcome.error = _memory_error(function, "")
            self.retired = True
        if self._launcher.has_leftovers(self._popen):
            # Nothing an invocation started may outlive it: the process goes,
            # and everything in its sandbox with it.
            self.retired = True
        outcome.logs, outcome.logs_truncated = self._output.collect()

    def terminate(self) -> None:
        """Kill the process and everything it started, and reap it."""
        with self._lock:
            self._launcher.kill(self._popen)

    def dispose(self) -> None:
        """Terminate the process and release all it held in the worker."""
        with self._lock:
            # Closing a descriptor twice could close another's that reused it.
            if self._disposed:
                return
            self._disposed = True
        self.retired = True
        self.terminate()
        self._launcher.release(self._popen)
        os.close(self._request_fd)
        os.close(self._reply_fd)
        os.close(self._output.fd)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _broken(self, status: State, started_s: float, error: dict) -> Outcome:
        duration_ms = _elapsed_ms(started_s)
        self.retired = True
        self.terminate()
        self._output.read_to_end(DRAIN_WAIT_S)
        logs, truncated = self._output.collect()
        return Outcome(
            status=status,
            error=error,
            logs=logs,
            logs_truncated=truncated,
            duration_ms=duration_ms,
        )

    def _write(self, data: bytes, deadline_s: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._request_fd, view) :]
            except BlockingIOError:
                _wait_for(self._request_fd, select.POLLOUT, deadline_s)
            except BrokenPipeError:
                raise _Hangup from None

    def _read_reply(self, deadline_s: float) -> tuple[bytes, bytes]:
        prefix = self._read_exact(bootstrap.PREFIX_BYTES, deadline_s)
        header_bytes, body_bytes = bootstrap.decode_prefix(prefix)
        if header_bytes > MAX_REPLY_HEADER_BYTES:
            raise _BadReply(
                "MalformedReply",
                f"the reply header is {header_bytes} bytes, over the cap of "
                f"{MAX_REPLY_HEADER_BYTES} bytes",
            )
        if body_bytes > self._max_result_bytes:
            raise _BadReply(
                "result_too_large",
                f"the result is {body_bytes} bytes of JSON, over the cap of "
                f"{self._max_result_bytes} bytes; return less, or store it "
                "elsewhere and return a reference",
            )
        frame = self._read_exact(header_bytes + body_bytes, deadline_s)
        return frame[:header_bytes], frame[header_bytes:]

    def _read_exact(self, size: int, deadline_s: float) -> bytes:
        """Read from the reply pipe, draining the output pipe meanwhile."""
        output = self._output
        while len(self._buffer) < size:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise _Deadline
            events = self._readable.poll(math.ceil(remaining_s * 1000))
            if not events:
                raise _Deadline
            if any(fd == output.fd for fd, _ in events):
                output.read_available()
                if output.eof:
                    # A closed pipe polls as ready for ever.
                    self._readable.unregister(output.fd)
            if not any(fd == self._reply_fd for fd, _ in events):
                continue
            want = min(max(size - len(self._buffer), READ_CHUNK_BYTES), MAX_READ_BYTES)
            try:
                chunk = os.read(self._reply_fd, want)
            except BlockingIOError:
                continue
            if not chunk:
                raise _Hangup
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _exit_error(self, function: FunctionVersion) -> dict:
        code = self._exit_status()
        if self._launcher.ran_out_of_memory(self._popen):
            return _memory_error(function, "")
        if code is None:
            message = "the function's process closed its reply pipe and was killed"
        elif code == bootstrap.EXIT_OUT_OF_MEMORY:
            return _memory_error(function, "")
        elif code < 0:
            message = (
                f"the function's process was killed by signal {_signal_name(-code)} "
                "before it replied"
            )
        else:
            message = (
                f"the function's process exited with code {code} before it replied"
            )
        return {"type": "ProcessExited", "message": message, "traceback": ""}

    def _exit_status(self) -> int | None:
        """The exit status once the process ends by itself, or None if it lingers."""
        give_up_s = time.monotonic() + EXIT_WAIT_S
        while not self._launcher.has_exited(self._popen):
            if time.monotonic() > give_up_s:
                self.terminate()
                return None
            time.sleep(0.002)
        self.terminate()
        return self._launcher.exit_code(self._popen)


class ProcessExecutor(Executor):
    """Runs invocations in warm local Python processes, a pool per version."""

    def __init__(
        self,
        max_processes: int = 32,
        max_result_bytes: int = 6 * MIB,
        max_log_bytes: int = MIB,
        idle_s: float = 300.0,
        python: str = sys.executable,
        launcher: Launcher | None = None,
    ) -> None:
        if max_processes < 1:
            raise ConfigurationError(
                f"max_processes={max_processes!r} leaves no room for a process; "
                "give at least 1"
            )
        if not python:
            raise ConfigurationError(
                "no Python interpreter to run functions with: sys.executable is "
                "empty; pass python='/path/to/python3'"
            )
        self._max_processes = max_processes
        self._max_result_bytes = max_result_bytes
        self._max_log_bytes = max_log_bytes
        self._idle_s = idle_s
        self._python = python
        self._launcher = launcher or Launcher()

        self._cond = threading.Condition()
        self._idle: dict[tuple[str, str, int], list[_WarmProcess]] = {}
        self._busy: set[_WarmProcess] = set()
        self._slots_used = 0
        self._waiting: Counter[tuple[str, str, int]] = Counter()
        self._closed = False

        self._stop = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap_idle, name="conveyor-process-reaper", daemon=True
        )
        self._reaper.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, launcher: Launcher | None = None
    ) -> ProcessExecutor:
        if launcher is None:
            launcher = make_launcher(settings)
        return cls(
            max_processes=settings.max_warm_processes,
            max_result_bytes=settings.max_result_bytes,
            max_log_bytes=settings.max_log_bytes,
            idle_s=settings.warm_idle_s,
            launcher=launcher,
        )

    def run(
        self, function: FunctionVersion, payload: bytes, invocation_id: str
    ) -> Outcome:
        process = self._acquire(function, invocation_id)
        try:
            outcome = process.invoke(function, payload, invocation_id)
        except BaseException:
            process.retired = True
            raise
        finally:
            self._release(process)
        logger.debug(
            "invocation %s of %s version %s: %s in %.1f ms on process %s",
            invocation_id,
            function.name,
            function.version,
            outcome.status.value,
            outcome.duration_ms,
            process.pid,
        )
        return outcome

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            idle = [p for processes in self._idle.values() for p in processes]
            busy = list(self._busy)
            self._idle.clear()
            self._cond.notify_all()

        self._stop.set()
        self._reaper.join()

        # Busy processes are disposed of by the threads running them, once
        # their invocation sees the process gone.
        for process in busy:
            process.terminate()
        for process in idle:
            process.dispose()
        with self._cond:
            self._slots_used -= len(idle)
            self._cond.notify_all()

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _acquire(self, function: FunctionVersion, invocation_id: str) -> _WarmProcess:
        """A warm process of the version, or a new one when the pool has room."""
        key = function.key
        dead: list[_WarmProcess] = []
        victim = None
        with self._cond:
            self._waiting[key] += 1
            try:
                while True:
                    if self._closed:
                        raise ExecutorError("the process executor is closed")
                    process = self._take_idle(key, dead)
                    if process is not None:
                        break
                    if self._slots_used < self._max_processes:
                        self._slots_used += 1
                        break
                    victim = self._take_least_recent()
                    if victim is not None:
                        break
                    self._cond.wait()
            finally:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]

        for stale in [*dead, victim]:
            if stale is not None:
                stale.dispose()
        if dead:
            self._free_slots(len(dead))
        if process is not None:
            return process
        return self._start_in_slot(function, invocation_id)

    def _take_idle(
        self, key: tuple[str, str, int], dead: list[_WarmProcess]
    ) -> _WarmProcess | None:
        processes = self._idle.get(key)
        while processes:
            # The most recently used one, so that the rest can age out.
            process = processes.pop()
            if not processes:
                del self._idle[key]
            if process.alive():
                self._busy.add(process)
                return process
            dead.append(process)
            processes = self._idle.get(key)
        return None

    def _take_least_recent(self) -> _WarmProcess | None:
        """Remove and return the idle process to evict, keeping its slot taken."""
        candidates = [
            process
            for key, processes in self._idle.items()
            if key not in self._waiting
            for process in processes
        ]
        if not candidates:
            return None
        victim = min(candidates, key=lambda process: process.last_used_s)
        processes = self._idle[victim.key]
        processes.remove(victim)
        if not processes:
            del self._idle[victim.key]
        return victim

    def _start_in_slot(
        self, function: FunctionVersion, invocation_id: str
    ) -> _WarmProcess:
        try:
            process = self._start(function)
        except BaseException:
            self._free_slots(1)
            raise
        logger.debug(
            "invocation %s: started process %s for %s version %s",
            invocation_id,
            process.pid,
            function.name,
            function.version,
        )
        with self._cond:
            closed = self._closed
            if not closed:
                self._busy.add(process)
        if closed:
            process.dispose()
            self._free_slots(1)
            raise ExecutorError("the process executor is closed")
        return process

    def _release(self, process: _WarmProcess) -> None:
        with self._cond:
            self._busy.discard(process)
            if not process.retired and not self._closed:
                process.last_used_s = time.monotonic()
                self._idle.setdefault(process.key, []).append(process)
                self._cond.notify_all()
                return
        process.dispose()
        self._free_slots(1)

    def _free_slots(self, count: int) -> None:
        with self._cond:
            self._slots_used -= count
            self._cond.notify_all()

    def _start(self, function: FunctionVersion) -> _WarmProcess:
        """Start a bootstrap process for the version; ExecutorError if it cannot."""
        workdir = ""
        fds: list[int] = []
        try:
            workdir = tempfile.mkdtemp(prefix="conveyor-fn-")
            request_r, request_w = os.pipe()
            fds += (request_r, request_w)
            reply_r, reply_w = os.pipe()
            fds += (reply_r, reply_w)
            output_r, output_w = os.pipe()
            fds += (output_r, output_w)
            command = [self._python, "-I", "-S", BOOTSTRAP_PATH]
            popen = self._launcher.start(
                [*command, str(request_r), str(reply_w), _sdk_parent()],
                env=_child_env(function, workdir),
                cwd=workdir,
                pass_fds=(request_r, reply_w),
                output_fd=output_w,
                memory_bytes=function.memory_mb * MIB + INTERPRETER_ALLOWANCE_BYTES,
            )
        except (OSError, TypeError, ValueError, subprocess.SubprocessError) as exc:
            for fd in fds:
                os.close(fd)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            raise ExecutorError(
                f"cannot start a process for {function.name!r} version "
                f"{function.version} with {self._python}: {exc}"
            ) from exc

        for fd in (request_r, reply_w, output_w):
            os.close(fd)
        for fd in (request_w, reply_r, output_r):
            os.set_blocking(fd, False)
        _grow_pipe(reply_r)
        _grow_pipe(output_r)
        output = _Output(output_r, self._max_log_bytes)
        return _WarmProcess(
            function,
            popen,
            request_w,
            reply_r,
            output,
            workdir,
            self._max_result_bytes,
            self._launcher,
        )

    def _reap_idle(self) -> None:
        """Dispose of processes idle for longer than idle_s, until close()."""
        while not self._stop.is_set():
            expired, wait_s = self._take_expired()
            for process in expired:
                logger.debug("process %s idle too long; stopping it", process.pid)
                process.dispose()
            if expired:
                self._free_slots(len(expired))
            self._stop.wait(wait_s)

    def _take_expired(self) -> tuple[list[_WarmProcess], float]:
        now_s = time.monotonic()
        expired = []
        next_s = now_s + self._idle_s
        with self._cond:
            for key in list(self._idle):
                kept = []
                for process in self._idle[key]:
                    due_s = process.last_used_s + self._idle_s
                    if due_s <= now_s or not process.alive():
                        expired.append(process)
                    else:
                        kept.append(process)
                        next_s = min(next_s, due_s)
                if kept:
                    self._idle[key] = kept
                else:
                    del self._idle[key]

        # Checking at least four times per idle_s bounds how long a process
        # can overstay to a quarter of idle_s.
        wait_s = min(next_s - now_s, self._idle_s / 4)
        return expired, max(wait_s, 0.01)


def _verdict(
    function: FunctionVersion, invocation_id: str, header_bytes: bytes, body: bytes
) -> Outcome:
    """The outcome a well-framed reply stands for; _BadReply if it is malformed."""
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise _BadReply("MalformedReply", "the reply header is not JSON") from None
    if not isinstance(header, dict) or header.get("id") != invocation_id:
        raise _BadReply("MalformedReply", "the reply does not answer this invocation")

    if header.get("ok") is True:
        try:
            result = json.loads(body)
        except ValueError:
            raise _BadReply("MalformedReply", "the result is not JSON") from None
        return Outcome(status=State.SUCCEEDED, result=result)

    error = header.get("error")
    if not isinstance(error, dict):
        raise _BadReply("MalformedReply", "the reply has neither result nor error")
    error = {
        field: str(error.get(field) or "") for field in ("type", "message", "traceback")
    }
    if error["type"] == "MemoryError":
        error = _memory_error(function, error["traceback"])
    return Outcome(status=State.FAILED, error=error)


def _memory_error(function: FunctionVersion, traceback: str) -> dict[str, Any]:
    return {
        "type": "MemoryError",
        "message": (
            f"the function exceeded its memory limit of {function.memory_mb} MB; "
            "use less memory or register it with a larger memory_mb"
        ),
        "traceback": traceback,
    }


def _timeout_error(function: FunctionVersion) -> dict[str, Any]:
    return {
        "type": "TimeoutError",
        "message": (
            f"{function.name} version {function.version} exceeded its timeout "
            f"of {function.timeout_s:g} s"
        ),
        "traceback": "",
    }


@functools.cache
def _sdk_parent() -> str:
    """The directory the ``conveyor`` SDK is imported from, or ""."""
    spec = importlib.util.find_spec("conveyor")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)


def _child_env(function: FunctionVersion, workdir: str) -> dict[str, str]:
    # Built from nothing: the worker's own environment holds the platform's
    # credentials.
    env = {"PATH": CHILD_PATH, "LANG": CHILD_LANG, "HOME": workdir}
    env.update(function.env)
    return env


def _grow_pipe(fd: int) -> None:
    # Fewer, larger reads for big results; a host that refuses keeps the
    # default size, which works as well.
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, AttributeError):
        return


def _wait_for(fd: int, events: int, deadline_s: float) -> None:
    remaining_s = deadline_s - time.monotonic()
    poller = select.poll()
    poller.register(fd, events)
    if remaining_s <= 0 or not poller.poll(math.ceil(remaining_s * 1000)):
        raise _Deadline


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the exit status for Popen to collect: until then the
    # process keeps its id, so that killpg() cannot reach a stranger.
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    try:
        return os.waitid(os.P_PID, pid, flags) is not None
    except ChildProcessError:
        return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _elapsed_ms(started_s: float) -> float:
    return (time.monotonic() - started_s) * 1000


def _fields(function: FunctionVersion, invocation_id: str) -> dict[str, Any]:
    return {
        "invocation_id": invocation_id,
        "function": function.name,
        "tenant": function.tenant,
    }
