"""The worker: takes invocations off the broker, runs them, records outcomes.

Delivery is at least once. A message is acked only after the terminal state
of each invocation it carries is in the store, so a worker that dies, or a
store that cannot be reached, leaves the message with the broker, which
hands it out again; the store's conditional transitions make sure a
redelivered invocation that already finished is recorded once and not run
again.

A message carries a bundle of invocations of one function version. The
worker starts the bundle with one store write, runs its invocations side by
side on its thread pool, and records outcomes in groups: whichever thread
finishes an invocation records every outcome that is waiting at that moment,
in one store write and one cache round trip, so the cost of a write is
shared under load without delaying an outcome when the worker is idle.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from conveyor_core.broker import Broker, Delivery
from conveyor_core.cache import Cache
from conveyor_core.errors import (
    BackendUnavailable,
    CacheUnavailable,
    ExecutorError,
    FunctionNotFound,
    InvocationNotFound,
)
from conveyor_core.messages import InvocationMessage, decode_bundle
from conveyor_core.records import FunctionVersion, Invocation, Outcome, State
from conveyor_core.settings import Settings
from conveyor_core.store import AttemptFinish, Store
from runtime.executor import Executor

logger = logging.getLogger(__name__)

#: How long a worker thread waits before handing a message back when the
#: store (or the executor) fails, so an outage does not spin through the
#: broker's delivery limit in a few milliseconds.
PLATFORM_FAULT_BACKOFF_S = 2.0

#: Function versions are immutable, so the worker keeps the ones it ran.
FUNCTION_CACHE_SIZE = 1024

#: The most outcomes recorded in one store write.
RECORD_BATCH = 256

#: How long a stopping worker lets running invocations finish and be acked
#: before it closes its connection (the broker then hands them out again).
STOP_GRACE_S = 30.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Bundle:
    """One delivery's invocations; the delivery is settled after the last one."""

    __slots__ = ("_delivery", "_remaining", "_faulted", "_lock", "_on_settled")

    def __init__(self, delivery: Delivery, count: int, on_settled: object) -> None:
        self._delivery = delivery
        self._remaining = count
        self._faulted = False
        self._lock = threading.Lock()
        self._on_settled = on_settled

    def done(self, faulted: bool = False) -> None:
        """One invocation is recorded (or, when ``faulted``, could not be)."""
        with self._lock:
            self._remaining -= 1
            self._faulted = self._faulted or faulted
            if self._remaining:
                return
        # A fault hands the whole message back; its invocations that are
        # recorded already are acked without running when it comes again.
        if self._faulted:
            self._delivery.reject(True)
        else:
            self._delivery.ack()
        self._on_settled()  # type: ignore[operator]


