"""One contract for every store: SQLite, MongoDB on mongomock, a real MongoDB.

The real server joins when CONVEYOR_TEST_MONGO_URL names one; each test then
gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mongomock
import pymongo
import pytest

from conveyor_core.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidTransition,
    InvocationNotFound,
    KeyNotFound,
    StoreUnavailable,
)
from conveyor_core.records import (
    ApiKey,
    Attempt,
    FunctionVersion,
    Invocation,
    Outcome,
    State,
    new_id,
)
from conveyor_core.store import AttemptFinish, Store
from conveyor_core.stores import mongo as mongo_module
from conveyor_core.stores import sqlite as sqlite_module
from conveyor_core.stores.mongo import MongoStore
from conveyor_core.stores.sqlite import SQLiteStore
from tests.conftest import MONGO_URL

TENANT = "acme"
OTHER = "globex"
THREADS = 8

# Timestamps with every digit a double holds, so rounding anywhere shows.
T0 = 1712345678.1234567
T1 = 1712345679.9876543
T2 = 1712345681.0000123

NOT_ATOMIC = (
    "mongomock applies an update as a separate read and write, so it cannot "
    "show atomicity; the real-server parameter covers this"
)


@pytest.fixture(
    params=["sqlite", "mongomock", pytest.param("mongodb", marks=pytest.mark.mongo)]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Any) -> Iterator[Store]:
    if backend == "sqlite":
        opened: Store = SQLiteStore(str(tmp_path / "store.sqlite3"))
        yield opened
        opened.close()
    elif backend == "mongomock":
        client: Any = mongomock.MongoClient()
        opened = MongoStore("mongodb://mongomock.invalid/conveyor", client=client)
        yield opened
        opened.close()
        client.close()
    else:
        yield from _real_mongo_store()


def _real_mongo_store() -> Iterator[Store]:
    if not MONGO_URL:
        pytest.skip(
            "CONVEYOR_TEST_MONGO_URL is not set, so no MongoDB server is tested; "
            "set it to mongodb://host:27017 to run the contract on one"
        )
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        MONGO_URL, serverSelectionTimeoutMS=3000
    )
    database = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    try:
        opened = MongoStore(MONGO_URL, database, client=client)
    except StoreUnavailable as exc:
        client.close()
        message = f"MongoDB at CONVEYOR_TEST_MONGO_URL is unreachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    yield opened
    opened.close()
    client.drop_database(database)
    client.close()


def needs_atomic_updates(backend: str) -> None:
    if backend == "mongomock":
        pytest.skip(NOT_ATOMIC)


def make_key(
    tenant: str = TENANT, scopes: tuple[str, ...] = ("read",), **changes: Any
) -> ApiKey:
    key = ApiKey(
        id=new_id("key_"),
        tenant=tenant,
        scopes=list(scopes),
        key_hash=uuid.uuid4().hex,
        created_at=T0,
    )
    return dataclasses.replace(key, **changes)


def make_function(
    tenant: str = TENANT, name: str = "wordcount", **changes: Any
) -> FunctionVersion:
    function = FunctionVersion(
        tenant=tenant,
        name=name,
        version=0,
        source="def main(text):\n    return len(text.split())\n",
        entrypoint="main",
        timeout_s=30.5,
        memory_mb=256,
        env={"MODE": "test", "EMPTY": ""},
        created_at=T0,
    )
    return dataclasses.replace(function, **changes)


def make_invocation(
    tenant: str = TENANT, function: str = "wordcount", **changes: Any
) -> Invocation:
    fields: dict[str, Any] = {"version": 1, "created_at": T0, **changes}
    return Invocation(id=new_id("inv_"), tenant=tenant, function=function, **fields)


def add_one(store: Store, **changes: Any) -> Invocation:
    (added,) = store.add_invocations([make_invocation(**changes)])
    return added


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(i) for each i in as many threads, released at the same moment."""
    barrier = threading.Barrier(count)

    def released(index: int) -> Any:
        barrier.wait(timeout=10)
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(released, range(count)))


def succeeded(result: Any = None, **changes: Any) -> Outcome:
    return Outcome(status=State.SUCCEEDED, result=result, **changes)


# Keys.


def test_a_key_is_found_by_its_hash(store: Store) -> None:
    key = make_key(scopes=("deploy", "invoke"))
    store.add_key(key)

    assert store.find_key(key.key_hash) == key
    assert store.find_key("no-such-hash") is None


