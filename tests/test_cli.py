"""The ``conveyor`` command against a running platform, run as a user runs it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from functions import FOLDER
from tests.harness import ADMIN_KEY, Platform, free_port

pytestmark = pytest.mark.slow


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A config directory of this test's own."""
    return tmp_path / "config"


def conveyor(
    *args: str, home: Path, url: str | None = None, key: str | None = None
) -> Ran:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["XDG_CONFIG_HOME"] = str(home)
    if url:
        env["CONVEYOR_URL"] = url
    if key:
        env["CONVEYOR_API_KEY"] = key
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def logged_in(running: Platform, home: Path) -> Path:
    ran = conveyor("login", "--url", running.url, "--key", ADMIN_KEY, home=home)
    assert ran.code == 0, ran.err
    return home


def test_login_checks_the_key_and_saves_it_privately(
    running: Platform, home: Path
) -> None:
    wrong = conveyor("login", "--url", running.url, "--key", "cvk_wrong", home=home)
    assert wrong.code == 1
    assert "unknown or revoked" in wrong.err
    assert "Traceback" not in wrong.err
    assert not (home / "conveyor" / "config.json").exists()

    ran = conveyor("login", "--url", running.url, "--key", ADMIN_KEY, home=home)
    assert ran.code == 0, ran.err
    path = home / "conveyor" / "config.json"
    assert f"saved to {path}" in ran.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": running.url, "api_key": ADMIN_KEY}


def test_deploy_invoke_and_inspect(logged_in: Path) -> None:
    ran = conveyor("deploy", str(FOLDER / "wordcount.py"), home=logged_in)
    assert ran.code == 0, ran.err
    assert ran.out.startswith("Deployed wordcount version ")

    ran = conveyor(
        "invoke",
        "wordcount",
        '"the cat and the hat"',
        "--kwargs",
        '{"top": 1}',
        home=logged_in,
    )
    assert ran.code == 0, ran.err
    assert json.loads(ran.out) == [["the", 2]]

    ran = conveyor(
        "invoke", "wordcount", '"to be or not to be"', "--async", home=logged_in
    )
    assert ran.code == 0, ran.err
    invocation_id = ran.out.strip()
    assert invocation_id.startswith("inv_")

    ran = conveyor("logs", invocation_id, "--follow", home=logged_in)
    assert (ran.code, ran.out) == (0, "counted 6 words\n")

    ran = conveyor("status", invocation_id, home=logged_in)
    assert ran.code == 0
    assert "succeeded" in ran.out and invocation_id in ran.out
    status = conveyor("status", invocation_id, "--json", home=logged_in).json()
    assert status["result"] == [["to", 2], ["be", 2], ["or", 1], ["not", 1]]

    listed = conveyor(
        "invocations", "--function", "wordcount", "--json", home=logged_in
    )
    ids = [item["id"] for item in listed.json()["invocations"]]
    assert invocation_id in ids
    table = conveyor("invocations", "--status", "succeeded", home=logged_in)
    assert table.code == 0 and "STATUS" in table.out and invocation_id in table.out

    functions = conveyor("ls", "--json", home=logged_in).json()
    assert "wordcount" in [f["name"] for f in functions]
    assert "wordcount" in conveyor("ls", home=logged_in).out


def test_deploy_every_task_of_a_file_or_one_entrypoint(
    logged_in: Path, tmp_path: Path
) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text(
        textwrap.dedent(
            """
            from conveyor import task

            def helper(x):
                return x + 1

            @task(name="increment", timeout_s=5)
            def inc(x):
                return helper(x)

            @task
            def double(x):
                return 2 * x
            """
        )
    )
    ran = conveyor("deploy", str(tasks), "--json", home=logged_in)
    assert ran.code == 0, ran.err
    assert sorted(item["name"] for item in ran.json()) == ["double", "increment"]
    assert conveyor("invoke", "increment", "41", home=logged_in).out.strip() == "42"
    assert conveyor("invoke", "double", "21", home=logged_in).out.strip() == "42"

    plain = tmp_path / "plain.py"
    plain.write_text("def handler(name):\n    return f'hello {name}'\n")
    ran = conveyor(
        "deploy",
        str(plain),
        "--entrypoint",
        "handler",
        "--name",
        "hello",
        "--env",
        "A=1",
        "--timeout-s",
        "3",
        home=logged_in,
    )
    assert ran.code == 0, ran.err
    assert (
        conveyor("invoke", "hello", '"you"', home=logged_in).out.strip()
        == '"hello you"'
    )

    ran = conveyor("deploy", str(plain), home=logged_in)
    assert ran.code == 2
    assert "no @task functions" in ran.err


