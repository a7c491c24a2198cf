"""The broker port: a durable queue of invocation messages.

Backends live in ``conveyor_core.brokers``, one module each.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass


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


class Broker(ABC):
    """Durable, at-least-once delivery of invocation messages."""

    @abstractmethod
    def publish(self, bodies: Sequence[bytes]) -> None:
        """Enqueue the messages persistently and return once all are confirmed.

        Safe to call from many threads. Raises BrokerUnavailable when the
        broker cannot confirm them all in time; some may then be enqueued.
        """

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
