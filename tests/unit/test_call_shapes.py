"""The call-shapes table (trainwire/call_shapes): every kind of call the proxy can record has a shape, and every
reader (the proxy's APIs, the call deltas, the read API, export) takes what it knows of a kind from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainwire.call_shapes import SHAPES, call_api, call_input, call_output, input_messages, shape_of
from trainwire.proxy.apis import BY_PATH
from trainwire.store.call_deltas import list_key
from trainwire.store.export import EXPORTED_KINDS

ROOT = Path(__file__).resolve().parents[2]


def _recorded_kinds() -> set[str]:
    """Every calls.kind the proxy can record: its generation APIs' kinds, and every `kind=` a call is built with
    in the proxy's source (a literal there would be a kind the table might not know)."""
    kinds = {api.kind for api in BY_PATH.values()}
    for py in (ROOT / "proxy").glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "kind":
                assert not isinstance(node.value, ast.Constant), f"{py.name}: a literal kind, not a shape's"
    from trainwire.proxy import openai_routes

    kinds.add(openai_routes.OTHER.kind)
    return kinds


def test_every_kind_the_proxy_records_has_a_shape():
    kinds = _recorded_kinds()
    assert kinds >= {"chat", "completion", "responses", "messages", "other"}
    for kind in kinds:
        assert kind in SHAPES, f"calls.kind {kind!r} has no call shape (trainwire/call_shapes)"
        assert SHAPES[kind].kind == kind


def test_every_api_names_the_shape_of_its_kind():
    for path, api in BY_PATH.items():
        assert SHAPES[api.kind] is api.shape, path


def test_the_models_comment_lists_the_table():
    # The column's comment is what a reader of the schema sees: it must name every kind there is.
    source = (ROOT / "store" / "models.py").read_text()
    line = next(ln for ln in source.splitlines() if "kind: Mapped[str]" in ln and "chat" in ln)
    assert set(line.split("#", 1)[1].replace("|", " ").split()) == set(SHAPES)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_readers_take_the_table(kind):
    shape = SHAPES[kind]
    assert list_key(kind) == shape.list_key
    assert call_api(kind) == shape.api and call_api(kind, "passthrough") == "passthrough"
    assert (kind in EXPORTED_KINDS) == (shape.export is not None)
    for junk in (None, "x", [1], {}, {"messages": 5, "input": {}, "choices": "no", "output": 1, "content": 2}):
        input_messages(kind, junk), call_input(kind, junk), call_output(kind, junk)  # never raise


def test_an_unknown_kind_reads_as_nothing():
    shape = shape_of("from_the_future")
    assert shape.api == "from_the_future" and shape.list_key is None and shape.export is None
    assert input_messages("from_the_future", {"messages": [{"role": "user"}]}) == []
    assert call_output("from_the_future", {"choices": [{"message": {"content": "x"}}]}) is None


def test_export_shapes_translated_apis_as_chat():
    responses = {
        "instructions": "be brief",
        "input": [
            {"type": "message", "role": "user", "content": "2+2?"},
            {"type": "function_call", "call_id": "c1", "name": "calc", "arguments": '{"e": "2+2"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "4"},
        ],
        "tools": [{"type": "function", "name": "calc", "parameters": {"type": "object"}}, {"type": "web_search"}],
    }
    given = SHAPES["responses"].export(responses)
    assert given.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"e": "2+2"}'}}],
        },
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ]
    assert given.tools == [
        {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}},
        {"type": "web_search"},
    ]
    anthropic = {
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": [{"name": "calc", "description": "adds", "input_schema": {"type": "object"}}],
    }
    given = SHAPES["messages"].export(anthropic)
    assert given.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert given.tools == [
        {"type": "function", "function": {"name": "calc", "description": "adds", "parameters": {"type": "object"}}}
    ]


def test_strict_tools_and_the_tools_as_served():
    from trainwire.call_shapes.chat import has_strict_tools, without_strict

    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {}, "strict": True}},
        {"type": "function", "function": {"name": "b", "strict": False}},
        "not a tool",
    ]
    assert has_strict_tools(tools) and not has_strict_tools(tools[1:]) and not has_strict_tools(None)
    served = without_strict(tools)
    assert served == [
        {"type": "function", "function": {"name": "a", "parameters": {}}},
        {"type": "function", "function": {"name": "b"}},
        "not a tool",
    ]
    assert tools[0]["function"]["strict"] is True  # new dicts: the recorded request is not changed
    assert without_strict(None) is None
