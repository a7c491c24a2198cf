"""The log setup: one JSON object per line with the fields passed via extra=."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from conveyor_core.errors import ConfigurationError
from conveyor_core.logs import NOISY_LOGGERS, JsonFormatter, configure_logging

ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root logger and the quietened ones back as the test found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_carries_time_level_logger_and_the_formatted_message(
    stream: io.StringIO,
) -> None:
    configure_logging("INFO", stream=stream)
    before = time.time()

    logging.getLogger("conveyor.test").info("ran %s in %d ms", "fib", 12)

    (line,) = lines(stream)
    assert line["level"] == "INFO"
    assert line["logger"] == "conveyor.test"
    assert line["message"] == "ran fib in 12 ms"
    assert ISO_UTC_MS.match(line["ts"]), line["ts"]
    logged_at = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert logged_at.tzinfo == timezone.utc
    assert before - 1 <= logged_at.timestamp() <= time.time() + 1
    assert "traceback" not in line


def test_every_extra_field_becomes_a_key_and_nothing_internal_leaks(
    stream: io.StringIO,
) -> None:
    configure_logging(stream=stream)
    extra = {
        "request_id": "req-1",
        "tenant": "acme",
        "method": "POST",
        "path": "/v1/functions/fib/invocations",
        "status": 202,
        "duration_ms": 3.5,
        "invocation_id": "inv_1",
        "function": "fib",
        "version": 2,
        "state": "succeeded",
        "attempt": 1,
        "worker": "w-1",
        "custom_field": ["any", {"shape": True}],
    }

    logging.getLogger("conveyor.test").warning("done", extra=extra)

    (line,) = lines(stream)
    assert set(line) == {"ts", "level", "logger", "message", *extra}
    assert {key: line[key] for key in extra} == extra


def test_values_json_cannot_hold_are_written_as_text(stream: io.StringIO) -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    configure_logging(stream=stream)

    logging.getLogger("conveyor.test").info(
        "odd values",
        extra={"thing": Opaque(), "huge": 2**70, "keys": {1: "one"}},
    )

    (line,) = lines(stream)
    assert line["thing"] == "opaque!"
    assert line["huge"] == str(2**70)
    assert line["keys"] == {"1": "one"}
    assert line["message"] == "odd values"


def test_an_exception_is_one_line_with_its_traceback(stream: io.StringIO) -> None:
    configure_logging(stream=stream)

    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("conveyor.test").exception(
            "worker fault", extra={"invocation_id": "inv_2"}
        )

    assert len(stream.getvalue().splitlines()) == 1
    (line,) = lines(stream)
    assert line["level"] == "ERROR"
    assert line["invocation_id"] == "inv_2"
    assert line["traceback"].startswith("Traceback (most recent call last)")
    assert "ZeroDivisionError: division by zero" in line["traceback"]


def test_a_message_with_newlines_stays_on_one_line(stream: io.StringIO) -> None:
    configure_logging(stream=stream)

    logging.getLogger("conveyor.test").info("first\nsecond")

    assert len(stream.getvalue().splitlines()) == 1
    assert lines(stream)[0]["message"] == "first\nsecond"


def test_an_extra_cannot_pass_itself_off_as_a_core_field(stream: io.StringIO) -> None:
    configure_logging(stream=stream)

    logging.getLogger("conveyor.test").info("x", extra={"level": "FAKE", "ts": "0"})

    (line,) = lines(stream)
    assert line["level"] == "INFO"
    assert ISO_UTC_MS.match(line["ts"])


def test_configuring_twice_keeps_one_handler(stream: io.StringIO) -> None:
    root = logging.getLogger()
    others = list(root.handlers)
    first = io.StringIO()

    configure_logging(stream=first)
    configure_logging(stream=stream)
    logging.getLogger("conveyor.test").info("once")

    ours = [h for h in root.handlers if h not in others]
    assert len(ours) == 1
    assert first.getvalue() == ""
    assert [line["message"] for line in lines(stream)] == ["once"]
    assert all(h in root.handlers for h in others)


def test_the_level_filters_records(stream: io.StringIO) -> None:
    configure_logging("warning", stream=stream)
    log = logging.getLogger("conveyor.test")

    log.info("hidden")
    log.warning("shown")

    assert [line["message"] for line in lines(stream)] == ["shown"]


def test_noisy_libraries_are_quietened(stream: io.StringIO) -> None:
    configure_logging("DEBUG", stream=stream)

    logging.getLogger("pika.adapters").info("frame received")
    logging.getLogger("pika").warning("connection lost")
    logging.getLogger("conveyor.test").debug("ours")

    assert [line["message"] for line in lines(stream)] == ["connection lost", "ours"]


def test_an_unknown_level_names_the_accepted_ones() -> None:
    with pytest.raises(ConfigurationError, match="'LOUD'.*DEBUG, INFO"):
        configure_logging("LOUD", stream=io.StringIO())


def test_text_mode_writes_readable_lines_with_extras(stream: io.StringIO) -> None:
    configure_logging(json=False, stream=stream)

    logging.getLogger("conveyor.test").warning(
        "timed out", extra={"invocation_id": "inv_3"}
    )

    text = stream.getvalue()
    assert "WARNING conveyor.test: timed out" in text
    assert "invocation_id=inv_3" in text
    with pytest.raises(ValueError):
        json.loads(text)


def test_the_formatter_works_on_its_own() -> None:
    record = logging.makeLogRecord(
        {"name": "n", "levelno": 20, "levelname": "INFO", "msg": "%s!", "args": ("a",)}
    )
    record.tenant = "acme"

    line = json.loads(JsonFormatter().format(record))

    assert line["message"] == "a!"
    assert line["tenant"] == "acme"
