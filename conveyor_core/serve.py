"""The server-side commands: ``conveyor server``, ``gateway`` and ``runtime``.

The SDK's command-line tool hands these commands over to this module, so the
SDK itself never imports the server side.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from conveyor_core.backends import open_store
from conveyor_core.logs import configure_logging
from conveyor_core.records import ApiKey, Scope, hash_api_key, new_api_key, new_id
from conveyor_core.settings import Settings
from conveyor_core.store import Store

logger = logging.getLogger(__name__)

ADMIN_TENANT = "default"

#: How long children get to finish in-flight work after SIGTERM.
SHUTDOWN_GRACE_S = 30.0


def ensure_admin_key(store: Store, settings: Settings) -> str | None:
    """Make sure an admin key exists; returns a newly made key, once.

    With CONVEYOR_ADMIN_KEY set, that key is registered if it is not yet.
    Without it, the first start of a platform that has no admin key makes
    one and returns it so the caller can print it.
    """
    if settings.admin_key:
        key_hash = hash_api_key(settings.admin_key)
        if store.find_key(key_hash) is None:
            store.add_key(_admin_key(key_hash))
        return None
    if store.has_admin_key():
        return None
    key = new_api_key()
    store.add_key(_admin_key(hash_api_key(key)))
    return key


def _admin_key(key_hash: str) -> ApiKey:
    return ApiKey(
        id=new_id("key_"),
        tenant=ADMIN_TENANT,
        scopes=[Scope.ADMIN.value],
        key_hash=key_hash,
        created_at=time.time(),
    )


def _bootstrap(settings: Settings) -> None:
    store = open_store(settings)
    try:
        key = ensure_admin_key(store, settings)
    finally:
        store.close()
    if key is not None:
        print(
            "\nConveyor created the admin key of tenant "
            f"{ADMIN_TENANT!r}; it is shown only this once:\n\n    {key}\n\n"
            "Keep it: export CONVEYOR_API_KEY=<key> for the SDK and CLI.\n",
            flush=True,
        )


def run_gateway(settings: Settings) -> None:
    from gateway.wsgi import serve

    _bootstrap(settings)
    serve(settings)


def run_runtime(settings: Settings) -> None:
    from runtime.main import serve

    serve(settings)


def run_server(settings: Settings) -> int:
    """Run a gateway and a runtime as child processes and supervise them."""
    _bootstrap(settings)
    children = {
        role: subprocess.Popen([sys.executable, "-m", "conveyor_core.serve", role])
        for role in ("gateway", "runtime")
    }
    logger.info(
        "conveyor server on http://%s:%d (gateway pid %d, runtime pid %d)",
        settings.host,
        settings.port,
        children["gateway"].pid,
        children["runtime"].pid,
    )

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    status = 0
    while not stopping:
        for role, child in children.items():
            code = child.poll()
            if code is not None and not stopping:
                logger.error("the %s exited with status %d; stopping", role, code)
                status = code or 1
                forward(signal.SIGTERM, None)
        time.sleep(0.2)

    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for child in children.values():
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return status


COMMANDS = {"gateway": run_gateway, "runtime": run_runtime, "server": run_server}


def main(command: str) -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    return COMMANDS[command](settings) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
