"""Bearer-key authentication and scope checks.

A key is looked up in the store on every request, never cached, so a revoked
key is refused from the next request on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import g, request

from conveyor_core.records import ApiKey, Scope, hash_api_key
from conveyor_core.store import Store
from gateway.errors import Forbidden, Unauthorized

View = TypeVar("View", bound=Callable[..., Any])


def authenticate(store: Store) -> ApiKey:
    """The unrevoked key the request carries; raises Unauthorized otherwise."""
    header = request.environ.get("HTTP_AUTHORIZATION")
    if not header:
        raise Unauthorized(
            "no API key was sent; add the header 'Authorization: Bearer <key>'"
        )

    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized(
            "the Authorization header is not of the form 'Bearer <key>'; "
            "send the API key after the word Bearer",
            invalid_token=True,
        )

    key = store.find_key(hash_api_key(token))
    if key is None or key.revoked_at is not None:
        raise Unauthorized(
            "the API key is unknown or revoked; ask an admin for a valid key",
            invalid_token=True,
        )
    g.tenant = key.tenant
    return key


def check_scope(key: ApiKey, scope: Scope, action: str) -> None:
    """Raise Forbidden unless the key has the scope (admin implies every scope)."""
    scopes = key.scopes
    if scope.value in scopes or Scope.ADMIN.value in scopes:
        return
    raise Forbidden(
        f"this API key lacks the {scope.value!r} scope, which is needed to "
        f"{action}; it has {', '.join(scopes) or 'none'}. Use a key with the "
        f"{scope.value!r} or 'admin' scope"
    )


def requires(scope: Scope, action: str) -> Callable[[View], View]:
    """Authenticate a view method and check its scope; it gets the key first.

    The decorated method belongs to an object whose ``backends.store`` is the
    store to look keys up in.
    """

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def guarded(self: Any, **path: Any) -> Any:
            key = authenticate(self.backends.store)
            check_scope(key, scope, action)
            return view(self, key, **path)

        return guarded  # type: ignore[return-value]

    return decorate
