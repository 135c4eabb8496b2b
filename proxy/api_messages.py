"""Anthropic's Messages API (`POST /v1/messages`) on the policy, trainable.

vLLM serves `/v1/messages` itself but returns neither token ids nor logprobs there, so the proxy translates each
Messages request into a chat-completions request (where vLLM returns both), and the chat answer back into
Anthropic's shapes: the response, the streaming event sequence, `tool_use` / `tool_result` blocks, the system
prompt. The translation is litellm's Anthropic adapter (`AnthropicAdapter`), the one litellm's own proxy runs for
`/v1/messages` on non-Anthropic models: it is maintained against both APIs as they change, takes and returns plain
dicts (and wraps any async iterator of chat chunks for streams), so the proxy keeps its own upstream call, and
with it the token ids. litellm takes about 3 s to import: it is imported on the first Messages request, in a
thread (other requests are served meanwhile), so a proxy whose agents never use this API never pays for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson

from trainwire.proxy.api_fields import FieldTable, ignored, refused, translated
from trainwire.proxy.errors import ApiError
from trainwire.proxy.litellm_json import drop_none

log = logging.getLogger("trainwire.messages")


def _thinks(value: Any) -> bool:
    return not (isinstance(value, dict) and value.get("type") == "disabled")


_ANTHROPIC_SIDE = "only Anthropic's own routing, billing, caching or diagnostics uses it"
_LITELLM = "translated by litellm's Anthropic adapter"

# Every top-level field of a Messages request (the `anthropic` SDK's MessageCreateParams, its beta variant, and the
# sampling fields older SDKs and Claude Code still send): what the proxy does with it (proxy/api_fields.py).
FIELDS = FieldTable(
    "Messages API",
    {
        "model": translated("the policy's name"),
        "messages": translated(f"-> chat messages ({_LITELLM}; cache_control on blocks is dropped)"),
        "max_tokens": translated("-> chat max_tokens"),
        "system": translated("-> the system message (cache_control on its blocks is dropped)"),
        "tools": translated(f"-> chat tools ({_LITELLM})"),
        "tool_choice": translated(f"-> chat tool_choice ({_LITELLM})"),
        "stop_sequences": translated("-> chat stop"),
        "stream": translated("Anthropic's event stream from the chat stream"),
        "temperature": translated("-> chat temperature (then --sampling-policy)"),
        "top_p": translated("-> chat top_p (then --sampling-policy)"),
        "top_k": translated("-> chat top_k (then --sampling-policy)"),
        "output_config": translated("output_config.format -> chat response_format"),
        "output_format": translated("-> chat response_format (the older name of output_config.format)"),
        "metadata": ignored("request metadata (user_id): not sent to the model"),
        "cache_control": ignored("Anthropic's prompt cache; vLLM caches prefixes by itself"),
        "thinking": ignored(
            "the policy has no reasoning parser: an enabled or adaptive thinking config gets an answer without "
            "thinking blocks (disabled is accepted silently)",
            applies=_thinks,
        ),
        "betas": ignored("beta features of Anthropic's API (the SDK sends them as the anthropic-beta header)"),
        "context_management": ignored(
            "server-side context editing; the policy sees the messages as sent (an overflow fails with a 400)"
        ),
        "container": ignored("the container of Anthropic's hosted code execution tool, which does not run here"),
        "service_tier": ignored(_ANTHROPIC_SIDE),
        "speed": ignored(_ANTHROPIC_SIDE),
        "inference_geo": ignored(_ANTHROPIC_SIDE),
        "diagnostics": ignored(_ANTHROPIC_SIDE),
        "user_profile_id": ignored(_ANTHROPIC_SIDE),
        "workspace_id": ignored(_ANTHROPIC_SIDE),
        "billing_policy": ignored(_ANTHROPIC_SIDE),
        "fallback_credit_token": ignored(_ANTHROPIC_SIDE),
        "fallbacks": ignored("substitute models after a refusal; the policy is the only model here"),
        "thread": refused(
            "thread is not supported: trainwire keeps no server-side conversation state; send the whole "
            "conversation in `messages`"
        ),
        "compaction": refused(
            "compaction requests are not supported: the policy does not summarise conversations into compaction "
            "blocks; send the conversation in `messages`"
        ),
        "mcp_servers": refused(
            "mcp_servers is not supported: the policy runs only client tools, which the agent executes; "
            "connect MCP servers in the agent instead"
        ),
    },
    ignored_headers=("anthropic-beta",),
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}

_lock = threading.Lock()
_adapter: Any = None


def _load():
    """litellm's adapter, imported once (thread-safe: `ready` imports it in a thread)."""
    global _adapter
    with _lock:
        if _adapter is None:
            # No network at import: litellm would otherwise fetch its model price list from GitHub.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            try:
                import litellm

                try:
                    from litellm.llms.anthropic.messages.adapters.transformation import AnthropicAdapter
                except ImportError:  # where releases before the move keep it
                    from litellm.llms.anthropic.experimental_pass_through.adapters.transformation import (
                        AnthropicAdapter,
                    )
            except ImportError as exc:
                raise ApiError(
                    501,
                    f"/v1/messages needs litellm, which is not installed ({exc}); pip install 'trainwire[routes]'",
                    code="not_implemented",
                ) from None
            litellm.suppress_debug_info = True
            for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
                logging.getLogger(name).setLevel(logging.WARNING)
            _adapter = AnthropicAdapter()
    return _adapter


