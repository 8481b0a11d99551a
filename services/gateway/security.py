"""Authentication of every request: a bearer API key, resolved to a tenant and its scopes."""

from __future__ import annotations

from fastapi import Request

from conveyor.auth import Forbidden, Principal, Unauthenticated, bearer_token, resolve_principal
from conveyor.problems import forbidden, unauthorized
from services.gateway.state import GatewayState


async def require_principal(request: Request, state: GatewayState, scope: str | None = None) -> Principal:
    """The request's principal, holding `scope` if one is named; else a 401 (no key, or an unknown or
    revoked one) or a 403 (the key lacks the scope). Every request is authenticated before anything
    else."""
    token = bearer_token(request.headers.get("authorization"))
    try:
        return await resolve_principal(state.authenticator, token, scope=scope)
    except Unauthenticated as exc:
        if not exc.presented:
            raise unauthorized("send an API key as `Authorization: Bearer <key>`") from None
        raise unauthorized("unknown or revoked API key") from None
    except Forbidden as exc:
        raise forbidden(exc.scope) from None
