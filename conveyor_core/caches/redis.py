"""The Redis result cache: documents under keys with a TTL, wake-ups by pub/sub."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from conveyor_core import codec
from conveyor_core.cache import Cache
from conveyor_core.errors import CacheUnavailable, ConfigurationError, MissingDependency
from conveyor_core.names import FINISHED_CHANNEL, RESULT_KEY_PREFIX

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError as exc:
    raise MissingDependency(exc.name or "redis") from None

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0
HEALTH_CHECK_INTERVAL_S = 15

#: How long the listener blocks on one read, which bounds how late close() is.
POLL_INTERVAL_S = 0.2
#: A listener that heard nothing for this long pings, to find dead connections.
LISTENER_PING_INTERVAL_S = 10.0
RECONNECT_DELAY_S = 0.1
MAX_RECONNECT_DELAY_S = 5.0

_PING_MESSAGE = "conveyor-listener"

# Sets (or, given an empty value, deletes) each key with the TTL in ARGV[1],
# then publishes the ids in the last argument: one command for a whole batch,
# where a pipeline would pay redis-py's cost per command.
_PUT_SCRIPT = f"""
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
    local value = ARGV[i + 1]
    if value == "" then
        redis.call("DEL", key)
    else
        redis.call("SET", key, value, "EX", ttl)
    end
