"""Where the SDK finds the gateway and the API key.

In order: the arguments given to ``Client``, then ``CONVEYOR_URL`` and
``CONVEYOR_API_KEY``, then the file ``conveyor login`` writes, readable by
its owner only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ConfigurationError

DEFAULT_URL = "http://127.0.0.1:8000"


def config_path() -> Path:
    """The login file: ``$XDG_CONFIG_HOME/conveyor/config.json`` or ~/.config."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return Path(base) / "conveyor" / "config.json"


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str | None


def load_saved() -> dict[str, str]:
    """What ``conveyor login`` saved, or nothing."""
    path = config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read {path} ({exc}); run 'conveyor login' again"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{path} is not a JSON object; run 'conveyor login'")
    return {k: v for k, v in doc.items() if isinstance(v, str)}


def save(url: str, api_key: str) -> Path:
    """Write the login file, readable and writable by its owner only."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"url": url, "api_key": api_key}, handle)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path


def resolve(url: str | None, api_key: str | None) -> Credentials:
    """The URL and key to use: arguments, then environment, then the file."""
    saved: dict[str, str] | None = None

    def from_file(name: str) -> str | None:
        nonlocal saved
        if saved is None:
            saved = load_saved()
        return saved.get(name)

    url = url or os.environ.get("CONVEYOR_URL") or from_file("url") or DEFAULT_URL
    api_key = api_key or os.environ.get("CONVEYOR_API_KEY") or from_file("api_key")
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"the gateway URL {url!r} must start with http:// or https://"
        )
    return Credentials(url.rstrip("/"), api_key)
