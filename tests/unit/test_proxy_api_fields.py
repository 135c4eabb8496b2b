"""proxy/api_fields.py: every request field of the Responses and Messages APIs has a class, and each class does
what it says.

The first two tests walk the installed `openai` and `anthropic` SDKs' request parameter types (their TypedDict
keys, streaming and non-streaming, Anthropic's beta variant too): an SDK upgrade that adds a field fails here,
naming it, until someone decides whether trainwire translates, passes, ignores or refuses it."""

from __future__ import annotations

import typing

import pytest

from trainwire.proxy.api_fields import How, header_value, screen
from trainwire.proxy.api_messages import FIELDS as MESSAGES
from trainwire.proxy.api_responses import FIELDS as RESPONSES
from trainwire.proxy.errors import ApiError


def sdk_fields(*typed_dicts) -> set[str]:
    names: set[str] = set()
    for cls in typed_dicts:
        names |= set(typing.get_type_hints(cls))
    return names


def test_every_responses_field_of_the_openai_sdk_has_a_class():
    from openai.types.responses import response_create_params as p

    fields = sdk_fields(p.ResponseCreateParamsNonStreaming, p.ResponseCreateParamsStreaming)
    assert {"input", "model", "tools", "client_metadata"} - fields == {"client_metadata"}  # the walk sees fields
    missing = sorted(fields - RESPONSES.fields.keys())
    assert not missing, f"classify these Responses fields in proxy/api_responses.py FIELDS: {missing}"


def test_every_messages_field_of_the_anthropic_sdk_has_a_class():
    from anthropic.types import message_create_params as p
    from anthropic.types.beta import message_create_params as beta

    fields = sdk_fields(
        p.MessageCreateParamsNonStreaming,
        p.MessageCreateParamsStreaming,
        beta.MessageCreateParamsNonStreaming,
        beta.MessageCreateParamsStreaming,
    )
    assert {"messages", "max_tokens", "betas"} <= fields
    missing = sorted(fields - MESSAGES.fields.keys())
    assert not missing, f"classify these Messages fields in proxy/api_messages.py FIELDS: {missing}"


@pytest.mark.parametrize("table", [RESPONSES, MESSAGES], ids=["responses", "messages"])
def test_every_class_is_used_with_a_reason(table):
    hows = {h.how for h in table.fields.values()}
    assert {How.TRANSLATED, How.IGNORED, How.REFUSED} <= hows
    assert all(h.why.strip() for h in table.fields.values())


CODEX_BODY = {
    "model": "policy",
    "instructions": "You are Codex.",
    "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]}],
    "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a-session",
    "client_metadata": "x" * 1024,
}


def test_a_codex_request_is_accepted_and_its_hints_named():
    screened = screen(CODEX_BODY, RESPONSES)
    assert screened.ignored == ("reasoning", "include", "prompt_cache_key", "client_metadata")  # store: false
    assert set(screened.body) == {
        "model",
        "instructions",
        "input",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "stream",
    }


def test_unknown_fields_refused_when_asked():
    with pytest.raises(ApiError) as info:
        screen(CODEX_BODY, RESPONSES, unknown="refuse")
    assert (info.value.status, info.value.param, info.value.code) == (400, "client_metadata", "unsupported_value")
    assert "--unknown-fields refuse" in info.value.message


@pytest.mark.parametrize(
    ("table", "body", "param"),
    [
        (RESPONSES, {"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        (RESPONSES, {"input": "hi", "background": True}, "background"),
        (MESSAGES, {"messages": [], "thread": {"type": "create"}}, "thread"),
        (MESSAGES, {"messages": [], "mcp_servers": [{"type": "url", "url": "x", "name": "m"}]}, "mcp_servers"),
    ],
)
def test_refused_fields_say_why(table, body, param):
    with pytest.raises(ApiError) as info:
        screen(body, table, unknown="ignore")
    assert (info.value.status, info.value.param) == (400, param)
    assert "not supported" in info.value.message


def test_messages_fields_claude_code_sends_are_accepted():
    body = {
        "model": "policy",
        "max_tokens": 32000,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}
        ],
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "user_abc_account__session_1"},
        "thinking": {"type": "disabled"},
        "betas": ["claude-code-20250219"],
        "temperature": 1,
        "stream": True,
    }
    screened = screen(body, MESSAGES, headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    assert screened.ignored == ("metadata", "betas", "anthropic-beta")  # disabled thinking asks for nothing
    assert "thinking" not in screened.body and "metadata" not in screened.body
    enabled = screen({**body, "thinking": {"type": "enabled", "budget_tokens": 2048}}, MESSAGES)
    assert "thinking" in enabled.ignored and "thinking" not in enabled.body


def test_hostile_field_names_are_escaped_and_the_header_bounded():
    screened = screen({"input": "hi", "a,b\n": 1, "\x00\udc80": 2}, RESPONSES)
    assert screened.ignored == ("a\\u002cb\\u000a", "\\u0000\\udc80")
    for name in screened.ignored:
        name.encode("ascii")
    many = [f"f{i}" for i in range(100)]
    assert header_value(many).endswith(",f31,...(68 more)")