end
redis.call("PUBLISH", "{FINISHED_CHANNEL}", ARGV[#ARGV])
return #KEYS
"""

# redis-py wraps socket failures in its own ConnectionError and TimeoutError,
# both RedisError; OSError covers the odd path where it does not.
_REDIS_ERRORS = (redis.RedisError, OSError)


class RedisCache(Cache):
    """Finished invocations in Redis, with a pub/sub listener for wake-ups."""

    shared = True

    def __init__(self, url: str) -> None:
        try:
            self._pool = redis.ConnectionPool.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=READ_TIMEOUT_S,
                socket_keepalive=True,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                # One quick retry reconnects a pooled connection that went
                # stale while Redis restarted; more would only delay the
                # CacheUnavailable a caller needs to see when Redis is down.
                retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"cache URL {url!r} is not a Redis URL ({exc}); write it as "
                "redis://host:6379/0"
            ) from None
        self._client = redis.Redis(connection_pool=self._pool)
        self._where = _describe(self._pool)
        self._put_script = self._client.register_script(_PUT_SCRIPT)

        self._lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._first_attempt_done = threading.Event()
        self._listening = False
        self._outage_started_at: float | None = None
        self._reconnect_delay_s = RECONNECT_DELAY_S

    @property
    def listening(self) -> bool:
        """Whether the listener is subscribed now; if not, waiters must poll."""
        return self._listening

    def get(self, invocation_id: str) -> dict[str, Any] | None:
        try:
            raw = self._client.get(RESULT_KEY_PREFIX + invocation_id)
        except _REDIS_ERRORS as exc:
            raise self._unavailable("GET", exc) from exc
        if raw is None:
            return None

        try:
            return dict(codec.loads(raw))
        except (ValueError, TypeError):
            # Not ours, or cut short: the store still has the truth.
            logger.warning(
                "cached document of invocation %s is not JSON; ignoring it",
                invocation_id,
                extra={"invocation_id": invocation_id, "cache": self._where},
            )
            return None

    def put(self, invocation_id: str, doc: dict[str, Any], ttl_s: int) -> None:
        self.put_many([(invocation_id, doc)], ttl_s)

    def put_many(self, docs: Sequence[tuple[str, dict[str, Any]]], ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s!r}")
        if not docs:
            return
        keys = []
        values: list[bytes | int | str] = [ttl_s]
        for invocation_id, doc in docs:
            keys.append(RESULT_KEY_PREFIX + invocation_id)
            # An empty value deletes the key instead: waiters still wake up
            # and read the store, and a stale copy from an earlier attempt
            # must not answer for this one.
            values.append(_encode(invocation_id, doc) or b"")
        # One notification names every id of the batch, space separated.
        values.append(" ".join(invocation_id for invocation_id, _ in docs))
        try:
            self._put_script(keys=keys, args=values)
        except _REDIS_ERRORS as exc:
            raise self._unavailable("SET and PUBLISH", exc) from exc

    def ping(self) -> None:
        try:
            self._client.ping()
        except _REDIS_ERRORS as exc:
            raise self._unavailable("PING", exc) from exc

    def subscribe(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._callbacks.append(callback)
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="conveyor-cache-listener", daemon=True
                )
                self._listener.start()

        # Puts from now on should reach the callback, so give the listener
        # its first chance to subscribe; if Redis is down it keeps trying.
        self._first_attempt_done.wait(CONNECT_TIMEOUT_S + READ_TIMEOUT_S)

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            listener = self._listener
            self._callbacks.clear()
        if listener is not None and listener is not threading.current_thread():
            listener.join(POLL_INTERVAL_S + READ_TIMEOUT_S + 1.0)
        self._listening = False
        self._pool.disconnect()

    def _unavailable(self, command: str, exc: BaseException) -> CacheUnavailable:
        return CacheUnavailable(
            f"Redis at {self._where} failed {command} ({exc}); check that it is "
            "up and that CONVEYOR_CACHE_URL points at it"
        )

    # The listener thread.

    def _listen(self) -> None:
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()
            try:
                self._relay(pubsub)
            except _REDIS_ERRORS as exc:
                self._lost(exc)
            except Exception as exc:
                # A fault of ours, not of Redis: keep the listener alive, since
                # without it every waiter falls back to polling.
                self._lost(exc, unexpected=True)
            finally:
                self._listening = False
                self._first_attempt_done.set()
                _close_quietly(pubsub)

            if self._stopping.wait(self._reconnect_delay_s):
                break
            self._reconnect_delay_s = min(
                self._reconnect_delay_s * 2, MAX_RECONNECT_DELAY_S
            )

    def _relay(self, pubsub: redis.client.PubSub) -> None:
        """Pass each finished id to the callbacks until close() or a failure."""
        pubsub.subscribe(FINISHED_CHANNEL)
        last_heard = time.monotonic()
        pinged = False

        while not self._stopping.is_set():
            message = pubsub.get_message(timeout=POLL_INTERVAL_S)
            now = time.monotonic()
            if message is None:
                silent_s = now - last_heard
                if pinged and silent_s > LISTENER_PING_INTERVAL_S + READ_TIMEOUT_S:
                    raise redis.ConnectionError(
                        f"no answer to a ping within {READ_TIMEOUT_S} s"
                    )
                if not pinged and silent_s > LISTENER_PING_INTERVAL_S:
                    pubsub.ping(_PING_MESSAGE)
                    pinged = True
                continue

            last_heard = now
            pinged = False
            if message["type"] == "subscribe":
                self._subscribed()
            elif message["type"] == "message":
                for invocation_id in message["data"].decode("utf-8", "replace").split():
                    self._dispatch(invocation_id)

    def _subscribed(self) -> None:
        self._listening = True
        self._reconnect_delay_s = RECONNECT_DELAY_S
        self._first_attempt_done.set()
        if self._outage_started_at is not None:
            outage_s = time.monotonic() - self._outage_started_at
            self._outage_started_at = None
            logger.info(
                "cache notifications from %s are back after %.1f s",
                self._where,
                outage_s,
                extra={"cache": self._where, "outage_s": round(outage_s, 1)},
            )

    def _lost(self, exc: BaseException, unexpected: bool = False) -> None:
        self._listening = False
        if self._stopping.is_set() or self._outage_started_at is not None:
            return
        # Once per outage: the retries that follow would only repeat it.
        self._outage_started_at = time.monotonic()
        logger.log(
            logging.ERROR if unexpected else logging.WARNING,
            "lost cache notifications from %s (%s); reconnecting, and waiters "
            "poll the store meanwhile",
            self._where,
            exc,
            exc_info=exc if unexpected else None,
            extra={"cache": self._where, "error": str(exc)},
        )

    def _dispatch(self, invocation_id: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(invocation_id)
            except Exception:
                # One waiter's bug must not silence the others or the listener.
                logger.exception(
                    "cache subscriber failed for invocation %s",
                    invocation_id,
                    extra={"invocation_id": invocation_id},
                )


def _encode(invocation_id: str, doc: dict[str, Any]) -> bytes | None:
    """The document as JSON bytes, or None when it is not JSON."""
    try:
        return codec.dumps(doc)
    except (TypeError, ValueError) as exc:
        # Such a document is left to the store rather than cached inexactly.
        logger.warning(
            "invocation %s is not cached: its document is not plain JSON (%s)",
            invocation_id,
            exc,
            extra={"invocation_id": invocation_id, "error": str(exc)},
        )
        return None


def _close_quietly(pubsub: redis.client.PubSub) -> None:
    try:
        pubsub.close()
    except _REDIS_ERRORS:
        # The connection is being dropped anyway.
        pass


def _describe(pool: redis.ConnectionPool) -> str:
    """Where the pool points, without the password, for messages and logs."""
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}/{kwargs.get('db', 0)}"
    host = kwargs.get("host", "localhost")
    return f"{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
