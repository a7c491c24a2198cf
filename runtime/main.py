"""Entry point of a runtime process: ``conveyor runtime``."""

from __future__ import annotations

import logging
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

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

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
