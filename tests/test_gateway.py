"""The gateway's HTTP API through Flask's test client, on the local twins.

The "runtime" is simulated: a test consumes the SQLite broker, or moves a
record through ``start_attempt``/``finish_attempt`` and puts it in the cache.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from conveyor_core.broker import Broker, DeliveryHandler, Publication
from conveyor_core.brokers.sqlite import SQLiteBroker
from conveyor_core.caches.memory import MemoryCache
from conveyor_core.errors import BrokerUnavailable, CacheUnavailable, StoreUnavailable
from conveyor_core.messages import InvocationMessage, decode_bundle
from conveyor_core.records import (
    ApiKey,
    Invocation,
    Outcome,
    State,
    hash_api_key,
    new_api_key,
    new_id,
)
from conveyor_core.settings import Settings
from conveyor_core.stores.sqlite import SQLiteStore
from gateway import create_app
from gateway.context import Backends

ADD_SOURCE = "def add(a, b=0):\n    return a + b\n"


# Fixtures and helpers.


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path), max_wait_s=5.0, max_body_bytes=256 * 1024)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "store.sqlite3"))
    yield store
    store.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SQLiteBroker]:
    broker = SQLiteBroker(str(tmp_path / "broker.sqlite3"), delivery_limit=3)
    yield broker
    broker.close()


@pytest.fixture
def cache() -> Iterator[MemoryCache]:
    cache = MemoryCache()
    yield cache
    cache.close()


@pytest.fixture
def app(
    settings: Settings, store: SQLiteStore, broker: Broker, cache: MemoryCache
) -> Flask:
    return create_app(settings, store=store, broker=broker, cache=cache)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def add_key(store: SQLiteStore, tenant: str, *scopes: str) -> dict[str, str]:
    """Keep a key directly in the store; returns the headers that carry it."""
    secret = new_api_key()
    store.add_key(
        ApiKey(
            id=new_id("key_"),
            tenant=tenant,
            scopes=list(scopes),
            key_hash=hash_api_key(secret),
            created_at=time.time(),
        )
    )
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def admin(store: SQLiteStore) -> dict[str, str]:
    return add_key(store, "acme", "admin")


@pytest.fixture
def rival(store: SQLiteStore) -> dict[str, str]:
    """An admin of another tenant."""
    return add_key(store, "rival", "admin")


@pytest.fixture
def deployed(client: FlaskClient, admin: dict[str, str]) -> str:
    answer = client.post(
        "/v1/functions", json={"name": "add", "source": ADD_SOURCE}, headers=admin
    )
    assert answer.status_code == 201, answer.json
    return "add"


def invoke(
    client: FlaskClient,
    headers: dict[str, str],
    name: str = "add",
    body: Any = None,
    **extra: Any,
) -> Any:
    return client.post(
        f"/v1/functions/{name}/invocations",
        json={"args": [1, 2]} if body is None else body,
        headers=headers,
        **extra,
    )


def error_code(answer: Any) -> str:
    body = answer.json
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message"}
    assert body["request_id"] == answer.headers["X-Request-Id"]
    return str(body["error"]["code"])


def finish(
    store: SQLiteStore,
    cache: MemoryCache | None,
    invocation_id: str,
    result: Any = 3,
    logs: str = "",
) -> Invocation:
    """Do what a worker does when an invocation succeeds."""
    running = store.start_attempt(invocation_id, "test-worker:1", time.time())
    assert running is not None
    done = store.finish_attempt(
        invocation_id,
        running.attempts,
        Outcome(State.SUCCEEDED, result=result, logs=logs, duration_ms=1.5),
        time.time(),
    )
    assert done is not None
    if cache is not None:
        cache.put(invocation_id, done.to_doc(), 60)
    return done


def drain(broker: Broker, count: int, timeout_s: float = 10.0) -> list[bytes]:
    """Consume ``count`` messages from the broker, acking each."""
    bodies: list[bytes] = []
    stop = threading.Event()

    def on_message(delivery: Any) -> None:
        bodies.append(delivery.body)
        delivery.ack()
        if len(bodies) >= count:
            stop.set()

    consumer = threading.Thread(
        target=broker.consume, args=(on_message, on_message, 64, stop), daemon=True
    )
    consumer.start()
    stop.wait(timeout_s)
    stop.set()
    consumer.join(timeout_s)
    return bodies


class FakeRuntime:
    """Consumes the broker and finishes each invocation with the sum of its args."""

    def __init__(
        self, broker: Broker, store: SQLiteStore, cache: MemoryCache, delay_s: float
    ) -> None:
        self.broker = broker
        self.store = store
        self.cache = cache
        self.delay_s = delay_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeRuntime:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        self.broker.consume(self._on_message, self._on_message, 16, self.stop)

    def _on_message(self, delivery: Any) -> None:
        for message in decode_bundle(delivery.body):
            payload = orjson.loads(message.payload)
            time.sleep(self.delay_s)
            finish(self.store, self.cache, message.id, result=sum(payload["args"]))
        delivery.ack()


class DownBroker(Broker):
    """A broker that cannot confirm anything."""

    def publish(self, bodies: Any) -> None:
        raise BrokerUnavailable("connection refused by the test")

    def consume(
        self,
        on_message: DeliveryHandler,
        on_dead_letter: DeliveryHandler,
        prefetch: int,
        stop: threading.Event,
    ) -> None:
        raise BrokerUnavailable("connection refused by the test")

    def ping(self) -> None:
        raise BrokerUnavailable("connection refused by the test")

    def close(self) -> None:
        return None


class SharedMemoryCache(MemoryCache):
    """A MemoryCache that claims its notifications reach every process.

    With it the gateway re-reads the store only about once a second, so a
    prompt answer proves the notification woke the waiter.
    """

    shared = True


# Health, the API document, request ids and logging.


def test_healthz_needs_no_key(client: FlaskClient) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json == {"status": "ok"}


def test_readyz_reports_each_backend(client: FlaskClient) -> None:
    answer = client.get("/readyz")
    assert answer.status_code == 200
    assert answer.json == {
        "status": "ok",
        "backends": {"store": "ok", "broker": "ok", "cache": "ok"},
    }


def test_readyz_is_503_when_a_backend_is_down(
    client: FlaskClient, cache: MemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> None:
        raise CacheUnavailable("redis is gone")

    monkeypatch.setattr(cache, "ping", down)
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"]
    assert answer.json == {
        "status": "unavailable",
        "backends": {"store": "ok", "broker": "ok", "cache": "unavailable"},
    }


def test_openapi_documents_every_endpoint(app: Flask, client: FlaskClient) -> None:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    document = answer.json
    assert document["openapi"] == "3.1.0"

    documented = {
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    served = {
        (rule.rule.replace("<", "{").replace(">", "}"), method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert served == documented

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(document):
        _, section, kind, name = ref.split("/")
        assert name in document[section][kind], ref


def test_request_id_is_kept_when_sane_and_made_otherwise(client: FlaskClient) -> None:
    answer = client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert answer.headers["X-Request-Id"] == "abc-123"

    answer = client.get("/healthz", headers={"X-Request-Id": "bad id\u00e9" * 50})
    made = answer.headers["X-Request-Id"]
    assert made and "bad" not in made

    answer = client.get("/nowhere", headers={"X-Request-Id": "trace-7"})
    assert answer.json["request_id"] == "trace-7"


def test_one_access_log_line_per_request(
    client: FlaskClient, admin: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    client.get("/v1/functions", headers={**admin, "X-Request-Id": "req-1"})

    lines = [record for record in caplog.records if record.name == "gateway.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line.levelno == logging.INFO
    assert line.request_id == "req-1"  # type: ignore[attr-defined]
    assert line.tenant == "acme"  # type: ignore[attr-defined]
    assert line.method == "GET"  # type: ignore[attr-defined]
    assert line.path == "/v1/functions"  # type: ignore[attr-defined]
    assert line.status == 200  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]


def test_queued_invocations_are_logged_one_line_each(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    invocation_id = invoke(client, admin).json["id"]

    queued = [r for r in caplog.records if getattr(r, "invocation_id", None)]
    assert len(queued) == 1
    assert queued[0].levelno == logging.INFO
    assert queued[0].getMessage().endswith("queued")
    assert queued[0].invocation_id == invocation_id  # type: ignore[attr-defined]
    assert queued[0].function == "add"  # type: ignore[attr-defined]
    assert queued[0].version == 1  # type: ignore[attr-defined]
    assert queued[0].tenant == "acme"  # type: ignore[attr-defined]


# Authentication and scopes.


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer  ", "Bearer a b", "cvk_x"],
)
def test_missing_or_malformed_key_is_401(
    client: FlaskClient, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    answer = client.get("/v1/functions", headers=headers)
    assert answer.status_code == 401
    assert error_code(answer) == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_unknown_key_is_401(client: FlaskClient) -> None:
    answer = client.get("/v1/functions", headers={"Authorization": "Bearer cvk_nope"})
    assert answer.status_code == 401
    assert error_code(answer) == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_key_is_refused_at_once(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    created = client.post("/v1/keys", json={"scopes": ["read"]}, headers=admin).json
    reader = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/v1/functions", headers=reader).status_code == 200

    answer = client.delete(f"/v1/keys/{created['id']}", headers=admin)
    assert answer.status_code == 204
    answer = client.get("/v1/functions", headers=reader)
    assert answer.status_code == 401
    assert error_code(answer) == "unauthorized"


@pytest.mark.parametrize(
    ("scope", "method", "path", "body", "missing"),
    [
        ("read", "POST", "/v1/functions", {"name": "f"}, "deploy"),
        ("read", "DELETE", "/v1/functions/add", None, "deploy"),
        ("read", "POST", "/v1/functions/add/invocations", {}, "invoke"),
        ("read", "POST", "/v1/invocations/inv_x/cancel", None, "invoke"),
        ("invoke", "GET", "/v1/functions", None, "read"),
        ("invoke", "GET", "/v1/invocations", None, "read"),
        ("deploy", "POST", "/v1/functions/add/invocations/batch", {}, "invoke"),
        ("deploy", "GET", "/v1/keys", None, "admin"),
        ("read", "POST", "/v1/keys", {"scopes": ["admin"]}, "admin"),
        ("invoke", "DELETE", "/v1/keys/key_x", None, "admin"),
    ],
)
def test_missing_scope_is_403_naming_it(
    client: FlaskClient,
    store: SQLiteStore,
    scope: str,
    method: str,
    path: str,
    body: Any,
    missing: str,
) -> None:
    headers = add_key(store, "acme", scope)
    answer = client.open(path, method=method, json=body, headers=headers)
    assert answer.status_code == 403
    assert error_code(answer) == "forbidden"
    assert repr(missing) in answer.json["error"]["message"]


def test_scopes_allow_what_they_name(
    client: FlaskClient, store: SQLiteStore, deployed: str
) -> None:
    deployer = add_key(store, "acme", "deploy")
    invoker = add_key(store, "acme", "invoke")
    reader = add_key(store, "acme", "read")

    upload = {"name": "other", "source": "def other():\n    return 1\n"}
    assert (
        client.post("/v1/functions", json=upload, headers=deployer).status_code == 201
    )
    invocation_id = invoke(client, invoker).json["id"]
    answer = client.get(f"/v1/invocations/{invocation_id}", headers=reader)
    assert answer.status_code == 200
    answer = client.post(f"/v1/invocations/{invocation_id}/cancel", headers=invoker)
    assert answer.status_code == 200


# Keys.


def test_create_list_and_revoke_keys(
    client: FlaskClient, admin: dict[str, str], store: SQLiteStore
) -> None:
    answer = client.post(
        "/v1/keys", json={"tenant": "beta", "scopes": ["invoke", "read"]}, headers=admin
    )
    assert answer.status_code == 201
    created = answer.json
    assert set(created) == {"id", "key", "tenant", "scopes"}
    assert created["tenant"] == "beta"
    assert created["scopes"] == ["invoke", "read"]

    # Only the hash is kept.
    kept = store.find_key(hash_api_key(created["key"]))
    assert kept is not None and kept.id == created["id"]
    assert created["key"] not in str(store.list_keys("beta"))

    listed = client.get("/v1/keys?tenant=beta", headers=admin).json
    assert listed == {"keys": [key.to_api() for key in store.list_keys("beta")]}
    assert [key["id"] for key in listed["keys"]] == [created["id"]]
    assert "key" not in listed["keys"][0]

    own = client.get("/v1/keys", headers=admin).json["keys"]
    assert {key["tenant"] for key in own} == {"acme"}

    answer = client.delete(f"/v1/keys/{created['id']}?tenant=beta", headers=admin)
    assert answer.status_code == 204
    listed = client.get("/v1/keys?tenant=beta", headers=admin).json
    assert listed["keys"][0]["revoked"] is True


def test_new_key_defaults_to_the_callers_tenant(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    created = client.post("/v1/keys", json={"scopes": ["read"]}, headers=admin).json
    assert created["tenant"] == "acme"


def test_revoking_an_unknown_key_is_404(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    answer = client.delete("/v1/keys/key_nothing", headers=admin)
    assert answer.status_code == 404
    assert error_code(answer) == "not_found"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"tenant": "Bad Tenant", "scopes": ["read"]}, "'tenant'"),
        ({"tenant": "", "scopes": ["read"]}, "'tenant'"),
        ({"tenant": 5, "scopes": ["read"]}, "'tenant'"),
        ({"scopes": []}, "'scopes'"),
        ({"scopes": ["read", "root"]}, "'scopes'"),
        ({"scopes": "read"}, "'scopes'"),
        ({}, "'scopes'"),
        ({"scopes": ["read"], "id": "key_mine"}, "cannot be set"),
        ({"scopes": ["read"], "colour": "red"}, "unknown field"),
    ],
)
def test_bad_key_requests_are_400(
    client: FlaskClient, admin: dict[str, str], body: Any, fragment: str
) -> None:
    answer = client.post("/v1/keys", json=body, headers=admin)
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"
    assert fragment in answer.json["error"]["message"]


def test_bad_tenant_parameter_is_400(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    answer = client.get("/v1/keys?tenant=NO!", headers=admin)
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"


# Functions.


def test_register_describe_list_and_delete_a_function(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    upload = {
        "name": "add",
        "source": ADD_SOURCE,
        "timeout_s": 2.5,
        "memory_mb": 128,
        "env": {"GREETING": "hi"},
    }
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 201
    assert answer.json == {"name": "add", "version": 1}
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.json == {"name": "add", "version": 2}

    described = client.get("/v1/functions/add", headers=admin).json
    assert described["name"] == "add"
    assert described["version"] == 2
    assert described["versions"] == 2
    assert described["entrypoint"] == "add"
    assert described["timeout_s"] == 2.5
    assert described["memory_mb"] == 128
    assert described["env"] == ["GREETING"]
    assert described["created_at"].endswith("Z")

    first = client.get("/v1/functions/add?version=1", headers=admin).json
    assert first["version"] == 1 and first["versions"] == 2

    listed = client.get("/v1/functions", headers=admin).json
    assert [(f["name"], f["version"]) for f in listed["functions"]] == [("add", 2)]

    assert client.delete("/v1/functions/add", headers=admin).status_code == 204
    answer = client.get("/v1/functions/add", headers=admin)
    assert answer.status_code == 404
    assert error_code(answer) == "not_found"
    assert client.get("/v1/functions", headers=admin).json == {"functions": []}


def test_function_defaults_come_from_the_settings(
    client: FlaskClient, admin: dict[str, str], settings: Settings
) -> None:
    upload = {"name": "add", "source": ADD_SOURCE}
    client.post("/v1/functions", json=upload, headers=admin)
    described = client.get("/v1/functions/add", headers=admin).json
    assert described["timeout_s"] == settings.default_timeout_s
    assert described["memory_mb"] == settings.default_memory_mb
    assert described["env"] == []


@pytest.mark.parametrize(
    "source",
    [
        "def handler(x):\n    return x\n",
        "async def handler(x):\n    return x\n",
        "class handler:\n    pass\n",
        "handler = lambda x: x\n",
        "handler: object = print\n",
        "first, handler = 1, len\n",
        "from operator import neg as handler\n",
    ],
)
def test_entrypoint_may_be_any_top_level_binding(
    client: FlaskClient, admin: dict[str, str], source: str
) -> None:
    upload = {"name": "fn", "entrypoint": "handler", "source": source}
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 201, answer.json


def test_source_is_compiled_but_never_run(
    client: FlaskClient, admin: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    source = (
        f"open({str(marker)!r}, 'w').close()\n"
        "raise SystemExit(3)\n"
        "def fn():\n    pass\n"
    )
    answer = client.post(
        "/v1/functions", json={"name": "fn", "source": source}, headers=admin
    )
    assert answer.status_code == 201
    assert not marker.exists()


def test_syntax_error_names_the_line(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    source = "def fn(x):\n    return x\n\ndef broken(:\n    pass\n"
    answer = client.post(
        "/v1/functions", json={"name": "fn", "source": source}, headers=admin
    )
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"
    assert "line 4" in answer.json["error"]["message"]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"name": "9lives"}, "'name'"),
        ({"name": "a" * 64}, "'name'"),
        ({"name": 7}, "'name'"),
        ({"source": ""}, "'source'"),
        ({"source": ["def add(): pass"]}, "'source'"),
        ({"source": "def other():\n    pass\n"}, "no top-level 'add'"),
        ({"source": "def wrapper():\n    def add():\n        pass\n"}, "no top-level"),
        ({"source": "x = 1\0\n"}, "does not compile"),
        ({"source": "def add():\n    yield from\n"}, "line 2"),
        ({"source": "return 5\ndef add():\n    pass\n"}, "does not compile"),
        ({"entrypoint": "not valid"}, "'entrypoint'"),
        ({"entrypoint": "class"}, "'entrypoint'"),
        ({"timeout_s": 0}, "'timeout_s'"),
        ({"timeout_s": -1}, "'timeout_s'"),
        ({"timeout_s": 100000}, "'timeout_s'"),
        ({"timeout_s": "10"}, "'timeout_s'"),
        ({"timeout_s": True}, "'timeout_s'"),
        ({"memory_mb": 16}, "'memory_mb'"),
        ({"memory_mb": 10**6}, "'memory_mb'"),
        ({"memory_mb": 128.5}, "'memory_mb'"),
        ({"memory_mb": False}, "'memory_mb'"),
        ({"env": ["A=1"]}, "'env'"),
        ({"env": {"A": 1}}, "env 'A'"),
        ({"env": {"1A": "x"}}, "env name"),
        ({"env": {"A-B": "x"}}, "env name"),
        ({"env": {"CONVEYOR_TOKEN": "x"}}, "reserved"),
        ({"env": {"conveyor_token": "x"}}, "reserved"),
        ({"env": {f"V{i}": "x" for i in range(65)}}, "at most 64"),
        ({"env": {"BIG": "x" * 40_000}}, "bytes"),
        ({"tenant": "rival"}, "cannot be set"),
        ({"version": 9}, "cannot be set"),
        ({"requirements": ["numpy"]}, "unknown field"),
    ],
)
def test_bad_function_uploads_are_400(
    client: FlaskClient, admin: dict[str, str], changes: dict[str, Any], fragment: str
) -> None:
    upload = {"name": "add", "source": ADD_SOURCE, **changes}
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 400, answer.json
    assert error_code(answer) == "bad_request"
    assert fragment in answer.json["error"]["message"]


def test_a_pickled_function_is_kept_without_being_unpickled(
    client: FlaskClient, admin: dict[str, str], store: SQLiteStore
) -> None:
    # Unpickling this would run os.system; the gateway only checks base64.
    bomb = base64.b64encode(b"cos\nsystem\n(S'touch /tmp/conveyor-pwned'\ntR.")
    upload = {"name": "by-value", "pickle": bomb.decode(), "memory_mb": 128}
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 201, answer.json

    described = client.get("/v1/functions/by-value", headers=admin).json
    assert described["kind"] == "pickle"
    assert described["entrypoint"] == "by-value"
    kept = store.get_function("acme", "by-value")
    assert (kept.kind, kept.source) == ("pickle", bomb.decode())
    assert not Path("/tmp/conveyor-pwned").exists()


@pytest.mark.parametrize(
    ("upload", "fragment"),
    [
        ({"pickle": "", "name": "f"}, "'pickle'"),
        ({"pickle": 5, "name": "f"}, "'pickle'"),
        ({"pickle": "not base64!", "name": "f"}, "not valid base64"),
        ({"pickle": "gAN9cQAu", "source": ADD_SOURCE, "name": "f"}, "not both"),
        ({"pickle": "gAN9cQAu", "name": "f", "entrypoint": 3}, "'entrypoint'"),
    ],
)
def test_bad_pickled_uploads_are_400(
    client: FlaskClient, admin: dict[str, str], upload: dict[str, Any], fragment: str
) -> None:
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 400, answer.json
    assert fragment in answer.json["error"]["message"]


def test_name_that_is_no_identifier_needs_an_entrypoint(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    upload = {"name": "word-count", "source": "def main():\n    pass\n"}
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 400
    assert "'entrypoint'" in answer.json["error"]["message"]

    upload["entrypoint"] = "main"
    answer = client.post("/v1/functions", json=upload, headers=admin)
    assert answer.status_code == 201


@pytest.mark.parametrize(
    "query", ["version=abc", "version=0", "version=-1", "version=²"]
)
def test_bad_version_parameter_is_400(
    client: FlaskClient, admin: dict[str, str], deployed: str, query: str
) -> None:
    answer = client.get(f"/v1/functions/add?{query}", headers=admin)
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"


def test_unknown_version_is_404(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    answer = client.get("/v1/functions/add?version=9", headers=admin)
    assert answer.status_code == 404
    assert error_code(answer) == "not_found"


# Invoking.


def test_invoke_answers_202_and_publishes_the_message(
    client: FlaskClient, admin: dict[str, str], deployed: str, broker: Broker
) -> None:
    answer = invoke(client, admin, body={"args": [1, 2], "kwargs": {"b": 5}})
    assert answer.status_code == 202
    assert set(answer.json) == {"id", "status"}
    assert answer.json["status"] == "queued"
    invocation_id = answer.json["id"]
    assert invocation_id.startswith("inv_")

    [body] = drain(broker, 1)
    message = InvocationMessage.decode(body)
    assert message == InvocationMessage(
        id=invocation_id,
        tenant="acme",
        function="add",
        version=1,
        payload=message.payload,
    )
    assert orjson.loads(message.payload) == {"args": [1, 2], "kwargs": {"b": 5}}


@pytest.mark.parametrize("body", [None, {}, {"args": None}])
def test_args_and_kwargs_are_optional(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    broker: Broker,
    body: Any,
) -> None:
    if body is None:
        answer = client.post("/v1/functions/add/invocations", headers=admin)
    else:
        answer = invoke(client, admin, body=body)
    assert answer.status_code == 202

    [raw] = drain(broker, 1)
    payload = InvocationMessage.decode(raw).payload
    assert orjson.loads(payload) == {"args": [], "kwargs": {}}


def test_invocation_record_is_queued_with_its_version(
    client: FlaskClient, admin: dict[str, str], deployed: str, store: SQLiteStore
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    record = store.get_invocation(invocation_id, "acme")
    assert record.status is State.QUEUED
    assert (record.function, record.version, record.tenant) == ("add", 1, "acme")

    answer = client.get(f"/v1/invocations/{invocation_id}", headers=admin)
    assert answer.status_code == 200
    assert answer.json == record.to_api()


def test_new_upload_serves_new_invocations(
    client: FlaskClient, admin: dict[str, str], deployed: str, broker: Broker
) -> None:
    first = invoke(client, admin).json["id"]
    upload = {"name": "add", "source": "def add(a, b=0):\n    return a - b\n"}
    assert client.post("/v1/functions", json=upload, headers=admin).json["version"] == 2
    second = invoke(client, admin).json["id"]

    versions = {
        message.id: message.version
        for message in map(InvocationMessage.decode, drain(broker, 2))
    }
    assert versions == {first: 1, second: 2}
    record = client.get(f"/v1/invocations/{second}", headers=admin).json
    assert record["version"] == 2


def test_integers_beyond_64_bits_reach_the_runtime_exactly(
    client: FlaskClient, admin: dict[str, str], deployed: str, broker: Broker
) -> None:
    body = b'{"args": [%d, %d], "kwargs": {"b": 1.5}}' % (2**70, -(2**63) - 1)
    answer = client.post(
        "/v1/functions/add/invocations",
        data=body,
        headers={**admin, "Content-Type": "application/json"},
    )
    assert answer.status_code == 202

    [raw] = drain(broker, 1)
    payload = json.loads(InvocationMessage.decode(raw).payload)
    assert payload == {"args": [2**70, -(2**63) - 1], "kwargs": {"b": 1.5}}


def test_deeply_nested_body_with_a_long_number_is_400(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    body = b'{"args": ' + b"[" * 1000 + b"1" * 25 + b"]" * 1000 + b"}"
    answer = client.post(
        "/v1/functions/add/invocations",
        data=body,
        headers={**admin, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"


def test_invoking_an_unknown_function_is_404(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    answer = invoke(client, admin, name="missing")
    assert answer.status_code == 404
    assert error_code(answer) == "not_found"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"args": {"a": 1}}, "'args'"),
        ({"args": "1, 2"}, "'args'"),
        ({"kwargs": [1]}, "'kwargs'"),
        ({"kwargs": "b=1"}, "'kwargs'"),
        ({"argz": [1]}, "unknown field"),
        ({"status": "succeeded"}, "cannot be set"),
        ({"id": "inv_mine"}, "cannot be set"),
        ({"tenant": "rival"}, "cannot be set"),
        ({"version": 1}, "cannot be set"),
        ({"attempts": 0}, "cannot be set"),
        ([1, 2], "JSON object"),
        ("text", "JSON object"),
    ],
)
def test_bad_invocation_bodies_are_400(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    body: Any,
    fragment: str,
) -> None:
    answer = invoke(client, admin, body=body)
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"
    assert fragment in answer.json["error"]["message"]


def test_idempotency_key_replays_without_enqueuing_again(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    broker: Broker,
    store: SQLiteStore,
) -> None:
    headers = {**admin, "Idempotency-Key": "order-42"}
    first = invoke(client, headers)
    second = invoke(client, headers)
    assert first.status_code == second.status_code == 202
    assert first.json["id"] == second.json["id"]
    other = invoke(client, {**admin, "Idempotency-Key": "order-43"})
    assert other.json["id"] != first.json["id"]

    bodies = drain(broker, 3, timeout_s=1.0)
    ids = [InvocationMessage.decode(body).id for body in bodies]
    assert sorted(ids) == sorted([first.json["id"], other.json["id"]])
    assert len(store.list_invocations("acme")) == 2


def test_overlong_idempotency_key_is_400(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    answer = invoke(client, {**admin, "Idempotency-Key": "k" * 256})
    assert answer.status_code == 400
    assert "Idempotency-Key" in answer.json["error"]["message"]


def test_batch_of_500_is_recorded_and_published_together(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    broker: Broker,
    store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: dict[str, int] = {"add_invocations": 0, "publish": 0}

    def counted(name: str, target: Any) -> Callable[..., Any]:
        original = getattr(target, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(store, "add_invocations", counted("add_invocations", store))
    monkeypatch.setattr(broker, "publish", counted("publish", broker))

    items = [{"args": [n], "kwargs": {"b": 1}} for n in range(500)]
    answer = client.post(
        "/v1/functions/add/invocations/batch", json={"items": items}, headers=admin
    )
    assert answer.status_code == 202
    accepted = answer.json["invocations"]
    assert len(accepted) == 500
    assert all(item == {"id": item["id"], "status": "queued"} for item in accepted)
    assert calls == {"add_invocations": 1, "publish": 1}

    # Published as bundles of the configured size, in order.
    bodies = drain(broker, 63)
    bundles = [decode_bundle(body) for body in bodies]
    assert [len(bundle) for bundle in bundles] == [8] * 62 + [4]
    messages = {
        message.id: orjson.loads(message.payload)["args"][0]
        for bundle in bundles
        for message in bundle
    }
    assert [messages[item["id"]] for item in accepted] == list(range(500))


def test_batch_with_idempotency_key_replays_item_by_item(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    headers = {**admin, "Idempotency-Key": "nightly"}
    body = {"items": [{"args": [1]}, {"args": [2]}]}
    path = "/v1/functions/add/invocations/batch"
    first = client.post(path, json=body, headers=headers).json["invocations"]
    again = client.post(path, json=body, headers=headers).json["invocations"]
    assert first == again
    assert len({item["id"] for item in first}) == 2


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"items": []}, "1 to"),
        ({"items": {"args": []}}, "'items'"),
        ({}, "'items'"),
        ({"items": [{"args": [1]}] * 1001}, "1001 items"),
        ({"items": [{"args": [1]}, 5]}, "items[1]"),
        ({"items": [{"args": [1]}, {"args": 5}]}, "items[1]"),
        ({"items": [{"args": [1]}, {"tenant": "x"}]}, "cannot be set in items[1]"),
        ({"items": [{"args": [1]}], "wait": 5}, "unknown field"),
    ],
)
def test_bad_batches_are_400(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    body: Any,
    fragment: str,
) -> None:
    answer = client.post(
        "/v1/functions/add/invocations/batch", json=body, headers=admin
    )
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"
    assert fragment in answer.json["error"]["message"]


def test_broker_down_is_503_and_the_record_failed(
    settings: Settings,
    store: SQLiteStore,
    cache: MemoryCache,
    admin: dict[str, str],
) -> None:
    app = create_app(settings, store=store, broker=DownBroker(), cache=cache)
    client = app.test_client()
    client.post(
        "/v1/functions", json={"name": "add", "source": ADD_SOURCE}, headers=admin
    )

    answer = invoke(client, admin)
    assert answer.status_code == 503
    assert error_code(answer) == "unavailable"
    assert int(answer.headers["Retry-After"]) > 0

    [record] = store.list_invocations("acme")
    assert record.status is State.FAILED
    assert record.error is not None
    assert record.error["type"] == "broker_unavailable"

    batch = {"items": [{"args": [1]}, {"args": [2]}]}
    answer = client.post(
        "/v1/functions/add/invocations/batch", json=batch, headers=admin
    )
    assert answer.status_code == 503
    statuses = [record.status for record in store.list_invocations("acme")]
    assert statuses == [State.FAILED] * 3


def test_store_down_is_503(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("database is locked")

    monkeypatch.setattr(store, "get_function", down)
    answer = invoke(client, admin)
    assert answer.status_code == 503
    assert error_code(answer) == "unavailable"
    assert "store" in answer.json["error"]["message"]
    assert int(answer.headers["Retry-After"]) > 0

    monkeypatch.setattr(store, "find_key", down)
    answer = client.get("/v1/functions", headers=admin)
    assert answer.status_code == 503


# Waiting.


def test_prefer_wait_answers_200_when_the_runtime_finishes(
    app: Flask,
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    broker: Broker,
    store: SQLiteStore,
    cache: MemoryCache,
) -> None:
    with FakeRuntime(broker, store, cache, delay_s=0.05):
        answer = invoke(client, {**admin, "Prefer": "wait=5"}, body={"args": [20, 22]})
    assert answer.status_code == 200
    assert answer.headers["Preference-Applied"] == "wait=5"
    assert answer.json["status"] == "succeeded"
    assert answer.json["result"] == 42
    assert answer.json == store.get_invocation(answer.json["id"], "acme").to_api()
    assert app.extensions["conveyor"].hub.waiting() == 0


class LateConfirmBroker(SQLiteBroker):
    """Enqueues at once but confirms only when the test says, or fails then."""

    def __init__(self, path: str, error: Exception | None = None) -> None:
        super().__init__(path, delivery_limit=3)
        self.error = error
        self.pending: list[Publication] = []

    def publish_nowait(self, bodies: Any) -> Publication:
        self.publish(bodies)
        publication = Publication()
        self.pending.append(publication)
        return publication

    def confirm_all(self) -> None:
        for publication in self.pending:
            publication.settle(self.error)


def test_prefer_wait_answers_with_the_outcome_before_the_confirm(
    settings: Settings,
    store: SQLiteStore,
    admin: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    broker = LateConfirmBroker(str(tmp_path / "late.sqlite3"))
    cache = SharedMemoryCache()
    app = create_app(settings, store=store, broker=broker, cache=cache)
    client = app.test_client()
    client.post(
        "/v1/functions", json={"name": "add", "source": ADD_SOURCE}, headers=admin
    )

    started = time.monotonic()
    with FakeRuntime(broker, store, cache, delay_s=0.05):
        answer = invoke(client, {**admin, "Prefer": "wait=5"}, body={"args": [1, 1]})
    assert time.monotonic() - started < 2.0
    assert answer.status_code == 200
    assert answer.json["result"] == 2
    assert broker.pending and not broker.pending[0].done()
    queued = [r for r in caplog.records if r.getMessage().endswith("queued")]
    assert [r.invocation_id for r in queued] == [answer.json["id"]]  # type: ignore[attr-defined]
    broker.confirm_all()
    broker.close()


def test_a_failed_confirm_with_no_outcome_is_503_and_the_record_failed(
    settings: Settings,
    store: SQLiteStore,
    cache: MemoryCache,
    admin: dict[str, str],
    tmp_path: Path,
) -> None:
    broker = LateConfirmBroker(
        str(tmp_path / "late.sqlite3"), BrokerUnavailable("nacked by the test")
    )
    app = create_app(settings, store=store, broker=broker, cache=cache)
    client = app.test_client()
    client.post(
        "/v1/functions", json={"name": "add", "source": ADD_SOURCE}, headers=admin
    )

    timer = threading.Timer(0.2, broker.confirm_all)
    timer.start()
    answer = invoke(client, {**admin, "Prefer": "wait=5"})
    timer.join()
    assert answer.status_code == 503
    assert "nacked by the test" in answer.json["error"]["message"]
    [record] = store.list_invocations("acme")
    assert record.status is State.FAILED
    assert record.error["type"] == "broker_unavailable"
    broker.close()


def test_prefer_wait_answers_202_when_time_runs_out(
    app: Flask, client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    started = time.monotonic()
    answer = invoke(client, {**admin, "Prefer": "respond-async, wait=0.3"})
    elapsed_s = time.monotonic() - started
    assert answer.status_code == 202
    assert answer.json["status"] == "queued"
    assert answer.headers["Preference-Applied"] == "wait=0.3"
    assert 0.25 <= elapsed_s < 3
    assert app.extensions["conveyor"].hub.waiting() == 0


def test_prefer_wait_is_capped(
    client: FlaskClient, admin: dict[str, str], deployed: str, settings: Settings
) -> None:
    capped = create_app(
        Settings(data_dir=settings.data_dir, max_wait_s=0.2),
        store=client.application.extensions["conveyor"].store,
        broker=client.application.extensions["conveyor"].broker,
        cache=client.application.extensions["conveyor"].cache,
    ).test_client()
    answer = invoke(capped, {**admin, "Prefer": "wait=3600"})
    assert answer.status_code == 202
    assert answer.headers["Preference-Applied"] == "wait=0.2"


@pytest.mark.parametrize(
    "prefer", ["wait=soon", "wait=-1", "wait=nan", "return=minimal"]
)
def test_unusable_prefer_is_ignored(
    client: FlaskClient, admin: dict[str, str], deployed: str, prefer: str
) -> None:
    answer = invoke(client, {**admin, "Prefer": prefer})
    assert answer.status_code == 202
    assert "Preference-Applied" not in answer.headers


def test_prefer_wait_on_a_replay_returns_the_finished_record(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    store: SQLiteStore,
    cache: MemoryCache,
) -> None:
    headers = {**admin, "Idempotency-Key": "once"}
    invocation_id = invoke(client, headers).json["id"]
    finish(store, cache, invocation_id, result=3)
    answer = invoke(client, {**headers, "Prefer": "wait=2"})
    assert answer.status_code == 200
    assert answer.json["id"] == invocation_id
    assert answer.json["result"] == 3


def test_long_poll_is_woken_by_a_cache_notification(
    settings: Settings, store: SQLiteStore, broker: Broker, admin: dict[str, str]
) -> None:
    cache = SharedMemoryCache()
    app = create_app(settings, store=store, broker=broker, cache=cache)
    client = app.test_client()
    client.post(
        "/v1/functions", json={"name": "add", "source": ADD_SOURCE}, headers=admin
    )
    invocation_id = invoke(client, admin).json["id"]

    # The record is finished in the cache only: the store still says queued,
    # so only the notification and the cache read can end the wait early.
    def runtime() -> None:
        time.sleep(0.2)
        doc = store.get_invocation(invocation_id, "acme").to_doc()
        doc.update(status="succeeded", result=3, attempts=1)
        cache.put(invocation_id, doc, 60)

    finisher = threading.Thread(target=runtime)
    finisher.start()
    started = time.monotonic()
    answer = client.get(f"/v1/invocations/{invocation_id}?wait=5", headers=admin)
    elapsed_s = time.monotonic() - started
    finisher.join()
    cache.close()

    assert answer.status_code == 200
    assert answer.json["status"] == "succeeded"
    assert answer.json["result"] == 3
    assert 0.15 <= elapsed_s < 0.9
    assert app.extensions["conveyor"].hub.waiting() == 0


def test_long_poll_sees_a_finish_recorded_only_in_the_store(
    client: FlaskClient, admin: dict[str, str], deployed: str, store: SQLiteStore
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    finisher = threading.Timer(0.2, finish, (store, None, invocation_id))
    finisher.start()
    started = time.monotonic()
    answer = client.get(f"/v1/invocations/{invocation_id}?wait=5", headers=admin)
    elapsed_s = time.monotonic() - started
    finisher.join()
    assert answer.json["status"] == "succeeded"
    assert elapsed_s < 1.0


def test_long_poll_returns_the_record_as_is_when_time_runs_out(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    answer = client.get(f"/v1/invocations/{invocation_id}?wait=0.2", headers=admin)
    assert answer.status_code == 200
    assert answer.json["status"] == "queued"


@pytest.mark.parametrize("wait", ["abc", "-1", "inf", "nan"])
def test_bad_wait_parameter_is_400(
    client: FlaskClient, admin: dict[str, str], deployed: str, wait: str
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    answer = client.get(f"/v1/invocations/{invocation_id}?wait={wait}", headers=admin)
    assert answer.status_code == 400
    assert "'wait'" in answer.json["error"]["message"]


# Reading invocations.


def test_finished_invocation_is_read_from_the_cache_first(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    store: SQLiteStore,
    cache: MemoryCache,
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    doc = store.get_invocation(invocation_id, "acme").to_doc()
    doc.update(status="succeeded", result="from the cache")
    cache.put(invocation_id, doc, 60)
    answer = client.get(f"/v1/invocations/{invocation_id}", headers=admin)
    assert answer.json["result"] == "from the cache"


def test_a_cached_record_of_another_tenant_is_not_served(
    client: FlaskClient,
    admin: dict[str, str],
    rival: dict[str, str],
    deployed: str,
    store: SQLiteStore,
    cache: MemoryCache,
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    cache.put(invocation_id, finish(store, None, invocation_id).to_doc(), 60)
    answer = client.get(f"/v1/invocations/{invocation_id}", headers=rival)
    assert answer.status_code == 404


def test_a_failing_cache_falls_back_to_the_store(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    cache: MemoryCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def down(invocation_id: str) -> None:
        raise CacheUnavailable("redis is gone")

    monkeypatch.setattr(cache, "get", down)
    invocation_id = invoke(client, admin).json["id"]
    answer = client.get(f"/v1/invocations/{invocation_id}", headers=admin)
    assert answer.status_code == 200
    assert answer.json["status"] == "queued"


def test_unknown_invocation_is_404(client: FlaskClient, admin: dict[str, str]) -> None:
    answer = client.get("/v1/invocations/inv_nothing", headers=admin)
    assert answer.status_code == 404
    assert error_code(answer) == "not_found"


def test_logs_of_an_invocation(
    client: FlaskClient, admin: dict[str, str], deployed: str, store: SQLiteStore
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    finish(store, None, invocation_id, logs="hello\nworld\n")
    answer = client.get(f"/v1/invocations/{invocation_id}/logs", headers=admin)
    assert answer.status_code == 200
    assert answer.json == {
        "id": invocation_id,
        "logs": "hello\nworld\n",
        "truncated": False,
    }


def test_listing_pages_newest_first(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    ids = [invoke(client, admin).json["id"] for _ in range(7)]
    newest_first = list(reversed(ids))

    seen: list[str] = []
    path = "/v1/invocations?limit=3"
    pages = 0
    while True:
        page = client.get(path, headers=admin).json
        seen += [item["id"] for item in page["invocations"]]
        pages += 1
        if page["next"] is None:
            break
        path = f"/v1/invocations?limit=3&before={page['next']}"
    assert seen == newest_first
    assert pages == 3

    everything = client.get("/v1/invocations", headers=admin).json
    assert [item["id"] for item in everything["invocations"]] == newest_first
    assert everything["next"] is None


def test_listing_filters_by_function_and_status(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    upload = {"name": "other", "source": "def other():\n    return 1\n"}
    client.post("/v1/functions", json=upload, headers=admin)
    adds = [invoke(client, admin).json["id"] for _ in range(2)]
    others = [invoke(client, admin, name="other", body={}).json["id"] for _ in range(2)]
    client.post(f"/v1/invocations/{others[0]}/cancel", headers=admin)

    def listed(query: str) -> list[str]:
        page = client.get(f"/v1/invocations?{query}", headers=admin).json
        return [item["id"] for item in page["invocations"]]

    assert listed("function=add") == adds[::-1]
    assert listed("function=other&status=queued") == [others[1]]
    assert listed("status=cancelled") == [others[0]]
    assert listed("function=missing") == []


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("status=done", "queued, running, succeeded"),
        ("limit=0", "'limit'"),
        ("limit=201", "'limit'"),
        ("limit=ten", "'limit'"),
        ("limit=" + "9" * 5000, "'limit'"),
    ],
)
def test_bad_listing_parameters_are_400(
    client: FlaskClient, admin: dict[str, str], query: str, fragment: str
) -> None:
    answer = client.get(f"/v1/invocations?{query}", headers=admin)
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"
    assert fragment in answer.json["error"]["message"]


# Cancelling.


def test_cancel_a_queued_invocation_then_409(
    app: Flask,
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    cache: MemoryCache,
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    answer = client.post(f"/v1/invocations/{invocation_id}/cancel", headers=admin)
    assert answer.status_code == 200
    assert answer.json["id"] == invocation_id
    assert answer.json["status"] == "cancelled"
    cached = cache.get(invocation_id)
    assert cached is not None and cached["status"] == "cancelled"

    answer = client.post(f"/v1/invocations/{invocation_id}/cancel", headers=admin)
    assert answer.status_code == 409
    assert error_code(answer) == "conflict"


def test_cancel_wakes_a_waiting_request(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    canceller = threading.Timer(
        0.2,
        lambda: client.application.test_client().post(
            f"/v1/invocations/{invocation_id}/cancel", headers=admin
        ),
    )
    canceller.start()
    answer = client.get(f"/v1/invocations/{invocation_id}?wait=5", headers=admin)
    canceller.join()
    assert answer.json["status"] == "cancelled"


def test_cancel_refuses_a_body_with_fields(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    answer = client.post(
        f"/v1/invocations/{invocation_id}/cancel", json={"reason": "x"}, headers=admin
    )
    assert answer.status_code == 400


# Tenant isolation.


def test_another_tenants_resources_are_404(
    client: FlaskClient,
    admin: dict[str, str],
    rival: dict[str, str],
    deployed: str,
    store: SQLiteStore,
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    finish(store, None, invocation_id, logs="secret\n")
    other = invoke(client, admin).json["id"]

    for method, path in [
        ("GET", "/v1/functions/add"),
        ("DELETE", "/v1/functions/add"),
        ("POST", "/v1/functions/add/invocations"),
        ("POST", "/v1/functions/add/invocations/batch"),
        ("GET", f"/v1/invocations/{invocation_id}"),
        ("GET", f"/v1/invocations/{invocation_id}?wait=0.1"),
        ("GET", f"/v1/invocations/{invocation_id}/logs"),
        ("POST", f"/v1/invocations/{other}/cancel"),
    ]:
        body = {"items": [{}]} if path.endswith("batch") else None
        answer = client.open(path, method=method, json=body, headers=rival)
        assert answer.status_code == 404, (method, path, answer.json)
        assert error_code(answer) == "not_found"

    assert client.get("/v1/functions", headers=rival).json == {"functions": []}
    assert client.get("/v1/invocations", headers=rival).json["invocations"] == []
    assert store.get_invocation(other, "acme").status is State.QUEUED


# Errors of every class.


def test_unknown_route_is_json_404(client: FlaskClient) -> None:
    answer = client.get("/v2/everything")
    assert answer.status_code == 404
    assert error_code(answer) == "not_found"


def test_wrong_method_is_json_405_with_allow(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    answer = client.put("/v1/functions", headers=admin)
    assert answer.status_code == 405
    assert error_code(answer) == "method_not_allowed"
    assert set(answer.headers["Allow"].split(", ")) >= {"GET", "POST"}


def test_body_over_the_limit_is_413_before_authentication(
    client: FlaskClient, settings: Settings
) -> None:
    body = b"[" + b"1," * settings.max_body_bytes + b"1]"
    answer = client.post("/v1/functions", data=body, content_type="application/json")
    assert answer.status_code == 413
    assert error_code(answer) == "payload_too_large"


def test_body_without_json_content_type_is_415(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        answer = client.post(
            "/v1/functions/add/invocations",
            data=b'{"args": []}',
            headers=admin
            if content_type is None
            else {**admin, "Content-Type": content_type},
        )
        assert answer.status_code == 415, content_type
        assert error_code(answer) == "unsupported_media_type"


def test_json_content_type_with_charset_is_accepted(
    client: FlaskClient, admin: dict[str, str], deployed: str
) -> None:
    answer = client.post(
        "/v1/functions/add/invocations",
        data=b'{"args": [1]}',
        headers={**admin, "Content-Type": "application/json; charset=utf-8"},
    )
    assert answer.status_code == 202


@pytest.mark.parametrize("body", [b"{not json", b'{"args": [1,]}', b"\xff\xfe", b"NaN"])
def test_malformed_json_is_400_invalid_json(
    client: FlaskClient, admin: dict[str, str], deployed: str, body: bytes
) -> None:
    answer = client.post(
        "/v1/functions/add/invocations",
        data=body,
        headers={**admin, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400
    assert error_code(answer) == "invalid_json"


def test_missing_required_body_is_400(
    client: FlaskClient, admin: dict[str, str]
) -> None:
    answer = client.post("/v1/functions", headers=admin)
    assert answer.status_code == 400
    assert error_code(answer) == "bad_request"


def test_platform_fault_is_500_without_a_traceback(
    client: FlaskClient,
    admin: dict[str, str],
    store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(tenant: str) -> Any:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(store, "list_functions", broken)
    answer = client.get("/v1/functions", headers=admin)
    assert answer.status_code == 500
    assert error_code(answer) == "internal"
    assert "bug" not in answer.get_data(as_text=True)
    assert "Traceback" not in answer.get_data(as_text=True)

    [logged] = [r for r in caplog.records if r.name == "gateway.errors"]
    assert logged.levelno == logging.ERROR
    assert logged.exc_info is not None


def test_large_integer_results_are_served(
    client: FlaskClient,
    admin: dict[str, str],
    deployed: str,
    store: SQLiteStore,
    cache: MemoryCache,
) -> None:
    invocation_id = invoke(client, admin).json["id"]
    doc = store.get_invocation(invocation_id, "acme").to_doc()
    doc.update(status="succeeded", result=2**100)
    cache.put(invocation_id, doc, 60)
    answer = client.get(f"/v1/invocations/{invocation_id}", headers=admin)
    assert answer.status_code == 200
    assert answer.get_data().count(str(2**100).encode()) == 1


# Backends opened from the settings.


def test_backends_open_lazily_from_the_settings(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()

    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    assert (tmp_path / "data").is_dir()
    backends: Backends = app.extensions["conveyor"]
    assert backends.store is backends.store

    admin = add_key(backends.store, "acme", "admin")  # type: ignore[arg-type]
    assert client.get("/v1/functions", headers=admin).status_code == 200
    backends.close()


def test_backends_are_reopened_in_a_forked_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backends = Backends(Settings(data_dir=str(tmp_path)))
    parent_cache = backends.cache
    assert backends.cache is parent_cache

    monkeypatch.setattr("gateway.context.os.getpid", lambda: -42)
    assert backends.cache is not parent_cache
