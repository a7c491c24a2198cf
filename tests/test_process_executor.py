"""The process executor: warm processes, verdicts, limits and isolation."""

from __future__ import annotations

import base64
import datetime
import json
import pickle
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor_core.errors import ConfigurationError, ExecutorError
from conveyor_core.records import FunctionVersion, State
from conveyor_core.settings import Settings
from runtime.executors import bootstrap
from runtime.executors.process import Launcher, ProcessExecutor, make_launcher

MIB = 1024 * 1024


def function(
    source: str,
    *,
    name: str = "fn",
    version: int = 1,
    entrypoint: str = "main",
    timeout_s: float = 10.0,
    memory_mb: int = 128,
    env: dict[str, str] | None = None,
) -> FunctionVersion:
    return FunctionVersion(
        tenant="acme",
        name=name,
        version=version,
        source=textwrap.dedent(source),
        entrypoint=entrypoint,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        env=env or {},
        created_at=0.0,
    )


def payload(*args: object, **kwargs: object) -> bytes:
    return json.dumps({"args": list(args), "kwargs": kwargs}).encode()


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    give_up_s = time.monotonic() + timeout_s
    while time.monotonic() < give_up_s:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def executor() -> Iterator[ProcessExecutor]:
    with ProcessExecutor(max_processes=4, max_log_bytes=64 * 1024) as executor:
        yield executor


PID = """
import os

def main():
    return os.getpid()
"""


def test_runs_with_args_and_kwargs_and_returns_json(executor):
    fn = function(
        """
        def main(a, b, *, scale=1):
            return {"sum": (a + b) * scale, "items": [a, b], "none": None}
        """
    )

    outcome = executor.run(fn, payload(2, 3, scale=10), "inv-1")

    assert outcome.status is State.SUCCEEDED
    assert outcome.result == {"sum": 50, "items": [2, 3], "none": None}
    assert outcome.error is None
    assert outcome.duration_ms > 0


def test_large_payload_reaches_a_process_still_starting(executor):
    fn = function("def main(text):\n    return len(text)\n")

    outcome = executor.run(fn, payload("p" * (3 * MIB)), "inv-1")

    assert outcome.result == 3 * MIB


def test_limits_are_set_before_the_function_runs(executor):
    fn = function(
        """
        import resource

        LIMITS = [
            list(resource.getrlimit(resource.RLIMIT_AS)),
            list(resource.getrlimit(resource.RLIMIT_CORE)),
        ]

        def main():
            return LIMITS
        """,
        memory_mb=100,
    )

    address_space, core = executor.run(fn, payload(), "inv-1").result

    assert address_space[0] == address_space[1]
    assert 100 * MIB < address_space[0] <= 200 * MIB
    assert core == [0, 0]


def test_installed_packages_stay_importable(executor):
    fn = function(
        """
        import importlib.util

        def main(name):
            return importlib.util.find_spec(name) is not None
        """
    )

    # pytest is installed wherever this test runs.
    assert executor.run(fn, payload("pytest"), "inv-1").result is True


def test_output_is_captured_per_invocation(executor):
    fn = function(
        """
        import sys

        def main(word):
            print("out", word)
            print("err", word, file=sys.stderr)
            sys.stdout.write("no newline " + word)
            return word
        """
    )

    first = executor.run(fn, payload("one"), "inv-1")
    second = executor.run(fn, payload("two"), "inv-2")

    assert first.logs == "out one\nerr one\nno newline one"
    assert second.logs == "out two\nerr two\nno newline two"
    assert not first.logs_truncated and not second.logs_truncated


def test_output_of_loading_goes_to_the_first_invocation(executor):
    fn = function(
        """
        print("loading")

        def main():
            print("running")
        """
    )

    assert executor.run(fn, payload(), "inv-1").logs == "loading\nrunning\n"
    assert executor.run(fn, payload(), "inv-2").logs == "running\n"


def test_warm_process_is_reused_within_a_version_only(executor):
    v1 = function(PID, version=1)
    v2 = function(PID, version=2)

    first = executor.run(v1, payload(), "inv-1").result
    again = executor.run(v1, payload(), "inv-2").result
    other = executor.run(v2, payload(), "inv-3").result

    assert first == again
    assert other != first
    assert executor.run(v1, payload(), "inv-4").result == first


