"""The RabbitMQ broker: quorum queues through pika, with pipelined confirms.

Publishing goes through one I/O thread per broker that owns a pika
``SelectConnection`` in confirm mode. Callers hand it whole batches and wait
for the broker's acks, so concurrent callers and large batches share one
pipeline instead of paying a round trip per message. Consuming runs a
``BlockingConnection`` on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from conveyor_core.broker import Broker, Delivery, DeliveryHandler, Publication
from conveyor_core.errors import (
    BrokerUnavailable,
    ConfigurationError,
    MissingDependency,
)
from conveyor_core.names import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    INVOCATIONS_QUEUE,
)

try:
    import pika
    import pika.exceptions
except ImportError:  # pragma: no cover - depends on the installation
    raise MissingDependency("pika") from None

logger = logging.getLogger(__name__)

_PERSISTENT = pika.BasicProperties(delivery_mode=2)

# How long the consumer waits for I/O before it looks at its stop event again.
_CONSUMER_POLL_S = 0.1
_RECONNECT_MIN_S = 0.5
_RECONNECT_MAX_S = 30.0

# Dead letters are rare and quick to record, so their consumer holds one at a
# time; quorum queues refuse a channel-wide (global) prefetch that could
# otherwise share the invocations' budget.
_DEAD_LETTER_PREFETCH = 1

_CONSUMER_ERRORS = (pika.exceptions.AMQPError, OSError)


def dead_letter_queue_for(queue: str) -> str:
    """The name of the dead-letter queue that belongs to ``queue``."""
    return DEAD_LETTER_QUEUE if queue == INVOCATIONS_QUEUE else f"{queue}.dead"


@dataclass(frozen=True)
class _Topology:
    """The queue, its dead-letter queue, and how to declare both."""

    queue: str
    dead_queue: str
    delivery_limit: int

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        """Channel method names and arguments, in declaration order."""
        return [
            (
                "exchange_declare",
                {
                    "exchange": DEAD_LETTER_EXCHANGE,
                    "exchange_type": "direct",
                    "durable": True,
                },
            ),
            (
                "queue_declare",
                {
                    "queue": self.dead_queue,
                    "durable": True,
                    "arguments": {"x-queue-type": "quorum"},
                },
            ),
            (
                "queue_bind",
                {
                    "queue": self.dead_queue,
                    "exchange": DEAD_LETTER_EXCHANGE,
                    "routing_key": self.dead_queue,
                },
            ),
            (
                "queue_declare",
                {
                    "queue": self.queue,
                    "durable": True,
                    "arguments": {
                        "x-queue-type": "quorum",
                        "x-delivery-limit": self.delivery_limit,
                        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                        "x-dead-letter-routing-key": self.dead_queue,
                    },
                },
            ),
        ]

    def declare(self, channel: Any) -> None:
        """Declare everything on a blocking channel; idempotent."""
        for method, arguments in self.steps():
            getattr(channel, method)(**arguments)


def _connection_parameters(url: str, timeout_s: float, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    given = parse_qs(urlsplit(url).query)

    # pika's defaults let an unreachable host hold a caller for 15 s; a
    # connection attempt should not outlast the publish it serves.
    if "socket_timeout" not in given:
        params.socket_timeout = timeout_s
    if "stack_timeout" not in given:
        params.stack_timeout = timeout_s

    # The name shows up in the management UI and in rabbitmqctl's listings.
    params.client_properties = {"connection_name": name}
    return params


def _deliveries(method: Any, properties: Any) -> int | None:
    """How many times the broker handed this message out, this time included."""
    count = (properties.headers or {}).get("x-delivery-count")
    if count is not None:
        return int(count) + 1
    return None if method.redelivered else 1


class _Waiter(Publication):
    """A caller waiting on the publisher thread: for a batch's acks, or a ping."""

    def __init__(self, bodies: Sequence[bytes], timeout_s: float) -> None:
        super().__init__()
        self.bodies = bodies
        self.unconfirmed = len(bodies)
        self.submitted_s = time.monotonic()
        self.deadline_s = self.submitted_s + timeout_s
        self.timeout_s = timeout_s
        self.on_timeout: Callable[[_Waiter], None] | None = None

    def confirm(self) -> None:
        self.unconfirmed -= 1
        if self.unconfirmed <= 0:
            self.settle()

    def fail(self, reason: str) -> None:
        self.settle(BrokerUnavailable(reason))

    def wait(self, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            timeout_s = max(self.deadline_s - time.monotonic(), 0.0)
        if not self._done.wait(timeout_s):
            if self.on_timeout is not None:
                self.on_timeout(self)
            raise BrokerUnavailable(
                f"RabbitMQ did not confirm {len(self.bodies)} message(s) within "
                f"{self.timeout_s:.1f} s"
            )
        if self._error is not None:
            raise self._error


class _ConfirmLink:
    """One connection in confirm mode, driven by its own I/O thread.

    Any thread may call ``wait_ready``, ``submit`` and ``abort``; every other
    method runs on the I/O thread. A link that fails is never revived: the
    broker opens a new one on the next call.
    """

    def __init__(self, params: pika.URLParameters, topology: _Topology) -> None:
        self._params = params
        self._topology = topology
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: str | None = None
        self._abort_reason: str | None = None
        self._closing = False
        self._outbox: deque[_Waiter] = deque()
        self._flush_scheduled = False
        self._ioloop: Any = None
        self._connection: Any = None

        # Owned by the I/O thread.
        self._channel: Any = None
        self._unconfirmed: OrderedDict[int, _Waiter] = OrderedDict()
        self._pings: list[_Waiter] = []
        self._next_tag = 1
        self.last_confirm_s = 0.0

        self._thread = threading.Thread(
            target=self._run, name="conveyor-rabbitmq-publisher", daemon=True
        )
        self._thread.start()

    @property
    def dead(self) -> bool:
        return self._error is not None

    def wait_ready(self, timeout_s: float) -> None:
        if not self._ready.wait(max(timeout_s, 0.0)):
            raise BrokerUnavailable(
                f"RabbitMQ at {self._params.host}:{self._params.port} did not "
                f"open a connection within {timeout_s:.1f} s"
            )
        if self._error is not None:
            raise BrokerUnavailable(self._error)

    def submit(self, waiter: _Waiter) -> None:
        """Queue a batch (or, when empty, a ping) for the I/O thread."""
        with self._lock:
            if self._error is not None:
                raise BrokerUnavailable(self._error)
            self._outbox.append(waiter)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._ioloop.add_callback_threadsafe(self._flush)

    def abort(self, reason: str, *, closing: bool = False) -> None:
        """Close the connection; everything still waiting fails with reason.

        ``closing`` says the owner asked for it, which is not worth a warning.
        """
        with self._lock:
            if self._error is not None or self._abort_reason is not None:
                return
            self._abort_reason = reason
            self._closing = closing
            if self._ioloop is not None:
                self._ioloop.add_callback_threadsafe(partial(self._shut, reason))

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    # Everything below runs on the I/O thread.

    def _run(self) -> None:
        try:
            connection = pika.SelectConnection(
                self._params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
            )
            with self._lock:
                self._connection = connection
                self._ioloop = connection.ioloop
                if self._abort_reason is not None:
                    self._ioloop.add_callback_threadsafe(
                        partial(self._shut, self._abort_reason)
                    )
            self._ioloop.start()
        except Exception as exc:  # callers waiting on this thread must hear of it
            logger.exception("the RabbitMQ publisher thread failed")
            self._fail(f"the RabbitMQ publisher failed: {exc!r}")
            self._close_after_fault()
        finally:
            self._fail("the RabbitMQ publisher connection is closed")
            if self._ioloop is not None:
                self._ioloop.close()

    def _close_after_fault(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        try:
            if not connection.is_closing:
                connection.close()
            self._ioloop.start()
        except Exception:  # the thread is ending either way
            logger.debug("could not close the publisher connection", exc_info=True)

    def _fail(self, reason: str) -> None:
        """Mark the link dead and fail every waiter with the first reason."""
        with self._lock:
            first = self._error is None
            if first:
                self._error = reason
            reason = self._error or reason
            waiters = list(self._outbox)
            self._outbox.clear()
        waiters.extend(self._unconfirmed.values())
        self._unconfirmed.clear()
        waiters.extend(self._pings)
        self._pings.clear()
        for waiter in waiters:
            waiter.fail(reason)
        if first and self._ready.is_set() and not self._closing:
            logger.warning("the RabbitMQ publisher connection failed: %s", reason)
        self._ready.set()

    def _shut(self, reason: str) -> None:
        self._fail(reason)
        if not (self._connection.is_closing or self._connection.is_closed):
            self._connection.close()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, connection: Any, error: BaseException) -> None:
        logger.debug("cannot connect to RabbitMQ: %s", error)
        self._fail(
            f"cannot connect to RabbitMQ at {self._params.host}:"
            f"{self._params.port}: {error!r}"
        )
        self._ioloop.stop()

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        self._fail(f"the RabbitMQ connection closed: {reason!r}")
        self._ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _frame: self._declare(self._topology.steps()),
        )

    def _declare(self, steps: list[tuple[str, dict[str, Any]]]) -> None:
        if not steps:
            self.last_confirm_s = time.monotonic()
            self._ready.set()
            return
        (method, arguments), rest = steps[0], steps[1:]
        getattr(self._channel, method)(
            **arguments, callback=lambda _frame: self._declare(rest)
        )

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        self._shut(f"the RabbitMQ publishing channel closed: {reason!r}")

    def _on_return(self, channel: Any, method: Any, properties: Any, body: Any) -> None:
        # Without mandatory publishing a deleted queue would swallow messages
        # and still ack them. The return comes before its ack, so failing the
        # link now fails the batch that holds it; a new link redeclares.
        self._shut(
            f"RabbitMQ could not route a message to queue {self._topology.queue} "
            f"({method.reply_text}); the next publish declares it again"
        )

    def _flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            waiters = list(self._outbox)
            self._outbox.clear()
        if self._error is not None:
            for waiter in waiters:
                waiter.fail(self._error)
            return

        try:
            for waiter in waiters:
                if waiter.bodies:
                    self._publish(waiter)
                else:
                    self._ping(waiter)
        except pika.exceptions.AMQPError as exc:
            for waiter in waiters:
                waiter.fail(f"RabbitMQ refused the publish: {exc!r}")
            self._shut(f"RabbitMQ refused the publish: {exc!r}")

    def _publish(self, waiter: _Waiter) -> None:
        for body in waiter.bodies:
            # Confirm mode numbers the channel's publishes 1, 2, 3, …
            self._unconfirmed[self._next_tag] = waiter
            self._next_tag += 1
            self._channel.basic_publish(
                exchange="",
                routing_key=self._topology.queue,
                body=body,
                properties=_PERSISTENT,
                mandatory=True,
            )

    def _ping(self, waiter: _Waiter) -> None:
        self._pings.append(waiter)

        def answered(_frame: Any) -> None:
            self._pings.remove(waiter)
            waiter.settle()

        self._channel.queue_declare(
            self._topology.queue, passive=True, callback=answered
        )

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        settled: list[_Waiter] = []
        if method.multiple:
            while self._unconfirmed:
                tag = next(iter(self._unconfirmed))
                if tag > method.delivery_tag:
                    break
                settled.append(self._unconfirmed.popitem(last=False)[1])
        else:
            waiter = self._unconfirmed.pop(method.delivery_tag, None)
            if waiter is not None:
                settled.append(waiter)

        for waiter in settled:
            if acked:
                waiter.confirm()
            else:
                waiter.fail("RabbitMQ refused to take a message (nack)")
        self.last_confirm_s = time.monotonic()