def test_keys_are_listed_oldest_first_for_their_tenant_only(store: Store) -> None:
    newest = make_key(created_at=T2)
    oldest = make_key(created_at=T0)
    middle = make_key(created_at=T1)
    for key in (newest, oldest, middle):
        store.add_key(key)
    store.add_key(make_key(tenant=OTHER))

    assert store.list_keys(TENANT) == [oldest, middle, newest]
    assert [key.tenant for key in store.list_keys(OTHER)] == [OTHER]
    assert store.list_keys("nobody") == []


def test_revoking_a_key_keeps_the_first_revocation_time(store: Store) -> None:
    key = make_key()
    store.add_key(key)

    store.revoke_key(TENANT, key.id, T1)
    store.revoke_key(TENANT, key.id, T2)

    found = store.find_key(key.key_hash)
    assert found is not None and found.revoked_at == T1
    assert store.list_keys(TENANT)[0].revoked_at == T1


def test_another_tenants_key_cannot_be_revoked(store: Store) -> None:
    key = make_key()
    store.add_key(key)

    with pytest.raises(KeyNotFound):
        store.revoke_key(OTHER, key.id, T1)
    with pytest.raises(KeyNotFound):
        store.revoke_key(TENANT, "key_missing", T1)

    found = store.find_key(key.key_hash)
    assert found is not None and found.revoked_at is None


def test_only_an_unrevoked_admin_key_counts_as_one(store: Store) -> None:
    assert store.has_admin_key() is False
    store.add_key(make_key(scopes=("deploy", "invoke", "read")))
    assert store.has_admin_key() is False

    admin = make_key(tenant=OTHER, scopes=("read", "admin"))
    store.add_key(admin)
    assert store.has_admin_key() is True

    store.revoke_key(OTHER, admin.id, T1)
    assert store.has_admin_key() is False


# Functions.


def test_versions_count_up_per_tenant_and_name(store: Store) -> None:
    numbers = [
        store.add_function_version(make_function(version=99)).version for _ in range(3)
    ]
    other_name = store.add_function_version(make_function(name="thumbnail"))
    other_tenant = store.add_function_version(make_function(tenant=OTHER))

    assert numbers == [1, 2, 3]
    assert other_name.version == 1
    assert other_tenant.version == 1


def test_a_function_reads_back_latest_or_by_version(store: Store) -> None:
    first = store.add_function_version(make_function(source="v1", env={"A": "1"}))
    second = store.add_function_version(
        make_function(source="v2", entrypoint="run", timeout_s=2.5, memory_mb=64)
    )

    assert store.get_function(TENANT, "wordcount") == second
    assert store.get_function(TENANT, "wordcount", 1) == first
    assert store.get_function(TENANT, "wordcount", 2) == second
    assert dataclasses.replace(first, version=0) == make_function(
        source="v1", env={"A": "1"}
    )

    with pytest.raises(FunctionNotFound) as missing_version:
        store.get_function(TENANT, "wordcount", 3)
    assert missing_version.value.version == 3
    with pytest.raises(FunctionNotFound):
        store.get_function(TENANT, "missing")


def test_functions_are_listed_by_name_with_their_latest_version(store: Store) -> None:
    for name in ("zeta", "alpha", "zeta", "mid", "zeta", "alpha"):
        store.add_function_version(make_function(name=name, source=f"{name} code"))
    store.add_function_version(make_function(tenant=OTHER, name="beta"))

    summaries = store.list_functions(TENANT)

    assert [(s.latest.name, s.latest.version, s.versions) for s in summaries] == [
        ("alpha", 2, 2),
        ("mid", 1, 1),
        ("zeta", 3, 3),
    ]
    assert summaries[0].latest == store.get_function(TENANT, "alpha")
    assert [s.latest.name for s in store.list_functions(OTHER)] == ["beta"]
    assert store.list_functions("nobody") == []


def test_versions_are_counted(store: Store) -> None:
    for _ in range(3):
        store.add_function_version(make_function())

    assert store.count_versions(TENANT, "wordcount") == 3
    with pytest.raises(FunctionNotFound):
        store.count_versions(TENANT, "missing")


