"""Logging setup for the entry points: one JSON object per line, or plain text."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

from conveyor_core.errors import ConfigurationError

#: Third-party loggers that drown the platform's own lines at INFO.
NOISY_LOGGERS = {
    "pika": logging.WARNING,
    "urllib3": logging.WARNING,
    "docker": logging.WARNING,
    "pymongo": logging.WARNING,
}

# What every LogRecord carries on its own; anything else came through extra=.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
}

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: the core fields, extras, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _utc_iso(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # An extra named like a core field is dropped rather than let it
        # disguise a line's time, level or origin.
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES:
                line.setdefault(key, value)

        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _dumps(line)


class TextFormatter(logging.Formatter):
    """Formats a record as a readable line, with its extras as key=value pairs."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRIBUTES
        ]
        if not extras:
            return text
        # The traceback, if any, stays below the line it belongs to.
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(extras)}]{newline}{rest}"


def configure_logging(
    level: str = "INFO", json: bool = True, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger's records to one handler on ``stream`` (stderr).

    Calling it again replaces the handler it installed before, so it never
    doubles lines. Handlers that others installed are left alone.
    """
    numeric_level = _parse_level(level)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler._conveyor = True  # type: ignore[attr-defined]

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_conveyor", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)

    for name, noisy_level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(noisy_level, numeric_level))
    return handler


def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    numeric = logging.getLevelName(level.strip().upper())
    if not isinstance(numeric, int):
        raise ConfigurationError(
            f"log level {level!r} is unknown; use DEBUG, INFO, WARNING, ERROR "
            "or CRITICAL"
        )
    return numeric


def _utc_iso(created: float, msecs: float) -> str:
    """ISO 8601 in UTC to the millisecond, e.g. 2024-05-01T12:00:00.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(msecs):03d}Z"


def _dumps(line: dict[str, Any]) -> str:
    try:
        return orjson.dumps(
            line, default=_fallback, option=orjson.OPT_NON_STR_KEYS
        ).decode()
    except TypeError:
        # orjson gives up on a whole line for one value it cannot take
        # (an integer beyond 64 bits, say): render the odd values as text.
        safe = {key: _plain(value) for key, value in line.items()}
        return orjson.dumps(
            safe, default=_fallback, option=orjson.OPT_NON_STR_KEYS
        ).decode()


def _plain(value: Any) -> Any:
    try:
        orjson.dumps(value, default=_fallback, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return _fallback(value)
    return value


def _fallback(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        # A __str__ that raises must not cost the log line.
        return object.__repr__(value)
