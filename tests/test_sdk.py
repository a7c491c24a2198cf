"""The Python SDK against a running platform, as a developer uses it.

Runs once on the embedded defaults (``conveyor server`` on a bare machine)
and once on the real RabbitMQ and Redis of the machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import conveyor
from conveyor import config
from conveyor.serialization import PICKLE_KEY, decode, encode, is_plain_json
from functions.failing import failing
from functions.primes import primes
from functions.sleepy import sleepy
from functions.thumbnail import thumbnail
from functions.wordcount import wordcount
from tests.harness import ADMIN_KEY, Platform, free_port

pytestmark = pytest.mark.slow

SCALE = 3


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


def scaled(value: float) -> float:
    return value * SCALE


@pytest.fixture
def client(running: Platform) -> Iterator[conveyor.Client]:
    client = conveyor.Client(running.url, ADMIN_KEY)
    conveyor.set_default_client(client)
    yield client
    conveyor.set_default_client(None)
    client.close()


def test_a_task_still_runs_locally() -> None:
    assert wordcount("a b a", top=1) == [["a", 2]]
    assert isinstance(wordcount, conveyor.Task)
    assert wordcount.__doc__ == wordcount.func.__doc__
    assert wordcount.name == "wordcount" and wordcount.timeout_s == 10


def test_deploy_by_source_then_remote(client: conveyor.Client) -> None:
    first = wordcount.deploy()
    assert wordcount.deploy() == first + 1
    assert client.function("wordcount")["kind"] == "source"

    assert wordcount.remote("the cat and the hat", top=2) == [["the", 2], ["cat", 1]]
    assert primes.deploy() >= 1
    assert primes.remote(1000) == primes(1000)


def test_deploy_by_value_carries_helpers_and_globals(client: conveyor.Client) -> None:
    @conveyor.task(name="by-value")
    def convert(readings: list[Reading]) -> dict[str, float]:
        return {reading.sensor: scaled(reading.value) for reading in readings}

    convert.deploy()
    assert client.function("by-value")["kind"] == "pickle"
    readings = [Reading("a", 1.5), Reading("b", 2.0)]
    assert convert.remote(readings) == {"a": 4.5, "b": 6.0}


def test_non_json_values_travel_both_ways(client: conveyor.Client) -> None:
    @conveyor.task(name="shift-date")
    def shift(day: datetime.date, by: datetime.timedelta) -> tuple[datetime.date, str]:
        return day + by, day.isoformat()

    shift.deploy()
    day = datetime.date(2026, 12, 3)
    assert shift.remote(day, by=datetime.timedelta(days=2)) == (
        datetime.date(2026, 12, 5),
        "2026-12-03",
    )

    thumbnail.deploy()
    image = b"P5\n4 4\n255\n" + bytes(range(0, 160, 10))
    small = thumbnail.remote(image, size=2)
    assert small == thumbnail(image, size=2)
    assert small.startswith(b"P5\n2 2\n255\n")


def test_spawn_returns_a_handle_at_once(client: conveyor.Client) -> None:
    sleepy.deploy()
    handle = sleepy.spawn(0.3)
    assert handle.id.startswith("inv_")
    assert handle.status() in ("queued", "running", "succeeded")
    assert 0.3 <= handle.result(timeout=30) < 5
    assert handle.status() == "succeeded"
    assert handle.logs() == "sleeping 0.3 s\n"

    again = conveyor.Invocation(handle.id)
    assert again.result() == handle.result()
    assert again.info()["attempts"] == 1


def test_map_of_a_thousand_items_keeps_their_order(client: conveyor.Client) -> None:
    @conveyor.task(name="square")
    def square(n: int) -> int:
        return n * n

    square.deploy()
    assert square.map(range(1000)) == [n * n for n in range(1000)]
    assert square.map([]) == []

    @conveyor.task(name="power")
    def power(base: int, exponent: int) -> int:
        return base**exponent

    power.deploy()
    assert power.starmap([(2, 10), (3, 3), (10, 0)]) == [1024, 27, 1]


def test_map_raises_the_first_failure_or_returns_it(client: conveyor.Client) -> None:
    @conveyor.task(name="inverse")
    def inverse(n: int) -> float:
        return 1 / n

    inverse.deploy()
    with pytest.raises(conveyor.RemoteError, match="ZeroDivisionError"):
        inverse.map([1, 0, 2])
    results = inverse.map([1, 0, 2], return_exceptions=True)
    assert results[0] == 1.0 and results[2] == 0.5
    assert isinstance(results[1], conveyor.RemoteError)


def test_a_remote_error_carries_the_remote_traceback(client: conveyor.Client) -> None:
    failing.deploy()
    with pytest.raises(conveyor.RemoteError) as caught:
        failing.remote({"quantity": -1})
    error = caught.value
    assert error.type == "ValueError"
    assert error.message == "quantity must be positive, got -1"
    assert "check_order" in error.traceback
    assert "Remote traceback" in str(error)
    assert error.invocation_id is not None
    assert isinstance(error, conveyor.ConveyorError)


def test_timeouts_raise_invocation_timeout(client: conveyor.Client) -> None:
    short = conveyor.task(name="sleepy-short", timeout_s=0.5)(sleepy.func)
    short.deploy()
    with pytest.raises(conveyor.InvocationTimeout, match="time limit"):
        short.remote(5)

    sleepy.deploy()
    handle = sleepy.spawn(3)
    with pytest.raises(conveyor.InvocationTimeout, match="within 0.2 s"):
        handle.result(timeout=0.2)
    assert handle.result(timeout=30) >= 3


def test_a_queued_invocation_can_be_cancelled(client: conveyor.Client) -> None:
    @conveyor.task(name="slow-start", timeout_s=30)
    def slow(seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    slow.deploy()
    # Fill every runtime slot, so the next one waits in the queue.
    busy = [slow.spawn(2) for _ in range(8)]
    waiting = slow.spawn(0)
    waiting.cancel()
    with pytest.raises(conveyor.InvocationCancelled):
        waiting.result(timeout=30)
    assert [handle.result(timeout=30) for handle in busy] == [2] * 8


def test_client_mistakes_raise_clear_errors(
    running: Platform, client: conveyor.Client
) -> None:
    with pytest.raises(conveyor.NotFound, match="no-such-function"):
        client.invoke("no-such-function", [1])
    with pytest.raises(conveyor.NotFound):
        conveyor.Invocation("inv_00000000000000000000000000").status()

    with conveyor.Client(running.url, "cvk_wrong") as stranger:
        with pytest.raises(conveyor.AuthenticationError):
            stranger.functions()

    with pytest.raises(conveyor.InvalidRequest, match="does not compile"):
        client.deploy("broken", source="def broken(:\n")

    nowhere = conveyor.Client(f"http://127.0.0.1:{free_port()}", ADMIN_KEY)
    with pytest.raises(conveyor.GatewayUnreachable, match="cannot reach"):
        nowhere.functions()


def test_login_file_is_private_and_used(
    running: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("CONVEYOR_URL", raising=False)
    monkeypatch.delenv("CONVEYOR_API_KEY", raising=False)
    path = config.save(running.url, ADMIN_KEY)
    assert path == tmp_path / "conveyor" / "config.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    client = conveyor.Client()
    assert client.url == running.url and client.api_key == ADMIN_KEY
    assert isinstance(client.functions(), list)

    monkeypatch.setenv("CONVEYOR_URL", "http://127.0.0.1:1")
    assert conveyor.Client().url == "http://127.0.0.1:1"
    with pytest.raises(conveyor.ConfigurationError):
        conveyor.Client("ftp://example")


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2**80, 1.5, "é", [1, [2]], {"a": {"b": None}}],
)
def test_plain_json_travels_as_itself(value: object) -> None:
    assert is_plain_json(value)
    assert encode(value) == value
    assert decode(encode(value)) == value


@pytest.mark.parametrize(
    "value",
    [(1, 2), {1, 2}, {1: "a"}, float("nan"), b"bytes", datetime.date(2026, 1, 1)],
)
def test_anything_else_travels_pickled(value: object) -> None:
    assert not is_plain_json(value)
    travelled = encode(value)
    assert set(travelled) == {PICKLE_KEY}
    back = decode(travelled)
    assert back == value or (back != back and value != value)


def test_pickling_a_task_leaves_its_client_behind() -> None:
    import pickle

    secret = conveyor.Client("http://127.0.0.1:1", "cvk_do-not-leak")
    local = conveyor.task(client=secret)(scaled)
    data = pickle.dumps(local)
    assert b"cvk_do-not-leak" not in data
    assert pickle.loads(data)(2) == 6


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