def test_deleting_removes_every_version_and_never_reuses_a_number(
    store: Store,
) -> None:
    for _ in range(3):
        store.add_function_version(make_function())
    store.add_function_version(make_function(name="kept"))

    store.delete_function(TENANT, "wordcount")

    with pytest.raises(FunctionNotFound):
        store.get_function(TENANT, "wordcount")
    with pytest.raises(FunctionNotFound):
        store.get_function(TENANT, "wordcount", 1)
    with pytest.raises(FunctionNotFound):
        store.count_versions(TENANT, "wordcount")
    with pytest.raises(FunctionNotFound):
        store.delete_function(TENANT, "wordcount")
    assert [s.latest.name for s in store.list_functions(TENANT)] == ["kept"]

    assert store.add_function_version(make_function()).version == 4
    assert store.count_versions(TENANT, "wordcount") == 1


def test_another_tenants_function_behaves_as_missing(store: Store) -> None:
    store.add_function_version(make_function())

    with pytest.raises(FunctionNotFound):
        store.get_function(OTHER, "wordcount")
    with pytest.raises(FunctionNotFound):
        store.get_function(OTHER, "wordcount", 1)
    with pytest.raises(FunctionNotFound):
        store.count_versions(OTHER, "wordcount")
    with pytest.raises(FunctionNotFound):
        store.delete_function(OTHER, "wordcount")
    assert store.list_functions(OTHER) == []

    assert store.count_versions(TENANT, "wordcount") == 1


def test_concurrent_uploads_get_distinct_numbers(store: Store, backend: str) -> None:
    needs_atomic_updates(backend)

    added = run_together(
        THREADS, lambda i: store.add_function_version(make_function(source=str(i)))
    )

    assert sorted(function.version for function in added) == list(range(1, THREADS + 1))
    for function in added:
        assert store.get_function(TENANT, "wordcount", function.version) == function


# Invocations: recording and reading.


def test_every_invocation_field_round_trips(store: Store) -> None:
    invocation = Invocation(
        id=new_id("inv_"),
        tenant=TENANT,
        function="thumbnail",
        version=7,
        status=State.QUEUED,
        created_at=T0,
        started_at=T1,
        finished_at=T2,
        duration_ms=12.345678901,
        result={"sizes": [1, 2.5, -3], "name": "é ✓", "ok": True, "none": None},
        error={"type": "ValueError", "message": "bad input", "lines": ["a", "b"]},
        attempts=2,
        attempt_log=[
            Attempt(1, "worker-a", T0, T1, State.FAILED.value),
            Attempt(2, "worker-b", T1),
        ],
        logs="line one\nligne deux ✓\n",
        logs_truncated=True,
        idempotency_key="order-42",
    )

    assert store.add_invocations([invocation]) == [invocation]
    assert store.get_invocation(invocation.id, TENANT) == invocation
    assert store.get_invocation(invocation.id, None) == invocation


def test_an_attempt_records_its_outcome(store: Store) -> None:
    queued = add_one(store)

    started = store.start_attempt(queued.id, "worker-1", T1)
    assert started is not None
    assert started.status is State.RUNNING
    assert started.attempts == 1
    assert started.started_at == T1
    assert started.attempt_log == [Attempt(1, "worker-1", T1)]
    assert store.get_invocation(queued.id, TENANT) == started

    outcome = Outcome(
        status=State.FAILED,
        result=[1, {"two": 2.25}],
        error={"type": "ZeroDivisionError", "message": "division by zero"},
        logs="computing…\n",
        logs_truncated=True,
        duration_ms=41.123456789,
    )
    finished = store.finish_attempt(queued.id, 1, outcome, T2)

    expected = dataclasses.replace(
        started,
        status=State.FAILED,
        result=[1, {"two": 2.25}],
        error={"type": "ZeroDivisionError", "message": "division by zero"},
        logs="computing…\n",
        logs_truncated=True,
        duration_ms=41.123456789,
        finished_at=T2,
        attempt_log=[Attempt(1, "worker-1", T1, T2, State.FAILED.value)],
    )
    assert finished == expected
    assert store.get_invocation(queued.id, None) == expected


def test_a_result_beyond_64_bit_integers_is_kept_exactly(store: Store) -> None:
    queued = add_one(store)
    store.start_attempt(queued.id, "worker-1", T1)
    huge = {"fib": 173402521172797813159685037284371942044301, "neg": -(2**90)}

    store.finish_attempt(queued.id, 1, succeeded(huge), T2)

    assert store.get_invocation(queued.id, TENANT).result == huge
    (listed,) = store.list_invocations(TENANT)
    assert listed.result == huge


def test_a_running_invocation_starts_again_as_a_new_attempt(store: Store) -> None:
    queued = add_one(store)
    store.start_attempt(queued.id, "dead-worker", T0)

    again = store.start_attempt(queued.id, "worker-2", T1)

    assert again is not None
    assert again.status is State.RUNNING
    assert again.attempts == 2
    assert again.started_at == T1
    assert again.attempt_log == [
        Attempt(1, "dead-worker", T0),
        Attempt(2, "worker-2", T1),
    ]