def test_raising_function_reports_type_message_and_traceback(executor):
    fn = function(
        """
        def helper(value):
            raise ValueError(f"bad value {value}")

        def main(value):
            return helper(value)
        """,
        name="checker",
    )

    outcome = executor.run(fn, payload(7), "inv-1")

    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "ValueError"
    assert outcome.error["message"] == "bad value 7"
    traceback = outcome.error["traceback"]
    assert 'File "<checker>.py", line 3, in helper' in traceback
    assert 'raise ValueError(f"bad value {value}")' in traceback
    assert "bootstrap" not in traceback
    # The process stays warm after an ordinary exception.
    assert executor.run(fn, payload(8), "inv-2").error["message"] == "bad value 8"


def test_syntax_error_is_the_error_of_each_invocation(executor):
    fn = function("def main(:\n    return 1\n", name="broken")

    for invocation_id in ("inv-1", "inv-2"):
        outcome = executor.run(fn, payload(), invocation_id)
        assert outcome.status is State.FAILED
        assert outcome.error["type"] == "SyntaxError"
        assert "<broken>.py" in outcome.error["traceback"]


def test_exception_while_loading_is_reported(executor):
    fn = function("import no_such_module_here\n\ndef main():\n    return 1\n")

    outcome = executor.run(fn, payload(), "inv-1")

    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "ModuleNotFoundError"
    assert "no_such_module_here" in outcome.error["message"]


def test_missing_entrypoint_is_reported(executor):
    missing = function("def handler():\n    return 1\n", entrypoint="main")
    not_callable = function("main = 3\n", entrypoint="main", version=2)

    outcome = executor.run(missing, payload(), "inv-1")
    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "EntrypointNotFound"
    assert "'main'" in outcome.error["message"]

    outcome = executor.run(not_callable, payload(), "inv-2")
    assert outcome.error["type"] == "EntrypointNotFound"
    assert "int" in outcome.error["message"]


def test_payload_of_the_wrong_shape_fails_the_invocation(executor):
    fn = function("def main(*args, **kwargs):\n    return 1\n")

    for invocation_id, body in (("inv-1", b"[1, 2]"), ("inv-2", b"{not json")):
        outcome = executor.run(fn, body, invocation_id)
        assert outcome.status is State.FAILED
        assert outcome.error["type"] in ("TypeError", "JSONDecodeError")


def test_async_function_is_awaited(executor):
    fn = function(
        """
        import asyncio

        async def main(delay_s, value):
            await asyncio.sleep(delay_s)
            return {"value": value}
        """
    )

    outcome = executor.run(fn, payload(0.01, "done"), "inv-1")

    assert outcome.status is State.SUCCEEDED
    assert outcome.result == {"value": "done"}


def test_a_result_beyond_json_travels_pickled(executor):
    fn = function(
        """
        import datetime
        from dataclasses import dataclass

        @dataclass
        class Point:
            x: int
            y: int

        def main(kind):
            if kind == "tuple":
                return (1, "two")
            if kind == "set":
                return {1, 2}
            if kind == "point":
                return Point(1, 2)
            return datetime.date(2026, 12, 3)
        """
    )

    results = {}
    for kind in ("tuple", "set", "point", "date"):
        outcome = executor.run(fn, payload(kind), f"inv-{kind}")
        assert outcome.status is State.SUCCEEDED, outcome.error
        assert set(outcome.result) == {"__conveyor_pickle__"}
        results[kind] = pickle.loads(
            base64.b64decode(outcome.result["__conveyor_pickle__"])
        )

    assert results["tuple"] == (1, "two")
    assert results["set"] == {1, 2}
    assert (results["point"].x, results["point"].y) == (1, 2)
    assert results["date"] == datetime.date(2026, 12, 3)


def test_a_result_neither_json_nor_picklable_is_a_type_error(executor):
    fn = function("def main():\n    return (x for x in range(3))\n")

    outcome = executor.run(fn, payload(), "inv-1")

    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "TypeError"
    assert "neither plain JSON nor picklable" in outcome.error["message"]


