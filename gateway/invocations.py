"""The invocation API: invoke functions, then read, wait for and cancel calls.

An invocation is recorded as queued before its message is published, and the
client hears 202 only once the broker confirmed the message. When the broker
cannot confirm it, the record is marked failed, so nothing stays queued that
no worker will ever see.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, request

from conveyor_core.broker import Publication
from conveyor_core.errors import BackendUnavailable, BrokerUnavailable
from conveyor_core.messages import InvocationMessage, encode_bundle
from conveyor_core.records import ApiKey, FunctionVersion, Invocation, Scope, new_id
from gateway.auth import requires
from gateway.context import Backends
from gateway.errors import Unavailable
from gateway.responses import json_response
from gateway.validation import (
    check_fields,
    format_seconds,
    idempotency_key,
    limit_param,
    parse_batch,
    parse_call,
    prefer_wait,
    read_json,
    status_param,
    wait_param,
)
from gateway.waiting import Watch

logger = logging.getLogger(__name__)

#: How often a waiter whose publish is unconfirmed looks again; it is woken
#: early by the confirm or by the outcome.
PUBLISH_POLL_S = 1.0

#: The least time between two warnings about a failing cache read.
CACHE_WARNING_INTERVAL_S = 10.0


class InvocationsApi:
    """Views that invoke functions and read, wait for and cancel invocations."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        settings = backends.settings
        self._max_wait_s = settings.max_wait_s
        self._max_batch = settings.max_batch
        self._bundle_size = settings.bundle_size
        self._result_ttl_s = settings.result_ttl_s
        self._cache_warned_at = 0.0

    def register(self, app: Flask) -> None:
        app.add_url_rule(
            "/v1/functions/<name>/invocations",
            "invoke",
            self.invoke,
            methods=["POST"],
        )
        app.add_url_rule(
            "/v1/functions/<name>/invocations/batch",
            "invoke_batch",
            self.invoke_batch,
            methods=["POST"],
        )
        app.add_url_rule(
            "/v1/invocations",
            "list_invocations",
            self.list_invocations,
            methods=["GET"],
        )
        app.add_url_rule(
            "/v1/invocations/<invocation_id>",
            "get_invocation",
            self.get_invocation,
            methods=["GET"],
        )
        app.add_url_rule(
            "/v1/invocations/<invocation_id>/logs",
            "get_logs",
            self.get_logs,
            methods=["GET"],
        )
        app.add_url_rule(
            "/v1/invocations/<invocation_id>/cancel",
            "cancel_invocation",
            self.cancel,
            methods=["POST"],
        )

    # Invoking.

    @requires(Scope.INVOKE, "invoke functions")
    def invoke(self, caller: ApiKey, name: str) -> Response:
        payload = parse_call(read_json(required=False))
        wait_s = prefer_wait(self._max_wait_s)
        function = self.backends.store.get_function(caller.tenant, name)
        draft = _draft(function, idempotency_key())

        if wait_s is None:
            invocation = self._enqueue([draft], [payload])[0]
            return _accepted(invocation)

        # Registered before publishing, so even a runtime that finishes before
        # the broker's confirm arrives cannot slip its notification past us.
        deadline_s = time.monotonic() + wait_s
        with self.backends.hub.watch(draft.id) as watch:
            (invocation,) = self.backends.store.add_invocations([draft])
            replayed = invocation.id != draft.id
            if not replayed:
                invocation = self._publish_and_await(
                    invocation, payload, deadline_s, watch
                )
        if replayed:
            invocation = self._await(invocation, wait_s, None)

        applied = {"Preference-Applied": f"wait={format_seconds(wait_s)}"}
        if invocation.status.terminal:
            return json_response(invocation.to_api(), 200, applied)
        return _accepted(invocation, applied)

    @requires(Scope.INVOKE, "invoke functions")
    def invoke_batch(self, caller: ApiKey, name: str) -> Response:
        payloads = parse_batch(read_json(required=True), self._max_batch)
        key = idempotency_key()
        function = self.backends.store.get_function(caller.tenant, name)

        # One Idempotency-Key covers the batch; each item gets its own key
        # derived from it, so a retried batch replays item by item.
        drafts = [
            _draft(function, None if key is None else f"{key}#{index}")
            for index in range(len(payloads))
        ]
        kept = self._enqueue(drafts, payloads)
        return json_response(
            {
                "invocations": [
                    {"id": invocation.id, "status": invocation.status.value}
                    for invocation in kept
                ]
            },
            202,
        )

    def _enqueue(
        self, drafts: list[Invocation], payloads: list[bytes]
    ) -> list[Invocation]:
        """Record the drafts, then publish those not recorded before."""
        kept = self.backends.store.add_invocations(drafts)
        fresh = [
            (invocation, payload)
            for draft, invocation, payload in zip(drafts, kept, payloads, strict=True)
            if invocation.id == draft.id
        ]
        if fresh:
            self._publish(fresh)
        return kept

    def _publish_and_await(
        self, invocation: Invocation, payload: bytes, deadline_s: float, watch: Watch
    ) -> Invocation:
        """Publish one invocation and wait for it to finish, by the deadline.

        The confirm and the outcome are awaited together: the runtime often
        finishes a short invocation before the broker's confirm gets back,
        and a finished invocation proves its message got through.
        """
        fresh = [(invocation, payload)]
        publication = self.backends.broker.publish_nowait(self._bodies(fresh))
        publication.add_done_callback(watch.poke)
        while not publication.done():
            # The publication times out on its own; this only bounds the loop.
            watch.pause(PUBLISH_POLL_S)
            if watch.notified:
                try:
                    finished = self._load(invocation.id, invocation.tenant)
                except BackendUnavailable:
                    continue
                if finished.status.terminal:
                    _log_queued(fresh)
                    return finished
        self._confirm(fresh, publication)
        remaining_s = max(deadline_s - time.monotonic(), 0.0)
        return self._await(invocation, remaining_s, watch)

    def _bodies(self, fresh: Sequence[tuple[Invocation, bytes]]) -> list[bytes]:
        """The message bodies for the invocations, in bundles."""
        messages = [
            InvocationMessage(
                invocation.id,
                invocation.tenant,
                invocation.function,
                invocation.version,
                payload,
            )
            for invocation, payload in fresh
        ]
        size = self._bundle_size
        return [
            encode_bundle(messages[start : start + size])
            for start in range(0, len(messages), size)
        ]

    def _publish(self, fresh: Sequence[tuple[Invocation, bytes]]) -> None:
        self._confirm(fresh, self.backends.broker.publish_nowait(self._bodies(fresh)))

    def _confirm(
        self, fresh: Sequence[tuple[Invocation, bytes]], publication: Publication
    ) -> None:
        """Wait for the broker's confirm; on failure mark the invocations failed."""
        try:
            publication.wait()
        except Exception as exc:
            self._fail_unpublished([invocation for invocation, _ in fresh], exc)
            if isinstance(exc, BrokerUnavailable):
                raise Unavailable(
                    f"the broker could not confirm the invocation ({exc}); it was "
                    "recorded as failed, not queued. Retry in a moment"
                ) from exc
            raise

        _log_queued(fresh)

    def _fail_unpublished(self, invocations: list[Invocation], exc: Exception) -> None:
        """Mark invocations the broker did not confirm as failed, not queued."""
        first = invocations[0]
        fields = {
            "invocation_id": first.id,
            "function": first.function,
            "version": first.version,
            "tenant": first.tenant,
            "count": len(invocations),
        }
        kind = (
            "broker_unavailable" if isinstance(exc, BrokerUnavailable) else "internal"
        )
        logger.warning(
            "broker did not confirm %d invocation(s) of %s from %s on: %s",
            len(invocations),
            first.function,
            first.id,
            exc,
            extra=fields,
        )

        error = {"type": kind, "message": f"the invocation was not enqueued: {exc}"}
        try:
            self.backends.store.fail_queued(
                [invocation.id for invocation in invocations], error, time.time()
            )
        except Exception:
            logger.exception(
                "could not mark %d unpublished invocation(s) from %s failed; they "
                "stay queued without a message",
                len(invocations),
                first.id,
                extra=fields,
            )

    def _await(
        self, invocation: Invocation, wait_s: float, watch: Watch | None
    ) -> Invocation:
        """The accepted invocation once finished, or as it was if time runs out."""
        load = functools.partial(self._load, invocation.id, invocation.tenant)
        try:
            if watch is not None:
                return watch.wait(wait_s, load, check_first=False)
            return self.backends.hub.wait(invocation.id, wait_s, load)
        except BackendUnavailable as exc:
            # The invocation is accepted already: a 503 now would invite the
            # client to invoke it a second time.
            logger.warning(
                "stopped waiting for invocation %s: %s",
                invocation.id,
                exc,
                extra={"invocation_id": invocation.id, "tenant": invocation.tenant},
            )
            return invocation

    # Reading.

    @requires(Scope.READ, "read invocations")
    def get_invocation(self, caller: ApiKey, invocation_id: str) -> Response:
        wait_s = wait_param(request.args.get("wait"), self._max_wait_s)
        invocation = self._load(invocation_id, caller.tenant)
        if wait_s > 0 and not invocation.status.terminal:
            load = functools.partial(self._load, invocation_id, caller.tenant)
            invocation = self.backends.hub.wait(invocation_id, wait_s, load)
        return json_response(invocation.to_api())

    @requires(Scope.READ, "read invocations")
    def get_logs(self, caller: ApiKey, invocation_id: str) -> Response:
        invocation = self._load(invocation_id, caller.tenant)
        return json_response(
            {
                "id": invocation.id,
                "logs": invocation.logs,
                "truncated": invocation.logs_truncated,
            }
        )

    @requires(Scope.READ, "read invocations")
    def list_invocations(self, caller: ApiKey) -> Response:
        args = request.args
        status = status_param(args.get("status"))
        limit = limit_param(args.get("limit"))
        # One more than asked tells whether another page exists.
        page = self.backends.store.list_invocations(
            caller.tenant,
            function=args.get("function") or None,
            status=status,
            limit=limit + 1,
            before=args.get("before") or None,
        )
        cursor = page[limit - 1].id if len(page) > limit else None
        return json_response(
            {
                "invocations": [invocation.to_api() for invocation in page[:limit]],
                "next": cursor,
            }
        )

    def _load(self, invocation_id: str, tenant: str) -> Invocation:
        """The invocation from the cache when it holds it, else from the store."""
        doc = self._cached(invocation_id)
        if doc is not None and doc.get("tenant") == tenant:
            try:
                return Invocation.from_doc(doc)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning(
                    "cached invocation %s is malformed, reading the store: %s",
                    invocation_id,
                    exc,
                    extra={"invocation_id": invocation_id, "tenant": tenant},
                )
        return self.backends.store.get_invocation(invocation_id, tenant)

    def _cached(self, invocation_id: str) -> dict[str, Any] | None:
        try:
            return self.backends.cache.get(invocation_id)
        except Exception as exc:
            # The store has every record too; a cache outage only costs speed.
            now = time.monotonic()
            if now - self._cache_warned_at >= CACHE_WARNING_INTERVAL_S:
                self._cache_warned_at = now
                logger.warning(
                    "cache read failed, reading the store instead: %s",
                    exc,
                    extra={"invocation_id": invocation_id},
                )
            return None

    # Cancelling.

    @requires(Scope.INVOKE, "cancel invocations")
    def cancel(self, caller: ApiKey, invocation_id: str) -> Response:
        doc = read_json(required=False)
        if doc:
            check_fields(doc, frozenset(), "a cancel request")
        invocation = self.backends.store.cancel_invocation(
            caller.tenant, invocation_id, time.time()
        )
        logger.warning(
            "invocation %s of %s cancelled",
            invocation.id,
            invocation.function,
            extra={
                "invocation_id": invocation.id,
                "function": invocation.function,
                "version": invocation.version,
                "tenant": invocation.tenant,
            },
        )
        self._announce(invocation)
        return json_response(invocation.to_api())

    def _announce(self, invocation: Invocation) -> None:
        """Cache the finished record, which wakes its waiters in every process."""
        try:
            self.backends.cache.put(
                invocation.id, invocation.to_doc(), self._result_ttl_s
            )
        except Exception as exc:
            # Waiters still see it on their next read of the store.
            logger.warning(
                "could not cache cancelled invocation %s: %s",
                invocation.id,
                exc,
                extra={"invocation_id": invocation.id, "tenant": invocation.tenant},
            )


def _log_queued(fresh: Sequence[tuple[Invocation, bytes]]) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    for invocation, _ in fresh:
        logger.info(
            "invocation %s of %s version %d queued",
            invocation.id,
            invocation.function,
            invocation.version,
            extra={
                "invocation_id": invocation.id,
                "function": invocation.function,
                "version": invocation.version,
                "tenant": invocation.tenant,
            },
        )


def _draft(function: FunctionVersion, idempotency_key: str | None) -> Invocation:
    return Invocation(
        id=new_id("inv_"),
        tenant=function.tenant,
        function=function.name,
        version=function.version,
        idempotency_key=idempotency_key,
    )


def _accepted(
    invocation: Invocation, headers: dict[str, str] | None = None
) -> Response:
    # No Location header: the id is in the body, and Werkzeug's rewriting of
    # Location costs a tenth of this hot path.
    return json_response(
        {"id": invocation.id, "status": invocation.status.value}, 202, headers
    )