class _Settler:
    """Settles one consumer connection's deliveries in batches, on its thread.

    Workers settle from any thread; each settle is queued and the connection's
    thread applies everything queued in one go. Acks that leave no unsettled
    delivery below them on their channel collapse into one ``multiple`` ack,
    since a blocking channel writes to the socket on every call.
    """

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._queued: list[tuple[Any, int, bool | None]] = []
        self._scheduled = False
        # Owned by the connection's thread: delivered, not yet settled.
        self._unsettled: dict[Any, set[int]] = {}

    def delivered(self, channel: Any, delivery_tag: int) -> _Settlement:
        """Track a delivery; runs on the connection's thread."""
        self._unsettled.setdefault(channel, set()).add(delivery_tag)
        return _Settlement(self, channel, delivery_tag)

    def settle(self, channel: Any, delivery_tag: int, requeue: bool | None) -> None:
        """Queue an ack (``requeue`` None) or a reject; any thread."""
        with self._lock:
            self._queued.append((channel, delivery_tag, requeue))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._connection.add_callback_threadsafe(self._apply)
        except pika.exceptions.ConnectionWrongStateError:
            logger.debug(
                "dropped the settle of delivery %d: its connection has closed and "
                "the broker has requeued it",
                delivery_tag,
            )

    def _apply(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, []
            self._scheduled = False
        by_channel: dict[Any, list[tuple[int, bool | None]]] = {}
        for channel, tag, requeue in queued:
            by_channel.setdefault(channel, []).append((tag, requeue))
        for channel, settles in by_channel.items():
            try:
                self._apply_to(channel, settles)
            except (
                pika.exceptions.ChannelWrongStateError,
                pika.exceptions.ChannelClosed,
                pika.exceptions.ConnectionClosed,
            ):
                logger.debug(
                    "dropped %d settle(s): their channel has closed and the "
                    "broker has requeued those deliveries",
                    len(settles),
                )

    def _apply_to(self, channel: Any, settles: list[tuple[int, bool | None]]) -> None:
        unsettled = self._unsettled.setdefault(channel, set())
        acked = []
        for tag, requeue in settles:
            unsettled.discard(tag)
            if requeue is None:
                acked.append(tag)
            else:
                channel.basic_reject(tag, requeue=requeue)
        if not acked:
            return
        lowest_unsettled = min(unsettled, default=None)
        covered = [
            tag for tag in acked if lowest_unsettled is None or tag < lowest_unsettled
        ]
        if covered:
            channel.basic_ack(max(covered), multiple=True)
        for tag in acked:
            if lowest_unsettled is not None and tag > lowest_unsettled:
                channel.basic_ack(tag)


class _Settlement:
    """One delivery's ack or reject, handed to its settler once."""

    __slots__ = ("_settler", "_channel", "_tag", "_lock", "_settled")

    def __init__(self, settler: _Settler, channel: Any, delivery_tag: int) -> None:
        self._settler = settler
        self._channel = channel
        self._tag = delivery_tag
        self._lock = threading.Lock()
        self._settled = False

    def ack(self) -> None:
        self._settle(None)

    def reject(self, requeue: bool) -> None:
        self._settle(requeue)

    def _settle(self, requeue: bool | None) -> None:
        with self._lock:
            if self._settled:
                logger.warning(
                    "delivery %d was settled twice; the second call is ignored",
                    self._tag,
                )
                return
            self._settled = True
        self._settler.settle(self._channel, self._tag, requeue)


class RabbitMQBroker(Broker):
    """The production broker: RabbitMQ quorum queues, reached through pika."""

    def __init__(
        self,
        url: str,
        delivery_limit: int = 5,
        *,
        queue: str = INVOCATIONS_QUEUE,
        publish_timeout_s: float = 5.0,
    ) -> None:
        if delivery_limit < 0:
            raise ConfigurationError(
                f"delivery_limit={delivery_limit!r} is negative; use 0 or more "
                "redeliveries before a message is dead-lettered"
            )
        self._topology = _Topology(queue, dead_letter_queue_for(queue), delivery_limit)
        self._publish_timeout_s = publish_timeout_s
        self._publisher_params = _connection_parameters(
            url, publish_timeout_s, f"conveyor publisher ({queue})"
        )
        self._consumer_params = _connection_parameters(
            url, publish_timeout_s, f"conveyor consumer ({queue})"
        )
        self._lock = threading.Lock()
        self._link: _ConfirmLink | None = None

    def publish(self, bodies: Sequence[bytes]) -> None:
        if not bodies:
            return
        self.publish_nowait(bodies).wait()
        logger.debug("published %d message(s) to %s", len(bodies), self._topology.queue)

    def publish_nowait(self, bodies: Sequence[bytes]) -> Publication:
        waiter = _Waiter(bodies, self._publish_timeout_s)
        if not bodies:
            waiter.settle()
            return waiter
        try:
            link = self._ready_link(waiter.deadline_s)
            # No ack for anything since this batch went out means the
            # connection is stuck rather than busy: start over next time.
            waiter.on_timeout = partial(self._discard_if_stuck, link)
            link.submit(waiter)
        except BrokerUnavailable as exc:
            waiter.settle(exc)
        return waiter

    def ping(self) -> None:
        waiter = _Waiter((), self._publish_timeout_s)
        link = self._ready_link(waiter.deadline_s)
        waiter.on_timeout = lambda _: self._discard(
            link, "RabbitMQ did not answer a ping"
        )
        link.submit(waiter)
        try:
            waiter.wait()
        except BrokerUnavailable as exc:
            if not waiter.done():
                raise BrokerUnavailable(
                    f"RabbitMQ did not answer within {self._publish_timeout_s:.1f} s"
                ) from exc
            raise

    def _discard_if_stuck(self, link: _ConfirmLink, waiter: _Waiter) -> None:
        if link.last_confirm_s < waiter.submitted_s:
            self._discard(link, "RabbitMQ stopped confirming publishes")

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.abort("the broker was closed", closing=True)
            link.join(self._publish_timeout_s)

    def _ready_link(self, deadline_s: float) -> _ConfirmLink:
        with self._lock:
            link = self._link
            if link is None or link.dead:
                link = self._link = _ConfirmLink(self._publisher_params, self._topology)
        link.wait_ready(deadline_s - time.monotonic())
        return link

    def _discard(self, link: _ConfirmLink, reason: str) -> None:
        with self._lock:
            if self._link is link:
                self._link = None
        link.abort(reason)

    def consume(
        self,
        on_message: DeliveryHandler,
        on_dead_letter: DeliveryHandler,
        prefetch: int,
        stop: threading.Event,
    ) -> None:
        if prefetch < 1:
            # RabbitMQ reads 0 as no limit at all, which the contract forbids.
            raise ConfigurationError(
                f"prefetch={prefetch!r} would hand out no messages; use 1 or more"
            )
        delay_s = _RECONNECT_MIN_S
        while not stop.is_set():
            connection: Any = None
            channels: tuple[Any, ...] = ()
            try:
                connection, channels = self._open_consumer(
                    on_message, on_dead_letter, prefetch
                )
                delay_s = _RECONNECT_MIN_S
                self._pump(connection, channels, stop)
            except _CONSUMER_ERRORS as exc:
                logger.warning(
                    "the RabbitMQ consumer of %s is disconnected (%s); "
                    "reconnecting in %.1f s",
                    self._topology.queue,
                    exc,
                    delay_s,
                )
            finally:
                if connection is not None:
                    _close_consumer(connection, channels)
            if not stop.is_set():
                stop.wait(delay_s)
                delay_s = min(delay_s * 2, _RECONNECT_MAX_S)

    def _open_consumer(
        self,
        on_message: DeliveryHandler,
        on_dead_letter: DeliveryHandler,
        prefetch: int,
    ) -> tuple[Any, tuple[Any, Any]]:
        connection = pika.BlockingConnection(self._consumer_params)
        settler = _Settler(connection)
        try:
            main = connection.channel()
            self._topology.declare(main)
            main.basic_qos(prefetch_count=prefetch)
            main.basic_consume(
                self._topology.queue, partial(_dispatch, settler, on_message)
            )

            dead = connection.channel()
            dead.basic_qos(prefetch_count=_DEAD_LETTER_PREFETCH)
            dead.basic_consume(
                self._topology.dead_queue,
                partial(_dispatch, settler, on_dead_letter),
            )
        except BaseException:
            _close_quietly(connection)
            raise
        logger.info(
            "consuming %s and %s with prefetch %d",
            self._topology.queue,
            self._topology.dead_queue,
            prefetch,
        )
        return connection, (main, dead)

    def _pump(
        self, connection: Any, channels: tuple[Any, ...], stop: threading.Event
    ) -> None:
        while not stop.is_set():
            connection.process_data_events(time_limit=_CONSUMER_POLL_S)

            # pika raises nothing when the broker closes only a channel (an
            # ack timeout does that) or cancels a consumer (its queue was
            # deleted): the deliveries just stop, so look for it here.
            if not all(ch.is_open and ch.consumer_tags for ch in channels):
                raise pika.exceptions.AMQPChannelError(
                    "the broker closed a channel or cancelled a consumer"
                )


def _dispatch(
    settler: _Settler,
    handler: DeliveryHandler,
    channel: Any,
    method: Any,
    properties: Any,
    body: bytes,
) -> None:
    settlement = settler.delivered(channel, method.delivery_tag)
    handler(
        Delivery(
            body=body,
            redelivered=bool(method.redelivered),
            ack=settlement.ack,
            reject=settlement.reject,
            deliveries=_deliveries(method, properties),
        )
    )


def _close_consumer(connection: Any, channels: Sequence[Any]) -> None:
    """Stop deliveries, send the settles already handed over, then close."""
    try:
        for channel in channels:
            if channel.is_open:
                for tag in list(channel.consumer_tags):
                    channel.basic_cancel(tag)
        if connection.is_open:
            connection.process_data_events(time_limit=0)
    except _CONSUMER_ERRORS as exc:
        logger.debug("could not stop the RabbitMQ consumer cleanly: %s", exc)
    _close_quietly(connection)


def _close_quietly(connection: Any) -> None:
    if not connection.is_open:
        return
    try:
        connection.close()
    except _CONSUMER_ERRORS as exc:
        logger.debug("the RabbitMQ consumer connection closed uncleanly: %s", exc)