def test_pickled_arguments_and_a_pickled_function_run_inside(executor):
    import cloudpickle

    def shift(when, by=None):
        return when + by

    fn = function("", entrypoint="shift")
    fn.kind = "pickle"
    fn.source = base64.b64encode(cloudpickle.dumps(shift)).decode()
    args = {
        "args": [_pickled(datetime.date(2026, 12, 3))],
        "kwargs": {"by": _pickled(datetime.timedelta(days=1))},
    }

    outcome = executor.run(fn, json.dumps(args).encode(), "inv-1")

    assert outcome.status is State.SUCCEEDED, outcome.error
    result = pickle.loads(base64.b64decode(outcome.result["__conveyor_pickle__"]))
    assert result == datetime.date(2026, 12, 4)


def test_an_error_in_a_pickled_function_shows_its_own_frames(executor):
    import cloudpickle

    def explode(n):
        return 1 // n

    fn = function("", entrypoint="explode")
    fn.kind = "pickle"
    fn.source = base64.b64encode(cloudpickle.dumps(explode)).decode()

    outcome = executor.run(fn, payload(0), "inv-1")

    assert outcome.error["type"] == "ZeroDivisionError"
    assert "in explode" in outcome.error["traceback"]
    assert "bootstrap" not in outcome.error["traceback"]


def _pickled(value):
    return {"__conveyor_pickle__": base64.b64encode(pickle.dumps(value)).decode()}


def test_timeout_kills_the_process_and_the_next_call_starts_fresh(executor):
    fn = function(
        """
        import os
        import time

        def main(sleep_s):
            print("about to sleep", flush=True)
            time.sleep(sleep_s)
            return os.getpid()
        """,
        timeout_s=0.5,
    )
    slow_pid = executor.run(fn, payload(0), "inv-0").result

    started_s = time.monotonic()
    outcome = executor.run(fn, payload(30), "inv-1")
    elapsed_s = time.monotonic() - started_s

    assert outcome.status is State.TIMED_OUT
    assert outcome.error["type"] == "TimeoutError"
    assert "exceeded its timeout of 0.5 s" in outcome.error["message"]
    assert outcome.logs == "about to sleep\n"
    assert 0.5 <= elapsed_s < 2.0
    assert 400 <= outcome.duration_ms < 2000
    assert not running(slow_pid)

    after = executor.run(fn, payload(0), "inv-2")
    assert after.status is State.SUCCEEDED
    assert after.result != slow_pid


def test_timeout_kills_what_the_function_started(executor):
    fn = function(
        """
        import subprocess
        import time

        def main():
            child = subprocess.Popen(["sleep", "60"])
            print(child.pid, flush=True)
            time.sleep(30)
        """,
        timeout_s=0.5,
    )

    outcome = executor.run(fn, payload(), "inv-1")

    assert outcome.status is State.TIMED_OUT
    assert wait_until(lambda: not running(int(outcome.logs)))


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("os._exit(3)", "exited with code 3"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "killed by signal SIGKILL"),
    ],
)
def test_process_dying_mid_invocation_is_a_failure(executor, statement, expected):
    fn = function(
        f"""
        import os
        import signal

        def main(die):
            print("dying" if die else "fine", flush=True)
            if die:
                {statement}
            return os.getpid()
        """
    )
    pid = executor.run(fn, payload(False), "inv-0").result

    outcome = executor.run(fn, payload(True), "inv-1")

    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "ProcessExited"
    assert expected in outcome.error["message"]
    assert outcome.logs == "dying\n"
    after = executor.run(fn, payload(False), "inv-2")
    assert after.status is State.SUCCEEDED
    assert after.result != pid


def test_memory_error_names_the_limit(executor):
    fn = function(
        """
        def main(size_mb):
            block = bytearray(size_mb * 1024 * 1024)
            return len(block)
        """,
        memory_mb=64,
    )

    fits = executor.run(fn, payload(32), "inv-1")
    outcome = executor.run(fn, payload(200), "inv-2")

    assert fits.status is State.SUCCEEDED
    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "MemoryError"
    assert "memory limit of 64 MB" in outcome.error["message"]
    assert "bytearray" in outcome.error["traceback"]
    assert executor.run(fn, payload(1), "inv-3").status is State.SUCCEEDED


def test_process_unable_to_report_its_memory_error_is_still_named(executor):
    fn = function(
        f"""
        import os

        def main():
            os._exit({bootstrap.EXIT_OUT_OF_MEMORY})
        """,
        memory_mb=64,
    )

    outcome = executor.run(fn, payload(), "inv-1")

    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "MemoryError"
    assert "memory limit of 64 MB" in outcome.error["message"]


