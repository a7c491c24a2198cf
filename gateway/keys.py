"""The key management API: create, list and revoke API keys (admin scope)."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, request

from conveyor_core.records import ApiKey, Scope, hash_api_key, new_api_key, new_id
from gateway.auth import requires
from gateway.context import Backends
from gateway.responses import json_response, no_content
from gateway.validation import (
    KEY_FIELDS,
    check_fields,
    parse_scopes,
    parse_tenant,
    read_json,
)

logger = logging.getLogger(__name__)


class KeysApi:
    """Views of ``/v1/keys``; a key's secret is shown once, at creation."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    def register(self, app: Flask) -> None:
        app.add_url_rule("/v1/keys", "create_key", self.create, methods=["POST"])
        app.add_url_rule("/v1/keys", "list_keys", self.list_keys, methods=["GET"])
        app.add_url_rule(
            "/v1/keys/<key_id>", "revoke_key", self.revoke, methods=["DELETE"]
        )

    @requires(Scope.ADMIN, "manage API keys")
    def create(self, caller: ApiKey) -> Response:
        doc = read_json(required=True)
        check_fields(doc, KEY_FIELDS, "a key")
        tenant = parse_tenant(doc.get("tenant", caller.tenant))
        scopes = parse_scopes(doc.get("scopes"))

        secret = new_api_key()
        key = ApiKey(
            id=new_id("key_"),
            tenant=tenant,
            scopes=scopes,
            key_hash=hash_api_key(secret),
            created_at=time.time(),
        )
        self.backends.store.add_key(key)
        logger.info(
            "key %s created for tenant %s with scopes %s",
            key.id,
            tenant,
            ",".join(scopes),
            extra={"key_id": key.id, "tenant": tenant, "by_key": caller.id},
        )
        return json_response(
            {"id": key.id, "key": secret, "tenant": tenant, "scopes": scopes}, 201
        )

    @requires(Scope.ADMIN, "manage API keys")
    def list_keys(self, caller: ApiKey) -> Response:
        tenant = self._tenant(caller)
        keys = self.backends.store.list_keys(tenant)
        return json_response({"keys": [key.to_api() for key in keys]})

    @requires(Scope.ADMIN, "manage API keys")
    def revoke(self, caller: ApiKey, key_id: str) -> Response:
        tenant = self._tenant(caller)
        self.backends.store.revoke_key(tenant, key_id, time.time())
        logger.info(
            "key %s of tenant %s revoked",
            key_id,
            tenant,
            extra={"key_id": key_id, "tenant": tenant, "by_key": caller.id},
        )
        return no_content()

    def _tenant(self, caller: ApiKey) -> str:
        """The ``?tenant=`` an admin names, by default its own."""
        raw = request.args.get("tenant")
        return caller.tenant if raw is None else parse_tenant(raw, "'tenant'")
