"""Optional keys: `--api-key` for agents, `--admin-key` for rewards, reads, admin and export."""

from __future__ import annotations

import hmac

from fastapi import Request

from proxy.errors import ApiError


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request, key: str, what: str) -> None:
    given = _bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, f"missing or wrong {what}: send it as 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_agent_key(request: Request, settings) -> None:
    if settings.api_key:
        _check(request, settings.api_key, "API key")


def require_admin_key(request: Request, settings) -> None:
    """The admin key if one is set; else the agent key if one is set; else open."""
    if settings.admin_key:
        _check(request, settings.admin_key, "admin key")
    elif settings.api_key:
        _check(request, settings.api_key, "API key")
