"""The generation APIs the proxy serves, by path: what each records as its kind, where vLLM serves it, and how
its requests, answers, streams and errors translate.

Chat and completions go to vLLM as they are (their answers are vLLM's own bytes, only the proxy's injected fields
taken out). The Responses and Messages APIs are translated to chat completions, because vLLM returns exact token
ids and logprobs of every turn there, tool-call-only turns included (README: "Responses and Messages").

Each entry names its call shape (trainwire.call_shapes): what it records as `calls.kind`, and how the store, the
read API, export and the automatic rewards read what it recorded. Adding an API is a shape, a translation module
and one entry here (docs/architecture.md, "How to add …").
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from trainwire import call_shapes
from trainwire.call_shapes import CallShape
from trainwire.proxy import api_messages, api_responses
from trainwire.proxy.api_fields import FieldTable
from trainwire.proxy.errors import error_body as openai_error_body

Chunks = AsyncIterator[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Api:
    shape: CallShape  # how its calls are recorded and read back (calls.kind: shape.kind)
    upstream_path: str  # what the proxy sends to vLLM
    upstream_kind: str  # the shape of vLLM's answer: chat | completion
    error_body: Callable[[int, str, str | None, str | None], bytes]
    # Translated APIs only: the client's request -> vLLM's; vLLM's answer -> the client's; a stream of vLLM's
    # chunks -> the client's SSE bytes. `ids` are the call's (response id, created time).
    to_upstream: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    from_upstream: Callable[[dict[str, Any], dict[str, Any], "Ids"], dict[str, Any]] | None = None
    stream: Callable[[Chunks, dict[str, Any], "Ids"], AsyncIterator[bytes]] | None = None
    # Awaited before the first translation (a translator that loads a library lazily).
    ready: Callable[[], Awaitable[None]] | None = None
    # The SSE events that end a translated stream: the call is journaled before one of them leaves.
    stream_ends: tuple[bytes, ...] = ()
    # Translated APIs: what happens to each request field (proxy/api_fields.py); screened before `to_upstream`.
    fields: FieldTable | None = None

    @property
    def kind(self) -> str:
        """calls.kind of its calls."""
        return self.shape.kind

    @property
    def translated(self) -> bool:
        return self.to_upstream is not None


@dataclass(frozen=True, slots=True)
class Ids:
    response_id: str
    created_at: int

    @classmethod
    def of(cls, call_id: str) -> "Ids":
        return cls("resp_" + call_id.removeprefix("call_"), int(time.time()))

    @property
    def message_id(self) -> str:
        """The id of a Messages answer, in Anthropic's `msg_` form, from the same call id."""
        return "msg_" + self.response_id.removeprefix("resp_")


def _anthropic_error(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return api_messages.error_body(status, message)


def _responses_from(chat: dict[str, Any], request: dict[str, Any], ids: Ids) -> dict[str, Any]:
    return api_responses.from_chat(chat, request, response_id=ids.response_id, created_at=ids.created_at)


async def _responses_stream(chunks: Chunks, request: dict[str, Any], ids: Ids) -> AsyncIterator[bytes]:
    events = api_responses.ResponsesStream(request, response_id=ids.response_id, created_at=ids.created_at)
    yield events.start()
    async for chunk in chunks:
        out = events.feed(chunk)
        if out:
            yield out
    yield events.finish()


async def _messages_stream(chunks: Chunks, request: dict[str, Any], ids: Ids) -> AsyncIterator[bytes]:
    first = True
    async for event in api_messages.stream(chunks, request):
        if first:  # message_start: the message id the record has too, not the adapter's random one
            event, first = api_messages.with_message_id(event, ids.message_id), False
        yield event


CHAT = Api(call_shapes.chat.SHAPE, "/v1/chat/completions", "chat", openai_error_body)
COMPLETIONS = Api(call_shapes.completion.SHAPE, "/v1/completions", "completion", openai_error_body)
RESPONSES = Api(
    call_shapes.responses.SHAPE,
    "/v1/chat/completions",
    "chat",
    openai_error_body,
    to_upstream=api_responses.to_chat,
    from_upstream=_responses_from,
    stream=_responses_stream,
    stream_ends=(b"event: response.completed", b"event: response.incomplete", b"event: response.failed"),
    fields=api_responses.FIELDS,
)
MESSAGES = Api(
    call_shapes.messages.SHAPE,
    "/v1/chat/completions",
    "chat",
    _anthropic_error,
    to_upstream=api_messages.to_chat,
    from_upstream=lambda chat, request, ids: {**api_messages.from_chat(chat, request), "id": ids.message_id},
    stream=_messages_stream,
    ready=api_messages.ready,
    stream_ends=(b"event: message_stop",),
    fields=api_messages.FIELDS,
)

BY_PATH: dict[str, Api] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
}
