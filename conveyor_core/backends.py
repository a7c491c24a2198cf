"""Open each port's backend from the settings: the URL's scheme picks it."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor_core.broker import Broker
from conveyor_core.cache import Cache
from conveyor_core.errors import ConfigurationError
from conveyor_core.settings import Settings
from conveyor_core.store import Store


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def open_store(settings: Settings) -> Store:
    url = settings.store_url or f"sqlite:///{settings.path('conveyor.sqlite3')}"
    scheme = _scheme(url)
    if scheme == "sqlite":
        from conveyor_core.stores.sqlite import SQLiteStore

        return SQLiteStore(_sqlite_path(url))
    if scheme in ("mongodb", "mongodb+srv"):
        from conveyor_core.stores.mongo import MongoStore

        return MongoStore(url)
    raise ConfigurationError(
        f"CONVEYOR_STORE_URL={url!r} names no known store; use mongodb://… "
        "or sqlite:///path/to/file"
    )


def _sqlite_path(url: str) -> str:
    """The file of ``sqlite:///relative`` or ``sqlite:////absolute``."""
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
    if not path:
        raise ConfigurationError(
            f"{url!r} names no file; write sqlite:///path/to/file.sqlite3"
        )
    return path


def open_broker(settings: Settings) -> Broker:
    url = settings.broker_url
    if not url:
        from conveyor_core.brokers.sqlite import SQLiteBroker

        return SQLiteBroker(
            str(settings.path("broker.sqlite3")),
            delivery_limit=settings.delivery_limit,
            queue=settings.queue,
        )
    scheme = _scheme(url)
    if scheme in ("amqp", "amqps"):
        from conveyor_core.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(
            url, delivery_limit=settings.delivery_limit, queue=settings.queue
        )
    if scheme == "sqlite":
        from conveyor_core.brokers.sqlite import SQLiteBroker

        return SQLiteBroker(
            _sqlite_path(url),
            delivery_limit=settings.delivery_limit,
            queue=settings.queue,
        )
    raise ConfigurationError(
        f"CONVEYOR_BROKER_URL={url!r} names no known broker; use amqp://… "
        "or leave it unset for the embedded queue"
    )


def open_cache(settings: Settings) -> Cache:
    url = settings.cache_url
    if not url:
        from conveyor_core.caches.memory import MemoryCache

        return MemoryCache()
    scheme = _scheme(url)
    if scheme in ("redis", "rediss", "unix"):
        from conveyor_core.caches.redis import RedisCache

        return RedisCache(url)
    if scheme == "memory":
        from conveyor_core.caches.memory import MemoryCache

        return MemoryCache()
    raise ConfigurationError(
        f"CONVEYOR_CACHE_URL={url!r} names no known cache; use redis://… "
        "or leave it unset for the in-memory cache"
    )
