"""litellm's objects as the JSON a client of the real API would get.

litellm's translations and pydantic models keep optional keys whose value is None (``thinking_blocks``, empty
delta fields); OpenAI and Anthropic leave such keys out, and a chat server need not accept them."""

from __future__ import annotations

from typing import Any


def drop_none(value: Any) -> Any:
    """``value`` without the None-valued keys of its dicts, at any depth."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value
