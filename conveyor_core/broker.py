"""The broker port: a durable queue of invocation messages.

Backends live in ``conveyor_core.brokers``, one module each.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from conveyor_core.errors import BrokerUnavailable


@dataclass
class Delivery:
    """A message handed to a consumer, to be settled exactly once.

    ``ack`` and ``reject`` may be called from any thread. ``deliveries`` is
    how many times the broker handed this message out, this time included,
    where the broker counts it (``redelivered`` is always known).
    """

    body: bytes
    redelivered: bool
    ack: Callable[[], None]
    reject: Callable[[bool], None]
    deliveries: int | None = None


DeliveryHandler = Callable[[Delivery], None]


class Publication:
    """Messages handed to the broker, confirmed or not yet.

    ``publish_nowait`` returns one, so that a caller can do other work, or
    wait for something else too, while the broker confirms.
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._error: Exception | None = None

    def done(self) -> bool:
        """Whether the broker has confirmed every message, or failed to."""
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> None:
        """Return once every message is confirmed; raise BrokerUnavailable.

        Raises BrokerUnavailable as well when ``timeout_s`` runs out first.
        """
        if not self._done.wait(timeout_s):
            raise self._timed_out()
        if self._error is not None:
            raise self._error

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once done, at once if done already; any thread."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def settle(self, error: Exception | None = None) -> None:
        """Mark it confirmed, or failed with ``error``; for brokers only."""
        with self._lock:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def _timed_out(self) -> Exception:
        return BrokerUnavailable("the broker did not confirm the messages in time")


class Broker(ABC):
    """Durable, at-least-once delivery of invocation messages."""

    @abstractmethod
    def publish(self, bodies: Sequence[bytes]) -> None:
        """Enqueue the messages persistently and return once all are confirmed.

        Safe to call from many threads. Raises BrokerUnavailable when the
        broker cannot confirm them all in time; some may then be enqueued.
        """

    def publish_nowait(self, bodies: Sequence[bytes]) -> Publication:
        """Start publishing; the Publication says when all are confirmed.

        Brokers that confirm asynchronously override this; by default the
        messages are published at once and the Publication is done.
        """
        publication = Publication()
        try:
            self.publish(bodies)
        except Exception as exc:
            publication.settle(exc)
        else:
            publication.settle()
        return publication

    @abstractmethod
    def consume(
        self,
        on_message: DeliveryHandler,
        on_dead_letter: DeliveryHandler,
        prefetch: int,
        stop: threading.Event,
    ) -> None:
        """Deliver messages until ``stop`` is set, reconnecting on failure.

        At most ``prefetch`` messages are unsettled at once. Handlers run on
        the consuming thread and must return quickly, handing work elsewhere.
        A message rejected without requeue, or delivered more than the
        delivery limit, goes to the dead-letter queue and from there to
        ``on_dead_letter``. On return, unsettled messages go back to the queue.
        """

    @abstractmethod
    def ping(self) -> None:
        """Return if the broker answers; raise BrokerUnavailable otherwise."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""
