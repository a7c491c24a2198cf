"""The MongoDB store, through pymongo: the store of a fleet.

An invocation is one document whose ``_id`` is its id, so ids sort by
creation time and every state transition is one conditional
``find_one_and_update`` on that document: concurrent workers and gateways
never overwrite each other's writes.

A function's version counter is a document in the functions collection
beside the versions it numbered, told apart by having no version number;
deleting the function's versions keeps it, so a name never reuses a number.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from conveyor_core import codec
from conveyor_core.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidTransition,
    InvocationNotFound,
    KeyNotFound,
    MissingDependency,
    StoreUnavailable,
)
from conveyor_core.names import (
    FUNCTIONS_COLLECTION,
    INVOCATIONS_COLLECTION,
    KEYS_COLLECTION,
)
from conveyor_core.records import (
    ApiKey,
    FunctionSummary,
    FunctionVersion,
    Invocation,
    Outcome,
    Scope,
    State,
)
from conveyor_core.store import Store

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

try:
    from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument
    from pymongo import errors as mongo_errors
    from pymongo.collection import Collection
except ImportError:
    raise MissingDependency("pymongo") from None

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "conveyor"
SERVER_SELECTION_TIMEOUT_MS = 3000
CONNECT_TIMEOUT_MS = 3000

# Version documents have a number; the counter beside them has none.
_IS_VERSION = {"$gte": 1}
_LIVE = [State.QUEUED.value, State.RUNNING.value]

_Method = TypeVar("_Method", bound=Callable[..., Any])
_Record = TypeVar("_Record", bound="DataclassInstance")


def _translate_errors(method: _Method) -> _Method:
    """Raise StoreUnavailable where pymongo cannot reach the server.

    ConnectionFailure covers AutoReconnect, NetworkTimeout, NotPrimaryError
    and ServerSelectionTimeoutError.
    """

    @functools.wraps(method)
    def guarded(self: MongoStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except mongo_errors.ConnectionFailure as exc:
            raise StoreUnavailable(
                f"MongoDB at {self.hosts} cannot be reached: {exc}"
            ) from exc

    return guarded  # type: ignore[return-value]


def _build(cls: type[_Record], values: dict[str, Any]) -> _Record:
    """A record from a stored document, ignoring fields it does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if name in names})


