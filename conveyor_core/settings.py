"""Settings read from CONVEYOR_* environment variables, with local defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from conveyor_core.errors import ConfigurationError

ENV_PREFIX = "CONVEYOR_"


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "conveyor")


#: Settings that count something and make no sense below 1.
_POSITIVE = (
    "gateway_workers",
    "gateway_threads",
    "max_batch",
    "bundle_size",
    "concurrency",
    "prefetch",
    "result_ttl_s",
    "max_warm_processes",
)


@dataclass(frozen=True)
class Settings:
    """Every knob of the platform; each field is read from CONVEYOR_<NAME>."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = ""
    broker_url: str = ""
    cache_url: str = ""
    store_url: str = ""
    admin_key: str = ""
    log_level: str = "INFO"
    queue: str = "conveyor.invocations"

    gateway_workers: int = 2
    gateway_threads: int = 32
    max_body_bytes: int = 6 * 1024 * 1024
    max_batch: int = 1000
    bundle_size: int = 8
    max_wait_s: float = 60.0
    result_ttl_s: int = 3600

    concurrency: int = 8
    prefetch: int = 32
    delivery_limit: int = 5
    default_timeout_s: float = 60.0
    max_timeout_s: float = 900.0
    default_memory_mb: int = 256
    max_memory_mb: int = 4096
    max_result_bytes: int = 6 * 1024 * 1024
    max_log_bytes: int = 1024 * 1024
    warm_idle_s: float = 300.0
    sandbox: str = "auto"
    max_warm_processes: int = 32
    docker_image: str = "conveyor-runtime:latest"
    docker_runtime: str = ""

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if value < 1:
                raise ConfigurationError(
                    f"{ENV_PREFIX}{name.upper()}={value!r} must be at least 1"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ConfigurationError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid "
                    f"{kind.__name__}"
                ) from None
        settings = cls(**values)  # type: ignore[arg-type]
        if not settings.data_dir:
            settings = cls(**{**values, "data_dir": _default_data_dir()})  # type: ignore[arg-type]
        return settings

    def path(self, name: str) -> Path:
        """A file under the data directory, creating the directory if needed."""
        directory = Path(self.data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name
