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

from trainwire.proxy.errors import ApiError
from trainwire.proxy.litellm_json import drop_none

log = logging.getLogger("trainwire.messages")

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
    """A Messages request -> the chat-completions request for vLLM."""
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
    out.pop("metadata", None)
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