class MongoStore(Store):
    """The store in a MongoDB database: keys, functions and invocations."""

    def __init__(
        self, url: str, database: str | None = None, *, client: Any = None
    ) -> None:
        parts = urlsplit(url)
        # The netloc may carry a password, which must not reach a message.
        self.hosts = parts.netloc.rpartition("@")[2] or url
        self._owns_client = client is None
        if client is None:
            client = self._connect(url)
        self._client = client

        name = database or unquote(parts.path.lstrip("/")) or DEFAULT_DATABASE
        db = client[name]
        self._keys: Collection[dict[str, Any]] = db[KEYS_COLLECTION]
        self._functions: Collection[dict[str, Any]] = db[FUNCTIONS_COLLECTION]
        self._invocations: Collection[dict[str, Any]] = db[INVOCATIONS_COLLECTION]

        try:
            self._create_indexes()
        except StoreUnavailable:
            self.close()
            raise
        logger.debug("opened the MongoDB store %s/%s", self.hosts, name)

    @staticmethod
    def _connect(url: str) -> Any:
        try:
            return MongoClient(
                url,
                serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
                connectTimeoutMS=CONNECT_TIMEOUT_MS,
                appname="conveyor",
            )
        except (mongo_errors.ConfigurationError, ValueError) as exc:
            # pymongo raises ValueError for some malformed URLs, such as a
            # port that is not a number.
            raise ConfigurationError(
                f"the MongoDB URL cannot be used ({exc}); write "
                "mongodb://user:password@host:27017/database"
            ) from None

    @_translate_errors
    def _create_indexes(self) -> None:
        self._keys.create_index([("key_hash", ASCENDING)], unique=True, name="by_hash")
        self._keys.create_index(
            [("tenant", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
            name="by_tenant",
        )
        self._keys.create_index(
            [("scopes", ASCENDING), ("revoked_at", ASCENDING)], name="by_scope"
        )

        self._functions.create_index(
            [("tenant", ASCENDING), ("name", ASCENDING), ("version", ASCENDING)],
            unique=True,
            name="by_version",
        )

        self._invocations.create_index(
            [("tenant", ASCENDING), ("_id", DESCENDING)], name="by_tenant"
        )
        self._invocations.create_index(
            [("tenant", ASCENDING), ("function", ASCENDING), ("_id", DESCENDING)],
            name="by_function",
        )
        self._invocations.create_index(
            [("tenant", ASCENDING), ("status", ASCENDING), ("_id", DESCENDING)],
            name="by_status",
        )
        # Partial, so that the many invocations without a key do not collide.
        self._invocations.create_index(
            [("tenant", ASCENDING), ("idempotency_key", ASCENDING)],
            unique=True,
            partialFilterExpression={"idempotency_key": {"$exists": True}},
            name="by_idempotency_key",
        )

    # Keys.

    @_translate_errors
    def add_key(self, key: ApiKey) -> None:
        doc = dataclasses.asdict(key)
        doc["_id"] = doc.pop("id")
        self._keys.insert_one(doc)

    @_translate_errors
    def find_key(self, key_hash: str) -> ApiKey | None:
        doc = self._keys.find_one({"key_hash": key_hash})
        return None if doc is None else self._key(doc)

    @_translate_errors
    def list_keys(self, tenant: str) -> list[ApiKey]:
        docs = self._keys.find({"tenant": tenant}).sort(
            [("created_at", ASCENDING), ("_id", ASCENDING)]
        )
        return [self._key(doc) for doc in docs]

    @_translate_errors
    def revoke_key(self, tenant: str, key_id: str, at: float) -> None:
        # A key revoked twice keeps the time it was first revoked.
        found = self._keys.update_one(
            {"_id": key_id, "tenant": tenant, "revoked_at": None},
            {"$set": {"revoked_at": at}},
        )
        if found.matched_count:
            return
        if self._keys.find_one({"_id": key_id, "tenant": tenant}, {"_id": 1}) is None:
            raise KeyNotFound(key_id)

    @_translate_errors
    def has_admin_key(self) -> bool:
        query = {"scopes": Scope.ADMIN.value, "revoked_at": None}
        return self._keys.find_one(query, {"_id": 1}) is not None

    @staticmethod
    def _key(doc: dict[str, Any]) -> ApiKey:
        doc["id"] = doc.pop("_id")
        return _build(ApiKey, doc)

    # Functions.

    @_translate_errors
    def add_function_version(self, function: FunctionVersion) -> FunctionVersion:
        version = self._next_version(function.tenant, function.name)
        numbered = dataclasses.replace(function, version=version)
        self._functions.insert_one(dataclasses.asdict(numbered))
        return numbered

    def _next_version(self, tenant: str, name: str) -> int:
        """Count up the name's counter, which deleting the function keeps."""
        query = {"_id": {"tenant": tenant, "name": name}}
        update = {
            "$inc": {"last_version": 1},
            # The unique (tenant, name, version) index also covers counters,
            # which have no version: each needs its own tenant and name.
            "$setOnInsert": {"tenant": tenant, "name": name},
        }
        bump = functools.partial(
            self._functions.find_one_and_update,
            query,
            update,
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        try:
            counter = bump()
        except mongo_errors.DuplicateKeyError:
            # Two first uploads of the name raced to create the counter; the
            # loser finds it in place now.
            counter = bump()
        # An upsert that returns the document after the update always has one.
        return int(cast(dict[str, Any], counter)["last_version"])

    @_translate_errors
    def get_function(
        self, tenant: str, name: str, version: int | None = None
    ) -> FunctionVersion:
        query = {
            "tenant": tenant,
            "name": name,
            "version": _IS_VERSION if version is None else version,
        }
        doc = self._functions.find_one(
            query, {"_id": False}, sort=[("version", DESCENDING)]
        )
        if doc is None:
            raise FunctionNotFound(name, version)
        return _build(FunctionVersion, doc)

    @_translate_errors
    def list_functions(self, tenant: str) -> list[FunctionSummary]:
        groups = self._functions.aggregate(
            [
                {"$match": {"tenant": tenant, "version": _IS_VERSION}},
                {"$sort": {"name": ASCENDING, "version": ASCENDING}},
                {
                    "$group": {
                        "_id": "$name",
                        "latest": {"$last": "$$ROOT"},
                        "versions": {"$sum": 1},
                    }
                },
                {"$sort": {"_id": ASCENDING}},
            ]
        )
        return [
            FunctionSummary(_build(FunctionVersion, group["latest"]), group["versions"])
            for group in groups
        ]

    @_translate_errors
    def count_versions(self, tenant: str, name: str) -> int:
        count = self._functions.count_documents(
            {"tenant": tenant, "name": name, "version": _IS_VERSION}
        )
        if count == 0:
            raise FunctionNotFound(name)
        return count

    @_translate_errors
    def delete_function(self, tenant: str, name: str) -> None:
        deleted = self._functions.delete_many(
            {"tenant": tenant, "name": name, "version": _IS_VERSION}
        )
        if deleted.deleted_count == 0:
            raise FunctionNotFound(name)

    # Invocations.

    @_translate_errors
    def add_invocations(self, invocations: Sequence[Invocation]) -> list[Invocation]:
        result = list(invocations)
        if not result:
            return result
        docs = [self._invocation_doc(invocation) for invocation in invocations]
        try:
            self._invocations.insert_many(docs, ordered=False)
        except mongo_errors.BulkWriteError as exc:
            for error in exc.details.get("writeErrors", []):
                earlier = self._earlier(invocations[error["index"]], error["code"])
                if earlier is None:
                    raise
                result[error["index"]] = earlier
        return result

    def _earlier(self, invocation: Invocation, code: int) -> Invocation | None:
        """The invocation that already holds this one's idempotency key."""
        if code != 11000 or invocation.idempotency_key is None:
            return None
        doc = self._invocations.find_one(
            {"tenant": invocation.tenant, "idempotency_key": invocation.idempotency_key}
        )
        return None if doc is None else self._invocation(doc)

    @_translate_errors
    def get_invocation(self, invocation_id: str, tenant: str | None) -> Invocation:
        query = {"_id": invocation_id}
        if tenant is not None:
            query["tenant"] = tenant
        doc = self._invocations.find_one(query)
        if doc is None:
            raise InvocationNotFound(invocation_id)
        return self._invocation(doc)

    @_translate_errors
    def list_invocations(
        self,
        tenant: str,
        function: str | None = None,
        status: State | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Invocation]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        query: dict[str, Any] = {"tenant": tenant}
        if function is not None:
            query["function"] = function
        if status is not None:
            query["status"] = State(status).value
        if before is not None:
            query["_id"] = {"$lt": before}
        docs = self._invocations.find(query).sort("_id", DESCENDING).limit(limit)
        return [self._invocation(doc) for doc in docs]

    @_translate_errors
    def start_attempt(
        self, invocation_id: str, worker: str, at: float
    ) -> Invocation | None:
        # The new attempt's number is in the pushed entry, so it is read
        # first and the update is conditional on it; a lost race means
        # another start got in between, and the loop reads again.
        while True:
            current = self._invocations.find_one(
                {"_id": invocation_id}, {"status": 1, "attempts": 1}
            )
            if current is None or current["status"] not in _LIVE:
                logger.debug(
                    "invocation %s is settled or unknown; not started", invocation_id
                )
                return None

            attempts = current["attempts"]
            entry = {
                "number": attempts + 1,
                "worker": worker,
                "started_at": at,
                "finished_at": None,
                "status": None,
            }
            doc = self._invocations.find_one_and_update(
                {"_id": invocation_id, "status": {"$in": _LIVE}, "attempts": attempts},
                {
                    "$set": {"status": State.RUNNING.value, "started_at": at},
                    "$inc": {"attempts": 1},
                    "$push": {"attempt_log": entry},
                },
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return self._invocation(doc)

    @_translate_errors
    def finish_attempt(
        self, invocation_id: str, attempt: int, outcome: Outcome, at: float
    ) -> Invocation | None:
        status = State(outcome.status)
        if not status.terminal:
            raise ValueError(
                f"an attempt must finish in a terminal state, got {status.value!r}"
            )
        doc = None
        if attempt >= 1:
            entry = f"attempt_log.{attempt - 1}"
            doc = self._invocations.find_one_and_update(
                {
                    "_id": invocation_id,
                    "status": State.RUNNING.value,
                    "attempts": attempt,
                },
                {
                    "$set": {
                        "status": status.value,
                        "result_json": codec.dumps(outcome.result).decode(),
                        "error": outcome.error,
                        "logs": outcome.logs,
                        "logs_truncated": outcome.logs_truncated,
                        "duration_ms": outcome.duration_ms,
                        "finished_at": at,
                        f"{entry}.finished_at": at,
                        f"{entry}.status": status.value,
                    }
                },
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            logger.debug(
                "invocation %s is no longer running attempt %d; outcome dropped",
                invocation_id,
                attempt,
            )
            return None
        return self._invocation(doc)

    @_translate_errors
    def cancel_invocation(
        self, tenant: str, invocation_id: str, at: float
    ) -> Invocation:
        doc = self._invocations.find_one_and_update(
            {"_id": invocation_id, "tenant": tenant, "status": State.QUEUED.value},
            {"$set": {"status": State.CANCELLED.value, "finished_at": at}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return self._invocation(doc)

        current = self._invocations.find_one(
            {"_id": invocation_id, "tenant": tenant}, {"status": 1}
        )
        if current is None:
            raise InvocationNotFound(invocation_id)
        raise InvalidTransition(invocation_id, current["status"], State.CANCELLED.value)

    @_translate_errors
    def fail_queued(
        self, invocation_ids: Sequence[str], error: dict[str, Any], at: float
    ) -> None:
        if not invocation_ids:
            return
        self._invocations.update_many(
            {"_id": {"$in": list(invocation_ids)}, "status": State.QUEUED.value},
            {
                "$set": {
                    "status": State.FAILED.value,
                    "error": error,
                    "finished_at": at,
                }
            },
        )

    @staticmethod
    def _invocation_doc(invocation: Invocation) -> dict[str, Any]:
        doc = invocation.to_doc()
        doc["_id"] = doc.pop("id")
        # BSON holds no integer beyond 64 bits, which a result may have.
        doc["result_json"] = codec.dumps(doc.pop("result")).decode()
        # Left out rather than null, so the partial unique index skips it.
        if doc["idempotency_key"] is None:
            del doc["idempotency_key"]
        return doc

    @staticmethod
    def _invocation(doc: dict[str, Any]) -> Invocation:
        doc["id"] = doc.pop("_id")
        doc["result"] = codec.loads(doc.pop("result_json", "null"))
        return Invocation.from_doc(doc)

    # Lifecycle.

    @_translate_errors
    def ping(self) -> None:
        self._client.admin.command("ping")

    def close(self) -> None:
        # A client passed in belongs to the caller, who closes it.
        if self._owns_client:
            self._client.close()
