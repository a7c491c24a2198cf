"""The HTTP client of the Conveyor gateway."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import requests

from conveyor import __version__
from conveyor.config import resolve
from conveyor.errors import GatewayUnreachable, ServiceUnavailable, api_error
from conveyor.serialization import call_body
from conveyor.task import MAX_POLL_S

#: Seconds a request may take beyond the wait it asks the gateway for.
REQUEST_SLACK_S = 30.0
#: Attempts for a request that is safe to repeat, and the first pause.
RETRIES = 4
BACKOFF_S = 0.25
#: How many calls go in one batch request (the gateway's default cap is 1000).
BATCH_SIZE = 500

_RETRY_STATUSES = frozenset({502, 503, 504})


class Client:
    """Talks to one Conveyor gateway with one API key.

    ``url`` and ``api_key`` default to ``CONVEYOR_URL`` and
    ``CONVEYOR_API_KEY``, then to what ``conveyor login`` saved. Reads, and
    invocations (which carry an idempotency key), are retried with backoff
    when the gateway cannot be reached or answers 502, 503 or 504; other
    writes are not, and say what happened instead.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None) -> None:
        credentials = resolve(url, api_key)
        self.url = credentials.url
        self.api_key = credentials.api_key
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"conveyor-python/{__version__}"
        if self.api_key:
            self._session.headers["Authorization"] = f"Bearer {self.api_key}"

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Transport.

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool | None = None,
        timeout_s: float = REQUEST_SLACK_S,
    ) -> Any:
        """Send a request and return the decoded JSON answer.

        ``retry`` defaults to True for GET. Raises an APIError for an error
        answer and GatewayUnreachable when no answer comes.
        """
        if retry is None:
            retry = method == "GET"
        attempts = RETRIES if retry else 1
        url = self.url + path
        for attempt in range(1, attempts + 1):
            try:
                answer = self._session.request(
                    method,
                    url,
                    json=json,
                    params=params,
                    headers=dict(headers or {}),
                    timeout=(5.0, timeout_s),
                )
            except requests.RequestException as exc:
                if attempt < attempts:
                    time.sleep(BACKOFF_S * 2 ** (attempt - 1))
                    continue
                raise GatewayUnreachable(
                    f"cannot reach the Conveyor gateway at {self.url}: "
                    f"{_reason(exc)}"
                    + (
                        ""
                        if retry
                        else "; the request may or may not have been applied"
                    )
                ) from None
            if answer.status_code in _RETRY_STATUSES and attempt < attempts:
                time.sleep(_retry_after(answer, BACKOFF_S * 2 ** (attempt - 1)))
                continue
            return _decode(answer)
        raise AssertionError("unreachable")  # pragma: no cover

    # Health.

    def health(self) -> dict[str, Any]:
        """The gateway's readiness and each backend's state."""
        try:
            return dict(self.request("GET", "/readyz"))
        except ServiceUnavailable:
            answer = self._session.get(self.url + "/readyz", timeout=5)
            return dict(answer.json())

    # Functions.

    def deploy(
        self,
        name: str,
        *,
        source: str | None = None,
        pickled: str | None = None,
        entrypoint: str | None = None,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register a new version: ``source`` text, or a base64 ``pickled`` one."""
        body: dict[str, Any] = {"name": name}
        if source is not None:
            body["source"] = source
        if pickled is not None:
            body["pickle"] = pickled
        optional = {
            "entrypoint": entrypoint,
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "env": dict(env) if env is not None else None,
        }
        body.update(
            {key: value for key, value in optional.items() if value is not None}
        )
        return dict(self.request("POST", "/v1/functions", json=body))

    def functions(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/functions")["functions"])

    def function(self, name: str, version: int | None = None) -> dict[str, Any]:
        params = {"version": version} if version is not None else None
        return dict(
            self.request("GET", f"/v1/functions/{_segment(name)}", params=params)
        )

    def delete_function(self, name: str) -> None:
        self.request("DELETE", f"/v1/functions/{_segment(name)}", retry=True)

    # Invocations.

    def invoke(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        wait_s: float | None = None,
    ) -> dict[str, Any]:
        """Invoke a function; with ``wait_s``, wait that long for it to finish.

        Returns the finished invocation, or ``{"id", "status"}`` if it is
        still queued or running.
        """
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        if wait_s is not None:
            headers["Prefer"] = f"wait={_seconds(min(wait_s, MAX_POLL_S))}"
        return dict(
            self.request(
                "POST",
                f"/v1/functions/{_segment(name)}/invocations",
                json=call_body(tuple(args), dict(kwargs or {})),
                headers=headers,
                retry=True,
                timeout_s=(wait_s or 0) + REQUEST_SLACK_S,
            )
        )

    def invoke_many(
        self, name: str, calls: Iterable[tuple[Sequence[Any], Mapping[str, Any]]]
    ) -> list[str]:
        """Invoke once per ``(args, kwargs)`` through the batch endpoint; the ids."""
        ids: list[str] = []
        chunk: list[dict[str, Any]] = []
        for args, kwargs in calls:
            chunk.append(call_body(tuple(args), dict(kwargs)))
            if len(chunk) == BATCH_SIZE:
                ids += self._invoke_batch(name, chunk)
                chunk = []
        if chunk:
            ids += self._invoke_batch(name, chunk)
        return ids

    def _invoke_batch(self, name: str, items: list[dict[str, Any]]) -> list[str]:
        answer = self.request(
            "POST",
            f"/v1/functions/{_segment(name)}/invocations/batch",
            json={"items": items},
            headers={"Idempotency-Key": uuid.uuid4().hex},
            retry=True,
        )
        return [item["id"] for item in answer["invocations"]]

    def invocation(self, invocation_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """The invocation; with ``wait_s``, once finished or when that time is up."""
        params = {"wait": _seconds(min(wait_s, MAX_POLL_S))} if wait_s > 0 else None
        return dict(
            self.request(
                "GET",
                f"/v1/invocations/{_segment(invocation_id)}",
                params=params,
                timeout_s=wait_s + REQUEST_SLACK_S,
            )
        )

    def invocations(
        self,
        function: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> dict[str, Any]:
        """One page of invocations, newest first: ``{"invocations", "next"}``."""
        params = {"function": function, "status": status, "limit": limit}
        if before:
            params["before"] = before
        params = {key: value for key, value in params.items() if value is not None}
        return dict(self.request("GET", "/v1/invocations", params=params))

    def logs(self, invocation_id: str) -> dict[str, Any]:
        """``{"id", "logs", "truncated"}``: what the function printed."""
        return dict(
            self.request("GET", f"/v1/invocations/{_segment(invocation_id)}/logs")
        )

    def cancel(self, invocation_id: str) -> dict[str, Any]:
        return dict(
            self.request(
                "POST", f"/v1/invocations/{_segment(invocation_id)}/cancel", retry=True
            )
        )

    # Keys.

    def create_key(self, tenant: str, scopes: Sequence[str]) -> dict[str, Any]:
        body = {"tenant": tenant, "scopes": list(scopes)}
        return dict(self.request("POST", "/v1/keys", json=body))

    def keys(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/keys")["keys"])

    def revoke_key(self, key_id: str) -> None:
        self.request("DELETE", f"/v1/keys/{_segment(key_id)}", retry=True)


def _decode(answer: requests.Response) -> Any:
    try:
        body = answer.json() if answer.content else {}
    except ValueError:
        body = None
    if answer.ok:
        if body is None:
            raise GatewayUnreachable(
                f"the gateway answered HTTP {answer.status_code} with a body that "
                "is not JSON; is the URL that of a Conveyor gateway?"
            )
        return body
    raise api_error(answer.status_code, body, answer.headers.get("X-Request-Id"))


def _retry_after(answer: requests.Response, default_s: float) -> float:
    try:
        return min(float(answer.headers.get("Retry-After", default_s)), 5.0)
    except ValueError:
        return default_s


def _reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "it did not answer in time"
    if isinstance(exc, requests.ConnectionError):
        return "the connection was refused or dropped"
    return str(exc)


def _segment(value: str) -> str:
    return requests.utils.quote(value, safe="")


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):g}"
