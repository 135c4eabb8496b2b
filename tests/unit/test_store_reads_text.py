"""What the read API and the export show of a call's request and response: content_text, call_input,
call_output (pure functions of the recorded JSON)."""

from __future__ import annotations

import pytest

from trainwire.call_shapes import call_input, call_output, content_text
from trainwire.call_shapes.chat import answer_message
from trainwire.store.reads.calls import n_messages


@pytest.mark.parametrize(
    "content,text",
    [
        (None, None),
        ("plain", "plain"),
        ("", ""),
        ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, "b", {"text": 3}], "ab"),
        ([], ""),
        ({"weird": 1}, '{"weird":1}'),
        (5, "5"),
    ],
)
def test_content_text(content, text):
    assert content_text(content) == text


def test_call_input_is_the_last_user_or_tool_message():
    request = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "tool", "tool_call_id": "tc-1", "content": [{"type": "text", "text": "4"}]},
            {"role": "assistant", "content": "later"},
        ]
    }
    assert call_input("chat", request) == {"role": "tool", "content": "4", "tool_call_id": "tc-1"}
    assert call_input("chat", {"messages": [{"role": "user", "content": "hi"}]}) == {"role": "user", "content": "hi"}
    assert call_input("chat", {"messages": [{"role": "system", "content": "s"}, "junk"]}) is None
    assert call_input("chat", {}) is None


def test_call_input_of_completions_and_others():
    assert call_input("completion", {"prompt": "once"}) == {"role": "prompt", "content": "once"}
    assert call_input("completion", {"prompt": [1, 2]}) == {"role": "prompt", "content": "[1,2]"}
    assert call_input("completion", {}) == {"role": "prompt", "content": "null"}
    assert call_input("other", {"input": "x"}) is None
    assert call_input("chat", "not a dict") is None and call_input("chat", None) is None


def test_call_output_of_chat():
    response = {
        "choices": [
            {
                "message": {
                    "content": [{"type": "text", "text": "It is 4."}],
                    "reasoning": "add",
                    "tool_calls": [{"id": "tc-1", "function": {"name": "calc", "arguments": "{}"}}],
                }
            }
        ]
    }
    assert call_output("chat", response) == {
        "content": "It is 4.",
        "reasoning_content": "add",
        "tool_calls": [{"id": "tc-1", "name": "calc", "arguments": "{}"}],
    }
    both = {"choices": [{"message": {"content": "x", "reasoning_content": "first", "reasoning": "second"}}]}
    assert call_output("chat", both) == {"content": "x", "reasoning_content": "first"}
    assert call_output("chat", {"choices": []}) == {"content": None}
    assert call_output("chat", {"choices": ["junk"]}) == {"content": None}


def test_call_output_of_completions_and_others():
    assert call_output("completion", {"choices": [{"text": "done"}]}) == {"content": "done"}
    assert call_output("completion", {}) == {"content": None}
    assert call_output("other", {"data": []}) is None
    assert call_output("chat", None) is None and call_output("chat", [1, 2]) is None


def test_response_message_and_message_count():
    assert answer_message({"choices": [{"message": {"content": "x"}}]}) == {"content": "x"}
    for junk in (None, [], {"choices": None}, {"choices": [None]}, {"choices": [{"message": "text"}]}):
        assert answer_message(junk) == {}
    assert n_messages({"messages": [{}, {}, {}]}) == 3
    assert n_messages({"messages": None}) == 0 and n_messages({}) == 0
    assert n_messages({"messages": {"a": 1}}) is None and n_messages("x") is None and n_messages(None) is None
