"""Entry point of a runtime process: ``conveyor runtime``."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from conveyor_core.backends import open_broker, open_cache, open_store
from conveyor_core.settings import Settings
from runtime.executors.process import ProcessExecutor
from runtime.worker import Worker

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Run one worker until SIGTERM or SIGINT."""
    stop = threading.Event()
    signals_r, signals_w = os.pipe()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        # A handler interrupts the main thread wherever it is, perhaps inside
        # stop.set() or a log call for an earlier signal, holding the lock
        # either needs: it only writes, and a thread of its own does the rest.
        os.write(signals_w, bytes([signum]))

    def relay_signals() -> None:
        signum = os.read(signals_r, 1)[0]
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    threading.Thread(target=relay_signals, name="conveyor-signals", daemon=True).start()
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    store = open_store(settings)
    broker = open_broker(settings)
    cache = open_cache(settings)
    executor = ProcessExecutor.from_settings(settings)
    try:
        Worker(settings, store, broker, cache, executor).run(stop)
    finally:
        executor.close()
        broker.close()
        cache.close()
        store.close()
