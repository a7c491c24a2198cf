"""The SDK client's transport: retries, errors and progress, against a stub."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import conveyor
from conveyor import client as client_module
from conveyor.task import _Progress


class Stub:
    """An HTTP server answering from a script of (status, body) pairs."""

    def __init__(self) -> None:
        self.script: list[tuple[int, Any]] = []
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                stub.requests.append(
                    (self.command, self.path, dict(self.headers), body)
                )
                status, answer = stub.script.pop(0) if stub.script else (500, {})
                if isinstance(answer, bytes):
                    data = answer
                else:
                    data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.02,), daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    monkeypatch.setattr(client_module, "BACKOFF_S", 0.0)
    server = Stub()
    yield server
    server.close()


UNAVAILABLE = (503, {"error": {"code": "unavailable", "message": "store down"}})


def test_reads_are_retried_through_a_503(stub: Stub) -> None:
    stub.script = [UNAVAILABLE, UNAVAILABLE, (200, {"functions": []})]
    assert conveyor.Client(stub.url, "cvk_x").functions() == []
    assert len(stub.requests) == 3


def test_reads_give_up_with_the_last_error(stub: Stub) -> None:
    stub.script = [UNAVAILABLE] * client_module.RETRIES
    with pytest.raises(conveyor.ServiceUnavailable, match="store down") as caught:
        conveyor.Client(stub.url, "cvk_x").functions()
    assert caught.value.status == 503 and caught.value.code == "unavailable"
    assert len(stub.requests) == client_module.RETRIES


def test_invocations_retry_with_one_idempotency_key(stub: Stub) -> None:
    stub.script = [UNAVAILABLE, (202, {"id": "inv_1", "status": "queued"})]
    answer = conveyor.Client(stub.url, "cvk_x").invoke("f", [1])
    assert answer == {"id": "inv_1", "status": "queued"}
    keys = {request[2]["Idempotency-Key"] for request in stub.requests}
    assert len(stub.requests) == 2 and len(keys) == 1


def test_deploys_are_not_repeated(stub: Stub) -> None:
    stub.script = [UNAVAILABLE, (201, {"name": "f", "version": 1})]
    with pytest.raises(conveyor.ServiceUnavailable):
        conveyor.Client(stub.url, "cvk_x").deploy("f", source="def f(): pass")
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, conveyor.InvalidRequest),
        (401, conveyor.AuthenticationError),
        (403, conveyor.PermissionDenied),
        (404, conveyor.NotFound),
        (413, conveyor.InvalidRequest),
        (500, conveyor.APIError),
    ],
)
def test_error_answers_map_to_one_error_each(
    stub: Stub, status: int, kind: type[conveyor.APIError]
) -> None:
    body = {"error": {"code": "some_code", "message": "why"}, "request_id": "req_9"}
    stub.script = [(status, body)]
    with pytest.raises(kind) as caught:
        conveyor.Client(stub.url, "cvk_x").deploy("f", source="x")
    assert caught.value.message == "why"
    assert caught.value.request_id == "req_9"
    assert isinstance(caught.value, conveyor.ConveyorError)


def test_the_key_travels_as_a_bearer_token(stub: Stub) -> None:
    stub.script = [(200, {"functions": []})]
    conveyor.Client(stub.url, "cvk_secret").functions()
    assert stub.requests[0][2]["Authorization"] == "Bearer cvk_secret"


def test_a_body_that_is_not_json_is_reported(stub: Stub) -> None:
    stub.script = [(200, b"<html>a proxy's page</html>")]
    with pytest.raises(conveyor.GatewayUnreachable, match="not JSON"):
        conveyor.Client(stub.url, "cvk_x").functions()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_only() -> None:
    shown = Terminal()
    progress = _Progress(100, "square", shown)
    for _ in range(100):
        progress.advance()
    progress.close()
    assert shown.getvalue().endswith("square [" + "#" * 30 + "] 100/100\n")

    hidden = io.StringIO()
    quiet = _Progress(100, "square", hidden)
    quiet.advance()
    quiet.close()
    assert hidden.getvalue() == ""
