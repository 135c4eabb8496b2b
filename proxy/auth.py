"""Optional keys: `--api-key` for agents, `--admin-key` for rewards, reads, admin and export."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from trainwire.proxy.errors import ApiError


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return headers.get("x-api-key")


def _check(headers: Mapping[str, str], key: str, what: str) -> None:
    given = _bearer(headers)
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(
            401,
            f"missing or wrong {what}: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_agent_key(headers: Mapping[str, str], settings) -> None:
    if settings.api_key:
        _check(headers, settings.api_key, "API key")


def require_admin_key(headers: Mapping[str, str], settings) -> None:
    """The admin key if one is set; else the agent key if one is set; else open."""
    if settings.admin_key:
        _check(headers, settings.admin_key, "admin key")
    elif settings.api_key:
        _check(headers, settings.api_key, "API key")