def test_a_stale_attempt_cannot_overwrite_a_newer_one(store: Store) -> None:
    queued = add_one(store)
    store.start_attempt(queued.id, "slow-worker", T0)
    store.start_attempt(queued.id, "worker-2", T1)

    assert store.finish_attempt(queued.id, 1, succeeded("stale"), T1) is None
    current = store.finish_attempt(queued.id, 2, succeeded("fresh"), T2)
    assert store.finish_attempt(queued.id, 1, succeeded("stale"), T2) is None

    assert current is not None
    assert store.get_invocation(queued.id, TENANT) == current
    assert current.result == "fresh"
    assert current.attempt_log == [
        Attempt(1, "slow-worker", T0),
        Attempt(2, "worker-2", T1, T2, State.SUCCEEDED.value),
    ]


def test_a_settled_or_unknown_invocation_does_not_start(store: Store) -> None:
    done = add_one(store)
    store.start_attempt(done.id, "worker-1", T0)
    store.finish_attempt(done.id, 1, succeeded(1), T1)
    cancelled = add_one(store)
    store.cancel_invocation(TENANT, cancelled.id, T1)
    failed = add_one(store)
    store.fail_queued([failed.id], {"type": "not_enqueued"}, T1)

    for invocation in (done, cancelled, failed):
        before = store.get_invocation(invocation.id, TENANT)
        assert store.start_attempt(invocation.id, "worker-2", T2) is None
        assert store.get_invocation(invocation.id, TENANT) == before
    assert store.start_attempt("inv_missing", "worker-2", T2) is None


def test_only_a_running_attempt_can_finish(store: Store) -> None:
    queued = add_one(store)
    assert store.finish_attempt(queued.id, 0, succeeded(), T1) is None
    assert store.finish_attempt(queued.id, 1, succeeded(), T1) is None
    assert store.get_invocation(queued.id, TENANT) == queued

    store.start_attempt(queued.id, "worker-1", T0)
    first = store.finish_attempt(queued.id, 1, succeeded("first"), T1)
    assert store.finish_attempt(queued.id, 1, succeeded("second"), T2) is None
    assert store.get_invocation(queued.id, TENANT) == first
    assert store.finish_attempt("inv_missing", 1, succeeded(), T1) is None


def test_an_attempt_cannot_finish_in_a_live_state(store: Store) -> None:
    queued = add_one(store)
    store.start_attempt(queued.id, "worker-1", T0)

    with pytest.raises(ValueError, match="terminal"):
        store.finish_attempt(queued.id, 1, Outcome(status=State.QUEUED), T1)
    assert store.get_invocation(queued.id, TENANT).status is State.RUNNING


def test_a_bundle_starts_and_finishes_in_one_call_each(store: Store) -> None:
    fresh, also_fresh, done = (add_one(store) for _ in range(3))
    store.start_attempt(done.id, "worker-1", T0)
    store.finish_attempt(done.id, 1, succeeded("earlier"), T0)

    ids = [fresh.id, done.id, "inv_missing", also_fresh.id]
    started = store.start_attempts(ids, "worker-2", T1)
    assert [s is not None for s in started] == [True, False, False, True]
    assert started[0] == store.get_invocation(fresh.id, TENANT)
    assert started[0].status is State.RUNNING and started[0].attempts == 1

    finished = store.finish_attempts(
        [
            AttemptFinish(fresh.id, 1, succeeded("a"), T2),
            AttemptFinish(done.id, 1, succeeded("late"), T2),
            AttemptFinish(also_fresh.id, 2, succeeded("wrong attempt"), T2),
        ]
    )
    assert finished[0] == store.get_invocation(fresh.id, TENANT)
    assert finished[0].result == "a" and finished[0].finished_at == T2
    assert finished[1:] == [None, None]
    assert store.get_invocation(done.id, TENANT).result == "earlier"
    assert store.get_invocation(also_fresh.id, TENANT).status is State.RUNNING
    assert store.start_attempts([], "worker-2", T2) == []
    assert store.finish_attempts([]) == []


