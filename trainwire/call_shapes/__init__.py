"""One table of call shapes: for each kind of API call the proxy records (`calls.kind`), how its recorded JSON is
read everywhere it is read (base.py: `CallShape`).

Readers: the proxy's generation APIs (proxy/apis.py: each `Api` names its shape), the call deltas
(store/call_deltas.py: the message list a call shares with an earlier one), the read API
(store/reads/: a call's `api`, `input`, `input_messages`, `output`), `trainwire export` (store/export.py) and the
automatic rewards (proxy/air_rules.py). Adding a kind of call is one module here with its `SHAPE`, one entry in
`SHAPES`, and its translation module and `Api` entry in the proxy; tests/unit/test_call_shapes.py fails for a kind
the proxy records without a shape.

The table sits in the bottom layer, beside the settings and the records, so the store and the proxy read one
definition without importing each other."""

from __future__ import annotations

from trainwire.call_shapes import chat, completion, messages, responses
from trainwire.call_shapes.base import CallShape, ExportInput, content_text, message_text, tool_names


def _nothing(value: object) -> None:
    return None


# Pass-through calls (proxy/openai_routes.py: any other /v1 path, sent upstream as it is): nothing to read.
OTHER = CallShape(
    kind="other",
    api="passthrough",
    list_key=None,
    messages=lambda request: [],
    last_input=_nothing,
    answer=_nothing,
    export=None,
)

SHAPES: dict[str, CallShape] = {
    s.kind: s for s in (chat.SHAPE, completion.SHAPE, responses.SHAPE, messages.SHAPE, OTHER)
}


def shape_of(kind: str | None) -> CallShape:
    """The shape of a stored kind; one this code does not know (written by a newer proxy) reads as nothing,
    with its kind as its API's name."""
    shape = SHAPES.get(kind or "")
    if shape is None:
        return CallShape(str(kind), str(kind), None, lambda request: [], _nothing, _nothing, None)
    return shape


def call_api(kind: str, route: str | None = None) -> str:
    """The API of a call as the read API names it: chat | completions | responses | messages | passthrough (a
    pass-through route whatever its kind)."""
    return "passthrough" if route == "passthrough" else shape_of(kind).api


def input_messages(kind: str, request: object) -> list[dict]:
    """The whole input of a call as chat-like messages (CallShape.messages); [] when the request is not JSON."""
    return shape_of(kind).messages(request) if isinstance(request, dict) else []


def call_input(kind: str, request: object) -> dict | None:
    """The input this turn answered (CallShape.last_input)."""
    return shape_of(kind).last_input(request) if isinstance(request, dict) else None


def call_output(kind: str, response: object) -> dict | None:
    """The assistant's answer (CallShape.answer)."""
    return shape_of(kind).answer(response) if isinstance(response, dict) else None


__all__ = [
    "OTHER",
    "SHAPES",
    "CallShape",
    "ExportInput",
    "call_api",
    "call_input",
    "call_output",
    "content_text",
    "input_messages",
    "message_text",
    "shape_of",
    "tool_names",
]