def test_result_over_the_cap_is_result_too_large():
    fn = function(
        """
        import os

        def main(size):
            return {"data": "x" * size, "pid": os.getpid()}
        """
    )
    with ProcessExecutor(max_processes=2, max_result_bytes=MIB) as executor:
        small = executor.run(fn, payload(1000), "inv-1")
        outcome = executor.run(fn, payload(3 * MIB), "inv-2")
        after = executor.run(fn, payload(10), "inv-3")

    assert small.status is State.SUCCEEDED
    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "result_too_large"
    assert f"over the cap of {MIB} bytes" in outcome.error["message"]
    assert (
        f"result is {3 * MIB + 18 + len(str(small.result['pid']))} bytes"
        in (outcome.error["message"])
    )
    assert after.status is State.SUCCEEDED
    assert after.result["pid"] != small.result["pid"]


def test_huge_output_is_truncated_without_buffering_it():
    fn = function(
        """
        import sys

        def main(total_mb):
            line = "y" * 1023 + "\\n"
            for _ in range(total_mb * 1024):
                sys.stdout.write(line)
            return "done"
        """
    )
    with ProcessExecutor(max_processes=1, max_log_bytes=MIB) as executor:
        tracemalloc.start()
        try:
            outcome = executor.run(fn, payload(30), "inv-1")
            peak_bytes = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        after = executor.run(fn, payload(0), "inv-2")

    assert outcome.status is State.SUCCEEDED
    assert outcome.result == "done"
    assert outcome.logs_truncated
    assert len(outcome.logs.encode()) == MIB
    assert set(outcome.logs) == {"y", "\n"}
    assert peak_bytes < 8 * MIB
    assert after.logs == "" and not after.logs_truncated


def test_worker_environment_is_hidden_and_function_env_is_set(executor, monkeypatch):
    monkeypatch.setenv("CONVEYOR_TEST_SECRET", "hunter2")
    fn = function(
        """
        import os

        def main():
            return {"env": dict(os.environ), "cwd": os.getcwd()}
        """,
        env={"GREETING": "hello"},
    )

    outcome = executor.run(fn, payload(), "inv-1")

    env = outcome.result["env"]
    assert "CONVEYOR_TEST_SECRET" not in env
    assert "hunter2" not in json.dumps(outcome.result)
    assert env["GREETING"] == "hello"
    assert set(env) <= {"GREETING", "PATH", "LANG", "HOME", "LC_CTYPE"}
    assert env["HOME"] == outcome.result["cwd"]
    assert Path(outcome.result["cwd"]).is_dir()

    executor.close()
    assert not Path(outcome.result["cwd"]).exists()


def test_malformed_reply_is_a_failure_of_that_invocation(executor):
    fn = function(
        """
        import fcntl
        import os

        def main(prefix_hex):
            # Write a forged frame to every pipe this process may write to.
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd <= 2:
                    continue
                try:
                    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                except OSError:
                    continue
                if mode == os.O_WRONLY:
                    os.write(fd, bytes.fromhex(prefix_hex) + b"junk!")
            return "ignored"
        """
    )
    junk_header = (5).to_bytes(4, "big") + (0).to_bytes(4, "big")
    huge_body = (2).to_bytes(4, "big") + (2**31).to_bytes(4, "big")

    outcome = executor.run(fn, payload(junk_header.hex()), "inv-1")
    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "MalformedReply"

    outcome = executor.run(fn, payload(huge_body.hex()), "inv-2")
    assert outcome.status is State.FAILED
    assert outcome.error["type"] == "result_too_large"

    assert executor.run(function(PID, version=2), payload(), "inv-3").result > 0