def test_a_bundle_with_a_live_outcome_records_nothing(store: Store) -> None:
    first, second = add_one(store), add_one(store)
    store.start_attempts([first.id, second.id], "worker-1", T0)

    with pytest.raises(ValueError, match="terminal"):
        store.finish_attempts(
            [
                AttemptFinish(first.id, 1, succeeded(), T1),
                AttemptFinish(second.id, 1, Outcome(status=State.RUNNING), T1),
            ]
        )
    for invocation in (first, second):
        assert store.get_invocation(invocation.id, TENANT).status is State.RUNNING


def test_a_queued_invocation_can_be_cancelled_once(store: Store) -> None:
    queued = add_one(store)

    cancelled = store.cancel_invocation(TENANT, queued.id, T1)

    assert cancelled == dataclasses.replace(
        queued, status=State.CANCELLED, finished_at=T1
    )
    assert store.get_invocation(queued.id, TENANT) == cancelled
    with pytest.raises(InvalidTransition) as again:
        store.cancel_invocation(TENANT, queued.id, T2)
    assert again.value.state == State.CANCELLED.value


def test_a_running_invocation_cannot_be_cancelled(store: Store) -> None:
    queued = add_one(store)
    running = store.start_attempt(queued.id, "worker-1", T0)

    with pytest.raises(InvalidTransition) as refused:
        store.cancel_invocation(TENANT, queued.id, T1)

    assert refused.value.state == State.RUNNING.value
    assert store.get_invocation(queued.id, TENANT) == running


def test_another_tenants_invocation_cannot_be_cancelled(store: Store) -> None:
    queued = add_one(store)

    with pytest.raises(InvocationNotFound):
        store.cancel_invocation(OTHER, queued.id, T1)
    with pytest.raises(InvocationNotFound):
        store.cancel_invocation(TENANT, "inv_missing", T1)

    assert store.get_invocation(queued.id, TENANT) == queued


def test_fail_queued_fails_only_what_is_still_queued(store: Store) -> None:
    queued = add_one(store)
    running = add_one(store)
    store.start_attempt(running.id, "worker-1", T0)
    done = add_one(store)
    store.start_attempt(done.id, "worker-1", T0)
    store.finish_attempt(done.id, 1, succeeded(3), T1)
    untouched = {i.id: store.get_invocation(i.id, TENANT) for i in (running, done)}
    error = {"type": "not_enqueued", "message": "the broker is down"}

    store.fail_queued([queued.id, running.id, done.id, "inv_missing"], error, T2)
    store.fail_queued([], error, T2)

    assert store.get_invocation(queued.id, TENANT) == dataclasses.replace(
        queued, status=State.FAILED, error=error, finished_at=T2
    )
    for invocation_id, before in untouched.items():
        assert store.get_invocation(invocation_id, TENANT) == before


def test_another_tenants_invocation_behaves_as_missing(store: Store) -> None:
    queued = add_one(store)

    with pytest.raises(InvocationNotFound):
        store.get_invocation(queued.id, OTHER)
    with pytest.raises(InvocationNotFound):
        store.get_invocation("inv_missing", TENANT)
    with pytest.raises(InvocationNotFound):
        store.get_invocation("inv_missing", None)
    assert store.list_invocations(OTHER) == []
    assert store.get_invocation(queued.id, None) == queued


def test_an_idempotency_key_returns_the_earlier_invocation(store: Store) -> None:
    first = add_one(store, idempotency_key="order-1")

    plain, repeated, fresh = store.add_invocations(
        [
            make_invocation(),
            make_invocation(idempotency_key="order-1"),
            make_invocation(idempotency_key="order-2"),
        ]
    )

    assert repeated == first
    assert fresh.idempotency_key == "order-2"
    assert store.get_invocation(fresh.id, TENANT) == fresh
    assert store.get_invocation(plain.id, TENANT) == plain
    assert {i.id for i in store.list_invocations(TENANT)} == {
        first.id,
        plain.id,
        fresh.id,
    }


def test_an_idempotency_key_repeated_in_one_batch_keeps_the_first(
    store: Store,
) -> None:
    one, two = store.add_invocations(
        [make_invocation(idempotency_key="k"), make_invocation(idempotency_key="k")]
    )

    assert two == one
    assert [i.id for i in store.list_invocations(TENANT)] == [one.id]


def test_an_idempotency_key_belongs_to_one_tenant(store: Store) -> None:
    mine = add_one(store, idempotency_key="shared")
    theirs = add_one(store, tenant=OTHER, idempotency_key="shared")

    assert theirs.id != mine.id
    assert store.get_invocation(theirs.id, OTHER) == theirs
    assert store.get_invocation(mine.id, TENANT) == mine


