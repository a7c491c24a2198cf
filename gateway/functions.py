"""The function registry API: upload versions, list, describe and delete."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

from flask import Flask, Response, request

from conveyor_core.records import ApiKey, FunctionVersion, Scope
from gateway.auth import requires
from gateway.context import Backends
from gateway.responses import json_response, no_content
from gateway.validation import parse_function, read_json, version_param

logger = logging.getLogger(__name__)


class FunctionsApi:
    """Views of ``/v1/functions``; each upload is a new immutable version."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    def register(self, app: Flask) -> None:
        app.add_url_rule(
            "/v1/functions", "create_function", self.create, methods=["POST"]
        )
        app.add_url_rule(
            "/v1/functions", "list_functions", self.list_functions, methods=["GET"]
        )
        app.add_url_rule(
            "/v1/functions/<name>", "get_function", self.describe, methods=["GET"]
        )
        app.add_url_rule(
            "/v1/functions/<name>", "delete_function", self.delete, methods=["DELETE"]
        )

    @requires(Scope.DEPLOY, "register functions")
    def create(self, caller: ApiKey) -> Response:
        spec = parse_function(read_json(required=True), self.backends.settings)
        draft = FunctionVersion(
            tenant=caller.tenant,
            name=spec.name,
            version=0,
            source=spec.source,
            entrypoint=spec.entrypoint,
            timeout_s=spec.timeout_s,
            memory_mb=spec.memory_mb,
            env=spec.env,
            created_at=time.time(),
            kind=spec.kind,
        )
        function = self.backends.store.add_function_version(draft)

        logger.info(
            "function %s version %d registered for tenant %s",
            function.name,
            function.version,
            function.tenant,
            extra={
                "function": function.name,
                "version": function.version,
                "tenant": function.tenant,
            },
        )
        location = f"/v1/functions/{quote(function.name)}?version={function.version}"
        return json_response(
            {"name": function.name, "version": function.version},
            201,
            {"Location": location},
        )

    @requires(Scope.READ, "read functions")
    def list_functions(self, caller: ApiKey) -> Response:
        summaries = self.backends.store.list_functions(caller.tenant)
        return json_response({"functions": [s.to_api() for s in summaries]})

    @requires(Scope.READ, "read functions")
    def describe(self, caller: ApiKey, name: str) -> Response:
        version = version_param(request.args.get("version"))
        store = self.backends.store
        function = store.get_function(caller.tenant, name, version)
        doc = function.to_api()
        doc["versions"] = store.count_versions(caller.tenant, name)
        return json_response(doc)

    @requires(Scope.DEPLOY, "delete functions")
    def delete(self, caller: ApiKey, name: str) -> Response:
        self.backends.store.delete_function(caller.tenant, name)
        logger.info(
            "function %s of tenant %s deleted",
            name,
            caller.tenant,
            extra={"function": name, "tenant": caller.tenant},
        )
        return no_content()