def test_many_threads_share_a_small_pool():
    versions = [
        function(
            f"""
            import os
            import time

            def main(n):
                time.sleep(0.002)
                return [n, {version}, os.getpid()]
            """,
            version=version,
        )
        for version in (1, 2, 3)
    ]
    results: list[tuple[int, int, list]] = []
    errors: list[BaseException] = []

    def call(executor: ProcessExecutor, thread_number: int) -> None:
        try:
            for n in range(12):
                fn = versions[(thread_number + n) % 3]
                outcome = executor.run(fn, payload(n), f"inv-{thread_number}-{n}")
                results.append((n, fn.version, outcome.result))
        except BaseException as exc:
            errors.append(exc)

    with ProcessExecutor(max_processes=2) as executor:
        threads = [threading.Thread(target=call, args=(executor, i)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    assert not errors
    assert len(results) == 8 * 12
    version_of_pid: dict[int, int] = {}
    for n, version, result in results:
        assert result[:2] == [n, version]
        assert version_of_pid.setdefault(result[2], version) == version


def test_idle_processes_are_reaped():
    fn = function(PID)
    with ProcessExecutor(max_processes=2, idle_s=0.3) as executor:
        pid = executor.run(fn, payload(), "inv-1").result
        assert running(pid)

        assert wait_until(lambda: not running(pid), timeout_s=3.0)
        assert executor.run(fn, payload(), "inv-2").result != pid


def test_close_leaves_no_child_processes():
    fn = function(
        """
        import os
        import subprocess

        def main():
            child = subprocess.Popen(["sleep", "60"])
            return [os.getpid(), child.pid]
        """
    )
    executor = ProcessExecutor(max_processes=4)
    pids = []
    for version in (1, 2, 3):
        pids += executor.run(
            function(fn.source, version=version), payload(), "inv"
        ).result

    assert all(running(pid) for pid in pids)
    executor.close()

    assert wait_until(lambda: not any(running(pid) for pid in pids))
    with pytest.raises(ExecutorError):
        executor.run(fn, payload(), "inv-late")


def test_unstartable_interpreter_is_a_platform_fault():
    with ProcessExecutor(max_processes=1, python="/nonexistent/python3") as executor:
        # The second call would wait forever if the first kept its slot.
        for invocation_id in ("inv-1", "inv-2"):
            with pytest.raises(ExecutorError, match="cannot start a process"):
                executor.run(function(PID), payload(), invocation_id)


def test_from_settings_takes_the_limits():
    settings = Settings(max_warm_processes=3, max_result_bytes=1234, max_log_bytes=99)
    with ProcessExecutor.from_settings(settings) as executor:
        outcome = executor.run(
            function("def main():\n    print('z' * 200)\n    return 'x' * 2000\n"),
            payload(),
            "inv-1",
        )

    assert outcome.error["type"] == "result_too_large"
    assert len(outcome.logs) == 99 and outcome.logs_truncated


def test_printing_without_end_still_times_out_on_time():
    fn = function(
        """
        import os

        def main():
            chunk = b"z" * 65536
            while True:
                os.write(1, chunk)
        """,
        timeout_s=1.0,
    )
    with ProcessExecutor(max_processes=1, max_log_bytes=MIB) as executor:
        started = time.monotonic()
        outcome = executor.run(fn, payload(), "inv-1")
        elapsed_s = time.monotonic() - started

    assert outcome.status is State.TIMED_OUT
    assert outcome.logs_truncated
    assert elapsed_s < 4.0


def test_output_between_invocations_goes_to_the_next_one(executor):
    fn = function(
        """
        import sys
        import threading
        import time

        def later():
            time.sleep(0.2)
            print("from the background", flush=True)

        def main(n):
            if n == 1:
                threading.Thread(target=later).start()
            print("call", n)
        """
    )

    first = executor.run(fn, payload(1), "inv-1")
    time.sleep(0.5)
    second = executor.run(fn, payload(2), "inv-2")

    assert first.logs == "call 1\n"
    assert second.logs == "from the background\ncall 2\n"


def test_an_unknown_sandbox_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="names no sandbox"):
        make_launcher(Settings(sandbox="chroot"))


@pytest.mark.parametrize("choice", ["auto", "process"])
def test_a_sandbox_that_cannot_run_refuses_to_start(choice, monkeypatch):
    from runtime.executors import sandbox

    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "it needs root")
    with pytest.raises(ConfigurationError) as caught:
        make_launcher(Settings(sandbox=choice))
    assert "it needs root" in str(caught.value)
    assert "CONVEYOR_SANDBOX=none" in str(caught.value)


def test_no_sandbox_is_an_explicit_choice_and_says_so(caplog):
    with caplog.at_level("WARNING"):
        launcher = make_launcher(Settings(sandbox="none"))
    assert type(launcher) is Launcher
    assert "run only code you trust" in caplog.text