def test_adding_nothing_keeps_nothing(store: Store) -> None:
    assert store.add_invocations([]) == []
    assert store.list_invocations(TENANT) == []


def test_invocations_are_listed_newest_first(store: Store) -> None:
    created = []
    for _ in range(4):
        created.append(add_one(store).id)
        # new_id orders by millisecond; within one the order is random.
        time.sleep(0.002)

    assert [i.id for i in store.list_invocations(TENANT)] == created[::-1]


def test_invocations_are_filtered_by_function_and_state(store: Store) -> None:
    counts = {"wordcount": 3, "thumbnail": 2}
    added = {
        name: [add_one(store, function=name) for _ in range(n)]
        for name, n in counts.items()
    }
    finished = added["wordcount"][0]
    store.start_attempt(finished.id, "worker-1", T0)
    store.finish_attempt(finished.id, 1, succeeded(), T1)
    add_one(store, tenant=OTHER, function="wordcount")

    def ids(**filters: Any) -> set[str]:
        return {i.id for i in store.list_invocations(TENANT, **filters)}

    wordcount = {i.id for i in added["wordcount"]}
    thumbnail = {i.id for i in added["thumbnail"]}
    assert ids() == wordcount | thumbnail
    assert ids(function="wordcount") == wordcount
    assert ids(function="thumbnail") == thumbnail
    assert ids(status=State.SUCCEEDED) == {finished.id}
    assert ids(status=State.QUEUED) == (wordcount | thumbnail) - {finished.id}
    assert ids(function="thumbnail", status=State.SUCCEEDED) == set()
    assert ids(function="wordcount", status=State.QUEUED) == wordcount - {finished.id}
    assert ids(function="missing") == set()
    assert len(store.list_invocations(TENANT, limit=2)) == 2


def test_pages_cover_every_invocation_once(store: Store) -> None:
    store.add_invocations([make_invocation() for _ in range(23)])
    store.add_invocations([make_invocation(function="other") for _ in range(4)])
    store.add_invocations([make_invocation(tenant=OTHER) for _ in range(5)])
    expected = sorted(
        (i.id for i in store.list_invocations(TENANT, function="wordcount", limit=100)),
        reverse=True,
    )

    pages: list[list[str]] = []
    before = None
    while True:
        page = store.list_invocations(
            TENANT, function="wordcount", limit=5, before=before
        )
        if not page:
            break
        pages.append([i.id for i in page])
        before = page[-1].id

    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    assert [i for page in pages for i in page] == expected
    assert len(expected) == 23


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(store: Store, limit: int) -> None:
    add_one(store)

    with pytest.raises(ValueError, match="limit"):
        store.list_invocations(TENANT, limit=limit)


# Invocations: races.


def test_exactly_one_finish_of_an_attempt_wins(store: Store, backend: str) -> None:
    needs_atomic_updates(backend)
    for _ in range(5):
        queued = add_one(store)
        store.start_attempt(queued.id, "worker-1", T0)

        def finish(i: int, queued: Invocation = queued) -> Invocation | None:
            return store.finish_attempt(queued.id, 1, succeeded(i), T1 + i)

        results = run_together(THREADS, finish)

        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert store.get_invocation(queued.id, TENANT) == winners[0]
        assert winners[0].finished_at == T1 + winners[0].result


def test_a_finish_and_a_restart_do_not_both_win(store: Store, backend: str) -> None:
    needs_atomic_updates(backend)
    for _ in range(10):
        queued = add_one(store)
        store.start_attempt(queued.id, "worker-1", T0)

        def finish_or_restart(i: int, queued: Invocation = queued) -> Invocation | None:
            if i == 0:
                return store.finish_attempt(queued.id, 1, succeeded("done"), T1)
            return store.start_attempt(queued.id, "worker-2", T2)

        finished, restarted = run_together(2, finish_or_restart)

        final = store.get_invocation(queued.id, TENANT)
        assert (finished is None) != (restarted is None)
        if finished is not None:
            assert final == finished and final.attempts == 1
        else:
            assert final == restarted and final.attempts == 2
            assert final.status is State.RUNNING


def test_concurrent_starts_each_count_an_attempt(store: Store, backend: str) -> None:
    needs_atomic_updates(backend)
    queued = add_one(store)

    started = run_together(
        THREADS, lambda i: store.start_attempt(queued.id, f"worker-{i}", T0 + i)
    )

    assert sorted(s.attempts for s in started) == list(range(1, THREADS + 1))
    final = store.get_invocation(queued.id, TENANT)
    assert final.attempts == THREADS
    assert [a.number for a in final.attempt_log] == list(range(1, THREADS + 1))
    assert sorted(a.worker for a in final.attempt_log) == sorted(
        f"worker-{i}" for i in range(THREADS)
    )


