"""The worker: takes invocations off the broker, runs them, records outcomes.

Delivery is at least once. A message is acked only after the invocation's
terminal state is in the store, so a worker that dies, or a store that cannot
be reached, leaves the message with the broker, which hands it out again; the
store's conditional transitions make sure a redelivered invocation that
already finished is recorded once and not run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from conveyor_core.broker import Broker, Delivery
from conveyor_core.cache import Cache
from conveyor_core.errors import (
    BackendUnavailable,
    CacheUnavailable,
    ExecutorError,
    FunctionNotFound,
    InvocationNotFound,
)
from conveyor_core.messages import InvocationMessage
from conveyor_core.records import FunctionVersion, Invocation, Outcome, State
from conveyor_core.settings import Settings
from conveyor_core.store import Store
from runtime.executor import Executor

logger = logging.getLogger(__name__)

#: How long a worker thread waits before handing a message back when the
#: store (or the executor) fails, so an outage does not spin through the
#: broker's delivery limit in a few milliseconds.
PLATFORM_FAULT_BACKOFF_S = 2.0

#: Function versions are immutable, so the worker keeps the ones it ran.
FUNCTION_CACHE_SIZE = 1024


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Consumes invocation messages and runs each in the executor."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        cache: Cache,
        executor: Executor,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.cache = cache
        self.executor = executor
        self.worker_id = worker_id or default_worker_id()
        self._functions: OrderedDict[tuple[str, str, int], FunctionVersion] = (
            OrderedDict()
        )
        self._functions_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="conveyor-run"
        )

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then let running invocations finish."""
        logger.info(
            "worker %s consuming with concurrency %d, prefetch %d",
            self.worker_id,
            self.settings.concurrency,
            self.settings.prefetch,
        )
        try:
            self.broker.consume(
                self._submit,
                self._submit_dead_letter,
                prefetch=max(self.settings.prefetch, self.settings.concurrency),
                stop=stop,
            )
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            logger.info("worker %s stopped", self.worker_id)

    def _submit(self, delivery: Delivery) -> None:
        self._pool.submit(self.handle, delivery)

    def _submit_dead_letter(self, delivery: Delivery) -> None:
        self._pool.submit(self.handle_dead_letter, delivery)

    def handle(self, delivery: Delivery) -> None:
        """Run one delivered invocation and settle the delivery."""
        try:
            message = InvocationMessage.decode(delivery.body)
        except ValueError as exc:
            logger.error("dropping a malformed message to the dead letters: %s", exc)
            delivery.reject(False)
            return

        try:
            self._run(message, delivery)
        except (BackendUnavailable, ExecutorError) as exc:
            logger.error(
                "platform fault on invocation %s, handing it back: %s",
                message.id,
                exc,
                extra=_fields(message),
            )
            time.sleep(PLATFORM_FAULT_BACKOFF_S)
            delivery.reject(True)
        except Exception:
            logger.exception(
                "unexpected fault on invocation %s, handing it back",
                message.id,
                extra=_fields(message),
            )
            time.sleep(PLATFORM_FAULT_BACKOFF_S)
            delivery.reject(True)

    def _run(self, message: InvocationMessage, delivery: Delivery) -> None:
        invocation = self.store.start_attempt(message.id, self.worker_id, time.time())
        if invocation is None:
            logger.debug(
                "invocation %s is already settled; acking the message", message.id
            )
            delivery.ack()
            return
        if invocation.attempts > 1:
            logger.warning(
                "invocation %s redelivered; attempt %d",
                message.id,
                invocation.attempts,
                extra={**_fields(message), "attempt": invocation.attempts},
            )
        logger.info(
            "invocation %s started",
            message.id,
            extra={**_fields(message), "attempt": invocation.attempts},
        )

        outcome = self._execute(message)
        finished = self.store.finish_attempt(
            message.id, invocation.attempts, outcome, time.time()
        )
        if finished is None:
            logger.warning(
                "invocation %s attempt %d was overtaken; its outcome is dropped",
                message.id,
                invocation.attempts,
                extra=_fields(message),
            )
            delivery.ack()
            return

        self._log_outcome(finished)
        self._publish(finished)
        delivery.ack()

    def _execute(self, message: InvocationMessage) -> Outcome:
        try:
            function = self._function(message)
        except FunctionNotFound as exc:
            return Outcome(
                status=State.FAILED,
                error={"type": "function_not_found", "message": str(exc)},
            )
        return self.executor.run(function, message.payload, message.id)

    def _function(self, message: InvocationMessage) -> FunctionVersion:
        key = (message.tenant, message.function, message.version)
        with self._functions_lock:
            function = self._functions.get(key)
            if function is not None:
                self._functions.move_to_end(key)
                return function

        function = self.store.get_function(*key)
        with self._functions_lock:
            self._functions[key] = function
            if len(self._functions) > FUNCTION_CACHE_SIZE:
                self._functions.popitem(last=False)
        return function

    def _publish(self, invocation: Invocation) -> None:
        try:
            self.cache.put(
                invocation.id, invocation.to_doc(), self.settings.result_ttl_s
            )
        except CacheUnavailable as exc:
            logger.warning(
                "invocation %s finished but the cache is unavailable: %s",
                invocation.id,
                exc,
                extra={"invocation_id": invocation.id},
            )

    def _log_outcome(self, invocation: Invocation) -> None:
        fields = {
            "invocation_id": invocation.id,
            "function": invocation.function,
            "version": invocation.version,
            "tenant": invocation.tenant,
            "state": invocation.status.value,
            "duration_ms": invocation.duration_ms,
            "attempt": invocation.attempts,
        }
        if invocation.status is State.SUCCEEDED:
            logger.info(
                "invocation %s succeeded in %.1f ms",
                invocation.id,
                invocation.duration_ms or 0.0,
                extra=fields,
            )
        elif invocation.status is State.TIMED_OUT:
            logger.warning("invocation %s timed out", invocation.id, extra=fields)
        else:
            error = invocation.error or {}
            logger.info(
                "invocation %s %s: %s",
                invocation.id,
                invocation.status.value,
                error.get("type"),
                extra=fields,
            )

    def handle_dead_letter(self, delivery: Delivery) -> None:
        """Record an invocation the broker gave up on, then settle it."""
        try:
            message = InvocationMessage.decode(delivery.body)
        except ValueError:
            logger.error("discarding a malformed dead letter")
            delivery.ack()
            return

        error = {
            "type": "delivery_limit",
            "message": (
                "the platform gave up on this invocation after delivering it "
                f"{self.settings.delivery_limit + 1} times without an outcome "
                "(CONVEYOR_DELIVERY_LIMIT)"
            ),
        }
        try:
            self._fail(message.id, error)
        except InvocationNotFound:
            logger.error("discarding dead letter %s: no such invocation", message.id)
            delivery.ack()
            return
        except BackendUnavailable as exc:
            logger.error(
                "cannot record dead letter %s yet: %s",
                message.id,
                exc,
                extra=_fields(message),
            )
            time.sleep(PLATFORM_FAULT_BACKOFF_S)
            delivery.reject(True)
            return
        logger.warning(
            "invocation %s dead-lettered", message.id, extra=_fields(message)
        )
        delivery.ack()

    def _fail(self, invocation_id: str, error: dict[str, str]) -> None:
        now = time.time()
        invocation = self.store.get_invocation(invocation_id, None)
        if invocation.status is State.QUEUED:
            self.store.fail_queued([invocation_id], error, now)
        elif invocation.status is State.RUNNING:
            outcome = Outcome(status=State.FAILED, error=error)
            finished = self.store.finish_attempt(
                invocation_id, invocation.attempts, outcome, now
            )
            if finished is not None:
                self._publish(finished)


def _fields(message: InvocationMessage) -> dict[str, object]:
    return {
        "invocation_id": message.id,
        "function": message.function,
        "version": message.version,
        "tenant": message.tenant,
    }