@dataclass(frozen=True)
class _Finished:
    """An outcome waiting to be recorded."""

    message: InvocationMessage
    attempt: int
    outcome: Outcome
    at: float
    bundle: _Bundle


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
        self._finished: deque[_Finished] = deque()
        self._recording = threading.Lock()
        self._stopping = False
        self._in_flight = 0
        self._idle = threading.Condition()

    @property
    def prefetch(self) -> int:
        """How many messages the worker holds at once.

        ``prefetch`` counts invocations while a message may carry a bundle of
        them; enough messages to keep every thread busy come first.
        """
        settings = self.settings
        return max(settings.concurrency, settings.prefetch // settings.bundle_size)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then let running invocations finish."""
        logger.info(
            "worker %s consuming with concurrency %d, prefetch %d message(s)",
            self.worker_id,
            self.settings.concurrency,
            self.prefetch,
        )
        consuming = threading.Event()
        drainer = threading.Thread(
            target=self._drain_on, args=(stop, consuming), name="conveyor-drain"
        )
        drainer.start()
        try:
            self.broker.consume(
                self._submit,
                self._submit_dead_letter,
                prefetch=self.prefetch,
                stop=consuming,
            )
        finally:
            consuming.set()
            stop.set()
            drainer.join()
            self._pool.shutdown(wait=True, cancel_futures=True)
            logger.info("worker %s stopped", self.worker_id)

    def _drain_on(self, stop: threading.Event, consuming: threading.Event) -> None:
        """Once ``stop`` is set, wait for the running bundles, then stop consuming.

        Messages delivered meanwhile are left unsettled, so they go back to the
        queue when the connection closes, while the running ones finish and
        are acked on the still open connection.
        """
        stop.wait()
        with self._idle:
            self._stopping = True
            if self._in_flight:
                logger.info(
                    "worker %s stopping; waiting for %d running message(s)",
                    self.worker_id,
                    self._in_flight,
                )
            if not self._idle.wait_for(lambda: not self._in_flight, STOP_GRACE_S):
                logger.warning(
                    "worker %s stops with %d message(s) still running; the broker "
                    "hands them out again",
                    self.worker_id,
                    self._in_flight,
                )
        consuming.set()

    def _submit(self, delivery: Delivery) -> None:
        with self._idle:
            if self._stopping:
                # Held unsettled, it goes back to the queue when the
                # connection closes; a reject now would come straight back.
                return
            self._in_flight += 1
        self._pool.submit(self.handle, delivery)

    def _settled(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def _submit_dead_letter(self, delivery: Delivery) -> None:
        with self._idle:
            if self._stopping:
                return
        self._pool.submit(self.handle_dead_letter, delivery)

    def handle(self, delivery: Delivery) -> None:
        """Start a delivered bundle, run its invocations, settle the delivery."""
        try:
            messages = decode_bundle(delivery.body)
        except ValueError as exc:
            logger.error("dropping a malformed message to the dead letters: %s", exc)
            delivery.reject(False)
            self._settled()
            return

        first = messages[0]
        try:
            started = self.store.start_attempts(
                [message.id for message in messages], self.worker_id, time.time()
            )
        except Exception as exc:
            self._fault(first, exc, len(messages))
            delivery.reject(True)
            self._settled()
            return

        runs: list[tuple[InvocationMessage, Invocation]] = []
        for message, invocation in zip(messages, started, strict=True):
            if invocation is None:
                logger.debug(
                    "invocation %s is already settled; not running it again",
                    message.id,
                )
            else:
                runs.append((message, invocation))
        if not runs:
            delivery.ack()
            self._settled()
            return

        bundle = _Bundle(delivery, len(runs), self._settled)
        for message, invocation in runs:
            self._log_start(message, invocation)
        for message, invocation in runs[1:]:
            try:
                self._pool.submit(self._run, message, invocation.attempts, bundle)
            except RuntimeError:
                # The pool is shutting down: finish the bundle on this thread.
                self._run(message, invocation.attempts, bundle)
        message, invocation = runs[0]
        self._run(message, invocation.attempts, bundle)

    def _log_start(self, message: InvocationMessage, invocation: Invocation) -> None:
        fields = {**_fields(message), "attempt": invocation.attempts}
        if invocation.attempts > 1:
            logger.warning(
                "invocation %s redelivered; attempt %d",
                message.id,
                invocation.attempts,
                extra=fields,
            )
        logger.info("invocation %s started", message.id, extra=fields)

    def _run(self, message: InvocationMessage, attempt: int, bundle: _Bundle) -> None:
        try:
            outcome = self._execute(message)
        except Exception as exc:
            self._fault(message, exc, 1)
            bundle.done(faulted=True)
            return
        self._record(_Finished(message, attempt, outcome, time.time(), bundle))

    def _fault(self, message: InvocationMessage, exc: Exception, count: int) -> None:
        """Log a platform fault and back off before the message goes back."""
        if isinstance(exc, (BackendUnavailable, ExecutorError)):
            logger.error(
                "platform fault on invocation %s (of %d), handing it back: %s",
                message.id,
                count,
                exc,
                extra=_fields(message),
            )
        else:
            logger.exception(
                "unexpected fault on invocation %s (of %d), handing it back",
                message.id,
                count,
                extra=_fields(message),
            )
        time.sleep(PLATFORM_FAULT_BACKOFF_S)

    def _record(self, finished: _Finished) -> None:
        """Queue an outcome and record every queued one unless a thread is at it.

        A thread that finds another recording leaves its outcome to it; the
        recording thread looks at the queue again after letting go of the
        lock, so nothing queued meanwhile is stranded.
        """
        self._finished.append(finished)
        while self._finished and self._recording.acquire(blocking=False):
            try:
                while self._finished:
                    batch = []
                    while self._finished and len(batch) < RECORD_BATCH:
                        batch.append(self._finished.popleft())
                    self._record_batch(batch)
            finally:
                self._recording.release()

    def _record_batch(self, batch: list[_Finished]) -> None:
        try:
            recorded = self.store.finish_attempts(
                [AttemptFinish(f.message.id, f.attempt, f.outcome, f.at) for f in batch]
            )
        except Exception as exc:
            self._fault(batch[0].message, exc, len(batch))
            for finished in batch:
                finished.bundle.done(faulted=True)
            return

        announced = []
        for finished, invocation in zip(batch, recorded, strict=True):
            if invocation is None:
                logger.warning(
                    "invocation %s attempt %d was overtaken; its outcome is dropped",
                    finished.message.id,
                    finished.attempt,
                    extra=_fields(finished.message),
                )
            else:
                self._log_outcome(invocation)
                announced.append(invocation)
        self._publish(announced)
        for finished in batch:
            finished.bundle.done()

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

    def _publish(self, invocations: list[Invocation]) -> None:
        if not invocations:
            return
        try:
            self.cache.put_many(
                [(invocation.id, invocation.to_doc()) for invocation in invocations],
                self.settings.result_ttl_s,
            )
        except CacheUnavailable as exc:
            logger.warning(
                "%d invocation(s) from %s finished but the cache is unavailable: %s",
                len(invocations),
                invocations[0].id,
                exc,
                extra={"invocation_id": invocations[0].id},
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
        """Record the invocations of a message the broker gave up on, then settle."""
        try:
            messages = decode_bundle(delivery.body)
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
        failed = []
        for message in messages:
            try:
                invocation = self._fail(message.id, error)
            except InvocationNotFound:
                logger.error(
                    "discarding dead letter %s: no such invocation", message.id
                )
                continue
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
            if invocation is not None:
                logger.warning(
                    "invocation %s dead-lettered", message.id, extra=_fields(message)
                )
                failed.append(invocation)
        self._publish(failed)
        delivery.ack()

    def _fail(self, invocation_id: str, error: dict[str, str]) -> Invocation | None:
        """Fail the invocation unless it is terminal; the failed record or None."""
        now = time.time()
        invocation = self.store.get_invocation(invocation_id, None)
        if invocation.status is State.QUEUED:
            self.store.fail_queued([invocation_id], error, now)
            failed = self.store.get_invocation(invocation_id, None)
            return failed if failed.status is State.FAILED else None
        if invocation.status is State.RUNNING:
            outcome = Outcome(status=State.FAILED, error=error)
            return self.store.finish_attempt(
                invocation_id, invocation.attempts, outcome, now
            )
        return None


def _fields(message: InvocationMessage) -> dict[str, object]:
    return {
        "invocation_id": message.id,
        "function": message.function,
        "version": message.version,
        "tenant": message.tenant,
    }