def test_the_store_answers_a_ping(store: Store) -> None:
    store.ping()


# SQLite only: files, processes and locks.


def test_sqlite_keeps_everything_across_reopening(tmp_path: Any) -> None:
    path = str(tmp_path / "store.sqlite3")
    store = SQLiteStore(path)
    key = make_key(scopes=("admin",))
    store.add_key(key)
    for _ in range(2):
        store.add_function_version(make_function())
    store.delete_function(TENANT, "wordcount")
    queued = add_one(store, idempotency_key="once")
    store.start_attempt(queued.id, "worker-1", T0)
    done = store.finish_attempt(queued.id, 1, succeeded({"n": 1}), T1)
    store.close()

    reopened = SQLiteStore(path)
    try:
        assert reopened.find_key(key.key_hash) == key
        assert reopened.has_admin_key() is True
        assert reopened.get_invocation(queued.id, TENANT) == done
        assert reopened.add_invocations([make_invocation(idempotency_key="once")]) == [
            done
        ]
        assert reopened.add_function_version(make_function()).version == 3
    finally:
        reopened.close()


def _produce(path: str, count: int, batch: int, ready: Any) -> None:
    store = SQLiteStore(path)
    ready.wait(30)
    for _ in range(0, count, batch):
        store.add_invocations(
            [make_invocation(created_at=time.time()) for _ in range(batch)]
        )
        # Paced, so that the consumer works while batches still arrive.
        time.sleep(0.005)
    store.close()


def _consume(path: str, count: int, ready: Any) -> None:
    store = SQLiteStore(path)
    ready.wait(30)
    deadline = time.monotonic() + 20
    done = 0
    while done < count and time.monotonic() < deadline:
        queued = store.list_invocations(TENANT, status=State.QUEUED, limit=100)
        for invocation in queued:
            started = store.start_attempt(invocation.id, "consumer", time.time())
            if started is None or started.attempts != 1:
                raise SystemExit(f"{invocation.id} did not start once: {started}")
            outcome = succeeded(invocation.id)
            if store.finish_attempt(invocation.id, 1, outcome, time.time()) is None:
                raise SystemExit(f"{invocation.id} did not finish")
            done += 1
        if not queued:
            time.sleep(0.001)
    store.close()
    if done != count:
        raise SystemExit(f"finished {done} of {count} invocations in time")


def test_sqlite_serves_two_processes_at_once(tmp_path: Any) -> None:
    path = str(tmp_path / "shared.sqlite3")
    count = 600
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(2)
    producer = spawn.Process(target=_produce, args=(path, count, 20, ready))
    consumer = spawn.Process(target=_consume, args=(path, count, ready))
    producer.start()
    consumer.start()
    producer.join(90)
    consumer.join(90)

    assert producer.exitcode == 0
    assert consumer.exitcode == 0
    store = SQLiteStore(path)
    try:
        everything = store.list_invocations(TENANT, limit=count + 1)
    finally:
        store.close()
    assert len(everything) == count
    for invocation in everything:
        assert invocation.status is State.SUCCEEDED
        assert invocation.attempts == 1
        assert invocation.result == invocation.id
    # The first finish came before the last batch: the two truly overlapped.
    first_finish = min(i.finished_at or 0.0 for i in everything)
    assert first_finish < max(i.created_at for i in everything)


def _use_inherited_store(store: SQLiteStore, parent_connection_id: int) -> None:
    if id(store._connection()) == parent_connection_id:
        raise SystemExit("the forked child reused its parent's connection")
    add_one(store, function="from-child")
    store.close()


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(),
    reason="this platform cannot fork",
)
def test_sqlite_a_forked_child_opens_its_own_connections(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "store.sqlite3"))
    try:
        add_one(store, function="from-parent")
        child = multiprocessing.get_context("fork").Process(
            target=_use_inherited_store, args=(store, id(store._connection()))
        )
        child.start()
        child.join(30)

        assert child.exitcode == 0
        add_one(store, function="after-fork")
        functions = {i.function for i in store.list_invocations(TENANT)}
        assert functions == {"from-parent", "from-child", "after-fork"}
    finally:
        store.close()


