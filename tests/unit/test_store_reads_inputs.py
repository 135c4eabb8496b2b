"""A call's whole input, tools and answer, the same for every API the proxy serves: input_messages, tool_names,
call_api, and call_input / call_output for Responses and Anthropic Messages calls (pure functions of the
recorded JSON). The Responses and Messages inputs are checked against the proxy's own translations to chat,
so the dashboard shows what the policy was sent."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainwire.call_shapes import call_api, call_input, call_output, input_messages, message_text, tool_names
from trainwire.call_shapes.chat import messages as chat_messages
from trainwire.store.read_models import CallInput, CallOutput, InputMessage

CHAT_TOOLS = [
    {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "search"}},
]


def test_api_names():
    assert [call_api(k) for k in ("chat", "completion", "responses", "messages", "other")] == [
        "chat",
        "completions",
        "responses",
        "messages",
        "passthrough",
    ]
    assert call_api("chat", "passthrough") == "passthrough" and call_api("chat", "frozen") == "chat"
    assert call_api("future", "policy") == "future"


def test_message_text_keeps_a_trace_of_every_part():
    assert message_text(None) is None and message_text("plain") == "plain"
    assert (
        message_text(
            [
                {"type": "text", "text": "look: "},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "refusal", "refusal": "no"},
                "raw",
                {"no": "type"},
                7,
            ]
        )
        == "look: [image_url]noraw[part]"
    )
    assert message_text({"weird": 1}) == '{"weird":1}'


def test_chat_input_is_every_message_with_tool_calls_and_results():
    request = {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": [{"type": "text", "text": "2+2?"}, {"type": "image_url", "image_url": {}}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "tc-1", "type": "function", "function": {"name": "calculator", "arguments": '{"e": "2+2"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "tc-1", "content": [{"type": "text", "text": "4"}]},
            {"role": "assistant", "content": "old", "function_call": {"name": "legacy", "arguments": "{}"}},
            "junk",
        ],
        "tools": CHAT_TOOLS,
        "functions": [{"name": "legacy"}],
    }
    assert input_messages("chat", request) == [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "2+2?[image_url]"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "tc-1", "name": "calculator", "arguments": '{"e": "2+2"}'}],
        },
        {"role": "tool", "content": "4", "tool_call_id": "tc-1"},
        {"role": "assistant", "content": "old", "tool_calls": [{"id": None, "name": "legacy", "arguments": "{}"}]},
    ]
    assert tool_names(request) == ["calculator", "search", "legacy"]


RESPONSES = {
    "model": "policy",
    "instructions": "You are terse.",
    "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
        {"type": "function", "name": "calculator"},
    ],
    "input": [
        {"role": "user", "content": "Weather in Paris, and 2+2?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "fc_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "fc_2", "name": "calculator", "arguments": '{"e": "2+2"}'},
        {"type": "function_call_output", "call_id": "fc_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "fc_2", "output": [{"type": "input_text", "text": "4"}]},
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Be brief."}, {"type": "input_text", "text": " Really."}],
        },
    ],
}


def test_responses_input_is_instructions_then_items():
    assert input_messages("responses", RESPONSES) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris, and 2+2?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "fc_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"id": "fc_2", "name": "calculator", "arguments": '{"e": "2+2"}'},
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "fc_1"},
        {"role": "tool", "content": "4", "tool_call_id": "fc_2"},
        {"role": "developer", "content": "Be brief. Really."},
    ]
    assert tool_names(RESPONSES) == ["get_weather", "calculator"]
    assert input_messages("responses", {"input": "hi"}) == [{"role": "user", "content": "hi"}]
    # A recorded request the proxy refused keeps what it held, the unknown item whole.
    odd = {"input": [{"type": "item_reference", "id": "msg_1"}, {"type": "function_call", "name": "f"}, 3]}
    assert input_messages("responses", odd) == [
        {"role": "item_reference", "content": '{"type":"item_reference","id":"msg_1"}'},
        {"role": "assistant", "content": None, "tool_calls": [{"id": None, "name": "f", "arguments": None}]},
    ]
    assert tool_names({"tools": [{"type": "web_search"}]}) == ["web_search"]


def test_responses_input_is_what_the_proxy_sends_vllm():
    from trainwire.proxy.api_responses import to_chat

    sent = chat_messages(to_chat(RESPONSES))
    shown = [{**m, "role": "system"} if m["role"] == "developer" else m for m in input_messages("responses", RESPONSES)]
    assert shown == sent


ANTHROPIC = {
    "model": "policy",
    "max_tokens": 256,
    "system": [{"type": "text", "text": "You are a calculator."}],
    "tools": [
        {"name": "calc", "description": "evaluate", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},
    ],
    "messages": [
        {"role": "user", "content": "what is 2+2 and 3+3?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two sums", "signature": "x"},
                {"type": "text", "text": "Let me compute."},
                {"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {"e": "2+2"}},
                {"type": "tool_use", "id": "toolu_2", "name": "calc", "input": {"e": "3+3", "note": "ünï"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "4"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "6"}]},
                {"type": "text", "text": "thanks"},
            ],
        },
    ],
}


def test_anthropic_input_is_system_then_blocks_in_order():
    assert input_messages("messages", ANTHROPIC) == [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "what is 2+2 and 3+3?"},
        {
            "role": "assistant",
            "content": "Let me compute.",
            "tool_calls": [
                {"id": "toolu_1", "name": "calc", "arguments": '{"e": "2+2"}'},
                {"id": "toolu_2", "name": "calc", "arguments": json.dumps({"e": "3+3", "note": "ünï"})},
            ],
        },
        {"role": "tool", "content": "4", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "6", "tool_call_id": "toolu_2"},
        {"role": "user", "content": "thanks"},
    ]
    assert tool_names(ANTHROPIC) == ["calc", "web_search"]
    assert input_messages("messages", {"system": "S", "messages": [{"role": "user", "content": []}]}) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": ""},
    ]
    # text after a tool result stays after it
    later = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "tool_result", "tool_use_id": "t"},
                    {"type": "image", "source": {}},
                ],
            }
        ]
    }
    assert input_messages("messages", later) == [
        {"role": "user", "content": "a"},
        {"role": "tool", "content": None, "tool_call_id": "t"},
        {"role": "user", "content": "[image]"},
    ]


def test_anthropic_input_is_what_the_proxy_sends_vllm(monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # as the proxy imports it: no network
    pytest.importorskip("litellm")
    from trainwire.proxy.api_messages import to_chat

    request = {**ANTHROPIC, "tools": ANTHROPIC["tools"][:1]}
    assert input_messages("messages", request) == chat_messages(to_chat(request))


def test_completions_and_pass_through():
    assert input_messages("completion", {"prompt": "Once"}) == [{"role": "prompt", "content": "Once"}]
    assert input_messages("completion", {"prompt": [1, 2]}) == [{"role": "prompt", "content": "[1,2]"}]
    assert input_messages("completion", {}) == [] and tool_names({"prompt": "x"}) == []
    assert input_messages("other", {"input": "embed me"}) == []
    for junk in (None, "text", [1], 5):
        assert input_messages("chat", junk) == [] and tool_names(junk) == []


def test_call_input_and_output_of_responses():
    assert call_input("responses", RESPONSES) == {"role": "tool", "content": "4", "tool_call_id": "fc_2"}
    assert call_input("responses", {"input": "hi", "instructions": "s"}) == {"role": "user", "content": "hi"}
    response = {
        "object": "response",
        "output": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}], "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 4."}]},
            {"type": "function_call", "call_id": "fc_9", "name": "calculator", "arguments": "{}"},
        ],
    }
    assert call_output("responses", response) == {
        "content": "It is 4.",
        "reasoning_content": "think",
        "tool_calls": [{"id": "fc_9", "name": "calculator", "arguments": "{}"}],
    }
    assert call_output("responses", {"error": {"message": "bad"}}) == {"content": None}


def test_call_input_and_output_of_messages():
    assert call_input("messages", ANTHROPIC) == {"role": "user", "content": "thanks"}
    response = {
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "toolu_9", "name": "calc", "input": {"e": "1"}},
        ],
    }
    assert call_output("messages", response) == {
        "content": "Sure.",
        "reasoning_content": "hmm",
        "tool_calls": [{"id": "toolu_9", "name": "calc", "arguments": '{"e": "1"}'}],
    }
    assert call_output("messages", {"type": "error"}) == {"content": None}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "role",
                    "content",
                    "type",
                    "text",
                    "messages",
                    "input",
                    "tools",
                    "function",
                    "name",
                    "system",
                    "tool_calls",
                    "call_id",
                    "output",
                    "instructions",
                    "prompt",
                    "id",
                    "tool_use_id",
                    "arguments",
                    "choices",
                    "message",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["chat", "completion", "responses", "messages", "other"]), body=json_values)
def test_any_recorded_json_gives_valid_records(kind, body):
    """Whatever a failed call recorded, the read API can still show it: nothing raises, every answer fits its
    record type and serializes."""
    for m in input_messages(kind, body):
        orjson.dumps(InputMessage(**m).model_dump())
    assert all(isinstance(n, str) for n in tool_names(body))
    inp, out = call_input(kind, body), call_output(kind, body)
    if inp is not None:
        CallInput(**inp)
    if out is not None:
        CallOutput(**out)