_loading: asyncio.Future | None = None


async def ready() -> None:
    """Before the first translation: import litellm in a thread, once, then move what it created out of the
    cyclic GC's reach, as the app does with everything made at start-up (proxy/app.py: _tune_gc)."""
    global _loading
    if _adapter is not None:
        return
    if _loading is None:
        _loading = asyncio.ensure_future(asyncio.to_thread(_load))
        _loading.add_done_callback(lambda f: f.exception() or __import__("gc").freeze())
    try:
        await asyncio.shield(_loading)
    except ApiError:
        _loading = None  # not installed: say so on every request, and try again if it gets installed
        raise


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}})


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request, screened by `FIELDS` (proxy/api_fields.py: only translated fields, no nulls) -> the
    chat-completions request for vLLM."""
    for name, kind in (("messages", list), ("max_tokens", int)):
        if not isinstance(body.get(name), kind) or isinstance(body.get(name), bool):
            raise ApiError(
                400,
                f"{name}: Field required ({'a list of messages' if kind is list else 'an integer'})",
                param=name,
                code="invalid_value",
            )
    if not body["messages"]:
        raise ApiError(400, "messages: at least one message is required", param="messages", code="invalid_value")
    try:
        chat = _load().translate_completion_input_params(dict(body))
    except ApiError:
        raise
    except Exception as exc:  # litellm's validation: the request is not a Messages request it understands
        raise ApiError(
            400, f"not a valid Messages request: {str(exc).splitlines()[0][:300]}", code="invalid_value"
        ) from None
    # litellm leaves None-valued keys (thinking_blocks, ...) that a chat server need not accept.
    out = drop_none(dict(chat))
    out["stream"] = bool(body.get("stream"))
    return out


def from_chat(chat: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """vLLM's chat completion (without the proxy's injected fields) -> a Messages response."""
    from litellm import ModelResponse

    if not chat.get("usage"):  # the adapter reads it; an aborted stream may end before vLLM sent it
        chat = {**chat, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    answer = _load().translate_completion_output_params(ModelResponse(**chat))
    out = orjson.loads(orjson.dumps(answer, default=_plain))
    out["model"] = request.get("model", out.get("model"))
    return out


async def stream(chunks: AsyncIterator[dict[str, Any]], request: dict[str, Any]) -> AsyncIterator[bytes]:
    """Chat chunks -> Anthropic's SSE events (message_start, content_block_start/delta/stop, message_delta,
    message_stop), each as it can be sent."""
    from litellm.types.utils import ModelResponseStream

    async def objects():
        async for chunk in chunks:
            yield ModelResponseStream(**chunk)

    events = _load().translate_completion_output_params_streaming(objects(), model=request.get("model") or "policy")
    async for event in events:
        yield event if isinstance(event, bytes) else str(event).encode()


def with_message_id(event: bytes, message_id: str) -> bytes:
    """A `message_start` event with its message id replaced (other events pass unchanged)."""
    head, sep, data = event.partition(b"data: ")
    if not sep or b'"message_start"' not in head + data[:40]:
        return event
    body, tail = data.rstrip(b"\n"), data[len(data.rstrip(b"\n")) :]
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return event
    if isinstance(parsed.get("message"), dict):
        parsed["message"]["id"] = message_id
    return head + sep + orjson.dumps(parsed) + (tail or b"\n\n")


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump()
    raise TypeError(f"cannot serialize {type(value).__name__}")
