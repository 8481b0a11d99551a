"""Authentication of every request: a bearer API key, resolved to a tenant and its scopes."""

from __future__ import annotations

from fastapi import Request

from conveyor.auth import Principal, bearer_token
from conveyor.problems import forbidden, unauthorized
from services.gateway.state import GatewayState


async def require_principal(request: Request, state: GatewayState) -> Principal:
    """The request's principal, or a 401: every request is authenticated before anything else."""
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise unauthorized("send an API key as `Authorization: Bearer <key>`")
    principal = await state.authenticator.principal(token)
    if principal is None:
        raise unauthorized("unknown or revoked API key")
    return principal


def require_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise forbidden(scope)