def test_sqlite_threads_each_see_the_others_writes(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "store.sqlite3"))
    try:
        added = run_together(THREADS, lambda i: add_one(store, function=f"f{i}"))
        seen = run_together(
            THREADS, lambda i: {x.id for x in store.list_invocations(TENANT)}
        )
    finally:
        store.close()

    assert all(ids == {a.id for a in added} for ids in seen)


def test_sqlite_opens_a_file_another_process_is_still_creating(
    tmp_path: Any,
) -> None:
    # A brand-new file is in rollback mode, where a writer blocks the switch
    # to WAL, and that switch fails at once instead of waiting.
    path = str(tmp_path / "store.sqlite3")
    creator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    creator.execute("CREATE TABLE elsewhere (x)")
    creator.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.2, creator.execute, ("ROLLBACK",))
    release.start()
    try:
        store = SQLiteStore(path)
    finally:
        release.join()
    try:
        add_one(store)
    finally:
        store.close()
        creator.close()
    checker = sqlite3.connect(path)
    try:
        assert checker.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        checker.close()


def test_sqlite_lock_held_past_the_timeout_is_store_unavailable(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_S", 0.05)
    path = str(tmp_path / "store.sqlite3")
    store = SQLiteStore(path)
    queued = add_one(store)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.add_invocations([make_invocation()])
        with pytest.raises(StoreUnavailable):
            store.start_attempt(queued.id, "worker-1", T0)
        # In WAL mode a writer does not stop readers.
        assert store.get_invocation(queued.id, TENANT) == queued
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()


def test_sqlite_file_that_is_no_database_is_store_unavailable(tmp_path: Any) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not an SQLite database\n" * 200)

    with pytest.raises(StoreUnavailable, match="not a database"):
        SQLiteStore(str(path))


def test_sqlite_refuses_an_in_memory_database() -> None:
    with pytest.raises(ConfigurationError, match="needs a file"):
        SQLiteStore(":memory:")


def test_sqlite_refuses_use_after_close(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "store.sqlite3"))
    store.close()

    with pytest.raises(StoreUnavailable, match="closed"):
        store.ping()
    with pytest.raises(StoreUnavailable, match="closed"):
        run_together(1, lambda i: store.list_invocations(TENANT))


# MongoDB only: construction.


def test_mongo_takes_the_database_from_the_url() -> None:
    client: Any = mongomock.MongoClient()
    MongoStore("mongodb://db.invalid:27017/tenantdata?w=majority", client=client)
    MongoStore("mongodb://db.invalid:27017", client=client)
    MongoStore("mongodb://db.invalid/ignored", "chosen", client=client)

    assert set(client.list_database_names()) == {"tenantdata", "conveyor", "chosen"}


def test_mongo_creates_an_index_for_every_query() -> None:
    client: Any = mongomock.MongoClient()
    MongoStore("mongodb://db.invalid/conveyor", client=client)
    db = client["conveyor"]

    def keys(collection: str) -> dict[str, list[tuple[str, int]]]:
        info = db[collection].index_information()
        return {name: [tuple(k) for k in spec["key"]] for name, spec in info.items()}

    assert keys("keys")["by_hash"] == [("key_hash", 1)]
    assert keys("functions")["by_version"] == [
        ("tenant", 1),
        ("name", 1),
        ("version", 1),
    ]
    invocations = keys("invocations")
    assert invocations["by_tenant"] == [("tenant", 1), ("_id", -1)]
    assert invocations["by_function"] == [("tenant", 1), ("function", 1), ("_id", -1)]
    assert invocations["by_status"] == [("tenant", 1), ("status", 1), ("_id", -1)]
    idempotency = db["invocations"].index_information()["by_idempotency_key"]
    assert idempotency["unique"] is True
    assert idempotency["partialFilterExpression"] == {
        "idempotency_key": {"$exists": True}
    }


def test_mongo_unreachable_is_store_unavailable_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mongo_module, "SERVER_SELECTION_TIMEOUT_MS", 200)
    monkeypatch.setattr(mongo_module, "CONNECT_TIMEOUT_MS", 200)

    with pytest.raises(StoreUnavailable) as unavailable:
        MongoStore("mongodb://conveyor:s3cret-pw@127.0.0.1:9/conveyor")

    assert "127.0.0.1:9" in str(unavailable.value)
    assert "s3cret-pw" not in str(unavailable.value)


def test_mongo_refuses_a_malformed_url() -> None:
    with pytest.raises(ConfigurationError, match="mongodb://"):
        MongoStore("mongodb://host:notaport/conveyor")