def test_a_failed_invocation_exits_non_zero_with_the_remote_error(
    logged_in: Path,
) -> None:
    assert conveyor("deploy", str(FOLDER / "failing.py"), home=logged_in).code == 0

    ran = conveyor("invoke", "failing", '{"quantity": -1}', home=logged_in)
    assert ran.code == 1
    assert ran.out == ""
    assert ran.err.strip().splitlines() == [
        "conveyor invoke: ValueError: quantity must be positive, got -1"
    ]

    debug = conveyor("invoke", "failing", "{}", "--debug", home=logged_in)
    assert debug.code == 1
    assert "Remote traceback" in debug.err and "check_order" in debug.err


def test_timeouts_are_reported(logged_in: Path) -> None:
    ran = conveyor(
        "deploy", str(FOLDER / "sleepy.py"), "--timeout-s", "0.5", home=logged_in
    )
    assert ran.code == 0, ran.err
    ran = conveyor("invoke", "sleepy", "3", home=logged_in)
    assert ran.code == 1
    assert "time limit" in ran.err

    assert conveyor("deploy", str(FOLDER / "sleepy.py"), home=logged_in).code == 0
    started = time.monotonic()
    ran = conveyor("invoke", "sleepy", "5", "--timeout", "0.5", home=logged_in)
    assert ran.code == 1
    assert "did not finish within 0.5 s" in ran.err
    assert time.monotonic() - started < 4


def test_removing_a_function(logged_in: Path, tmp_path: Path) -> None:
    source = tmp_path / "gone.py"
    source.write_text("def gone():\n    return 1\n")
    conveyor("deploy", str(source), "--entrypoint", "gone", home=logged_in)
    assert conveyor("rm", "gone", home=logged_in).out.strip() == "Removed gone"
    ran = conveyor("invoke", "gone", home=logged_in)
    assert ran.code == 1
    assert "gone" in ran.err and "Traceback" not in ran.err


def test_keys_create_list_and_revoke(running: Platform, logged_in: Path) -> None:
    made = conveyor(
        "keys",
        "create",
        "--tenant",
        "default",
        "--scopes",
        "invoke",
        "--json",
        home=logged_in,
    ).json()
    assert set(made) >= {"id", "key"}

    listed = conveyor("keys", "ls", "--json", home=logged_in).json()
    assert made["id"] in [key["id"] for key in listed]
    assert made["id"] in conveyor("keys", "ls", home=logged_in).out

    narrow = conveyor("ls", home=logged_in, url=running.url, key=made["key"])
    assert narrow.code == 1 and "lacks the 'read' scope" in narrow.err

    assert conveyor("keys", "revoke", made["id"], home=logged_in).code == 0
    revoked = conveyor("ls", home=logged_in, url=running.url, key=made["key"])
    assert revoked.code == 1
    assert "unknown or revoked" in revoked.err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["invoke", "wordcount", "not-json"], "argument 1 is not JSON"),
        (["invoke", "wordcount", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
        (["deploy", "/no/such/file.py"], "is not a file"),
        (["deploy", "x.py", "--env", "NOEQUALS"], "NAME=VALUE"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(
    logged_in: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    (tmp_path / "x.py").write_text("def x():\n    pass\n")
    args = [str(tmp_path / a) if a == "x.py" else a for a in args]
    ran = conveyor(*args, home=logged_in)
    assert ran.code == 2, ran.err
    assert fragment in ran.err
    assert len(ran.err.strip().splitlines()) == 1


def test_unknown_function_and_unreachable_gateway(logged_in: Path, home: Path) -> None:
    ran = conveyor("invoke", "no-such-function", home=logged_in)
    assert ran.code == 1
    assert "no-such-function" in ran.err
    assert len(ran.err.strip().splitlines()) == 1

    nowhere = f"http://127.0.0.1:{free_port()}"
    ran = conveyor("ls", home=home, url=nowhere, key=ADMIN_KEY)
    assert ran.code == 1
    assert ran.err.strip() == (
        f"conveyor ls: cannot reach the Conveyor gateway at {nowhere}: "
        "the connection was refused or dropped"
    )
