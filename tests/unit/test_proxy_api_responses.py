"""proxy/api_responses.py: the Responses API translated to and from chat completions.

Every response object and stream event produced is validated with the OpenAI SDK's own pydantic types, and the
stream is also read by the SDK itself (through an in-process HTTP transport), because what counts is that an
unchanged OpenAI client accepts it. The streamed final response is compared whole with the non-stream translation
of the same generation; the chunk sequences are shaped like vLLM's (role delta, content deltas, tool-call deltas
by index with the id and name first and the arguments in pieces, a finish chunk, a usage-only chunk)."""

from __future__ import annotations

import copy

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from trainwire.proxy.api_fields import screen
from trainwire.proxy.api_responses import FIELDS, ResponsesStream, from_chat, to_chat
from trainwire.proxy.errors import ApiError

EVENT = TypeAdapter(ResponseStreamEvent)
RESPONSE_ID = "resp_7f3a9c"
CREATED = 1700000123
BASE = {"id": "chatcmpl-41", "object": "chat.completion.chunk", "created": 1700000123, "model": "tiny"}
ADD = {
    "type": "function",
    "name": "add",
    "description": "Add two numbers.",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    },
    "strict": True,
}
CHAT_ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Add two numbers.", "parameters": ADD["parameters"], "strict": True},
}
USAGE = {"prompt_tokens": 18, "completion_tokens": 9, "total_tokens": 27}


def translate(body: dict) -> dict:
    """What the proxy does: screen the fields (proxy/api_fields.py), then translate what is kept."""
    return to_chat(screen(body, FIELDS).body)


def rejected(body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        translate(body)
    assert info.value.status == 400
    return info.value


# --- to_chat: input forms ------------------------------------------------------------------------------------


def test_string_input_is_one_user_message():
    assert to_chat({"model": "policy", "input": "What is 2 plus 3?"}) == {
        "model": "policy",
        "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
    }


def test_instructions_lead_and_developer_is_system():
    chat = to_chat(
        {
            "model": "policy",
            "instructions": "You are a calculator.",
            "input": [
                {"role": "developer", "content": "Answer with digits."},
                {"type": "message", "role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+3?"},
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "You are a calculator."},
        {"role": "system", "content": "Answer with digits."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
    ]


def test_content_parts():
    chat = to_chat(
        {
            "model": "policy",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "A cat.", "annotations": [], "logprobs": []}],
                },
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Sure?"}, {"type": "input_text", "text": "Really?"}],
                },
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't say."}]},
                {"role": "user", "content": []},
            ],
        }
    )
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ],
        },
        # one text part travels as a plain string: what a chat client sends, and what templates expect
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "text", "text": "Really?"}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't say."}]},
        {"role": "user", "content": []},
    ]


def test_multi_turn_with_function_calls_and_outputs():
    body = {
        "model": "policy",
        "instructions": "You are a calculator.",
        "tools": [ADD],
        "input": [
            {"role": "user", "content": "What is 2 plus 3, and 4 plus 5?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me add."}]},
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_a",
                "name": "add",
                "arguments": '{"a": 2, "b": 3}',
                "status": "completed",
            },
            {"type": "reasoning", "id": "rs_2", "summary": []},
            {"type": "function_call", "call_id": "call_b", "name": "add", "arguments": '{"a": 4, "b": 5}'},
            {"type": "function_call_output", "call_id": "call_a", "output": "5"},
            {
                "type": "function_call_output",
                "call_id": "call_b",
                "output": [{"type": "input_text", "text": "9"}, {"type": "output_text", "text": " (sum)"}],
            },
            {"role": "assistant", "content": "5 and 9."},
            {"role": "user", "content": "Now 1 plus 1."},
            {"type": "function_call", "call_id": "call_c", "name": "add", "arguments": '{"a": 1, "b": 1}'},
            {"type": "function_call_output", "call_id": "call_c", "output": "2"},
        ],
    }
    call = lambda cid, args: {"id": cid, "type": "function", "function": {"name": "add", "arguments": args}}
    assert to_chat(body) == {
        "model": "policy",
        "tools": [CHAT_ADD],
        "messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": "What is 2 plus 3, and 4 plus 5?"},
            {
                "role": "assistant",
                "content": "Let me add.",
                "tool_calls": [call("call_a", '{"a": 2, "b": 3}'), call("call_b", '{"a": 4, "b": 5}')],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "5"},
            {"role": "tool", "tool_call_id": "call_b", "content": "9 (sum)"},
            {"role": "assistant", "content": "5 and 9."},
            {"role": "user", "content": "Now 1 plus 1."},
            {"role": "assistant", "content": None, "tool_calls": [call("call_c", '{"a": 1, "b": 1}')]},
            {"role": "tool", "tool_call_id": "call_c", "content": "2"},
        ],
    }


def test_function_call_after_a_tool_output_starts_a_new_assistant_turn():
    chat = to_chat(
        {
            "input": [
                {"role": "user", "content": "go"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "x"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
            ]
        }
    )
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert [m.get("tool_calls", [{}])[0].get("id") for m in chat["messages"]] == [None, "c1", None, "c2"]


# --- to_chat: parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "name": "add"}, {"type": "function", "function": {"name": "add"}}),
    ],
)
def test_tool_choice_forms(choice, expected):
    chat = to_chat({"model": "policy", "input": "2+3?", "tools": [ADD], "tool_choice": choice})
    assert chat["tools"] == [CHAT_ADD]
    assert chat["tool_choice"] == expected


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_tool_choice_without_tools_is_dropped(choice):
    # vLLM refuses tool_choice without tools; both values already mean "answer in text" there.
    assert "tool_choice" not in to_chat({"input": "hi", "tool_choice": choice})
    assert "tools" not in to_chat({"input": "hi", "tools": [], "tool_choice": choice})


def test_minimal_function_tool():
    chat = to_chat({"input": "hi", "tools": [{"type": "function", "name": "now"}]})
    assert chat["tools"] == [{"type": "function", "function": {"name": "now"}}]


def test_sampling_and_other_parameters():
    chat = to_chat(
        {
            "model": "policy",
            "input": "hi",
            "parallel_tool_calls": False,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_output_tokens": 64,
            "stream": True,
            "user": "u-1",
            "seed": 7,
            "stop": ["\n"],
            "top_k": 20,
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert chat == {
        "model": "policy",
        "messages": [{"role": "user", "content": "hi"}],
        "parallel_tool_calls": False,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "stream": True,
        "user": "u-1",
        "seed": 7,
        "stop": ["\n"],
        "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": False},
    }


def test_ignored_parameters_are_not_forwarded():
    body = {
        "model": "policy",
        "input": "hi",
        "store": True,
        "metadata": {"k": "v"},
        "reasoning": {"effort": "low"},
        "truncation": "auto",
        "include": ["reasoning.encrypted_content"],
        "background": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "stream_options": {"include_obfuscation": False},
        "top_logprobs": 0,
        "max_tool_calls": 3,
        "prompt_cache_retention": "24h",
        "previous_response_id": None,
        "conversation": None,
        "client_metadata": "x" * 1000,
    }
    screened = screen(body, FIELDS)
    assert to_chat(screened.body) == {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}
    # background: false and the nulls ask for nothing; the rest is named (in the answer's X-Trainwire-Ignored)
    assert screened.ignored == (
        "store",
        "metadata",
        "reasoning",
        "truncation",
        "include",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "stream_options",
        "top_logprobs",
        "max_tool_calls",
        "prompt_cache_retention",
        "client_metadata",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ({"format": {"type": "text"}}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {
                "format": {
                    "type": "json_schema",
                    "name": "sum",
                    "schema": {"type": "object"},
                    "strict": True,
                    "description": "the sum",
                },
                "verbosity": "low",
            },
            {
                "type": "json_schema",
                "json_schema": {"name": "sum", "schema": {"type": "object"}, "strict": True, "description": "the sum"},
            },
        ),
        (
            {"format": {"type": "json_schema", "name": "sum", "schema": {}}},
            {"type": "json_schema", "json_schema": {"name": "sum", "schema": {}}},
        ),
    ],
)
def test_text_format(text, expected):
    assert to_chat({"input": "hi", "text": text}).get("response_format") == expected


# --- to_chat: refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code", "says"),
    [
        (
            {"input": "hi", "previous_response_id": "resp_1"},
            "previous_response_id",
            "unsupported_value",
            "stores no responses",
        ),
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "unsupported_value", "stores no responses"),
        ({"input": "hi", "background": True}, "background", "unsupported_value", "background"),
        ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_value", "prompt"),
        ({"model": "policy"}, "input", "invalid_value", "input"),
        ({"input": ""}, "input", "invalid_value", "empty"),
        ({"input": []}, "input", "invalid_value", "input"),
        ({"input": 3}, "input", "invalid_value", "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "invalid_value", "no messages"),
        ({"input": ["hi"]}, "input[0]", "invalid_value", "object"),
        (
            {"input": [{"type": "web_search_call", "id": "ws_1"}]},
            "input[0].type",
            "unsupported_value",
            "web_search_call",
        ),
        (
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            "input[0].type",
            "unsupported_value",
            "item_reference",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "invalid_value", "role"),
        ({"input": [{"role": "user"}]}, "input[0].content", "invalid_value", "content"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
            "unsupported_value",
            "input_file",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
            "input[0].content[0].file_id",
            "unsupported_value",
            "file_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
            "input[0].content[0].type",
            "invalid_value",
            "video",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
            "invalid_value",
            "string",
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
            "invalid_value",
            "call_id",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}]},
            "input[0].arguments",
            "invalid_value",
            "string",
        ),
        ({"input": [{"type": "function_call_output", "output": "5"}]}, "input[0].call_id", "invalid_value", "call_id"),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "x"}],
                    }
                ]
            },
            "input[0].output[0].type",
            "unsupported_value",
            "text",
        ),
        ({"input": "hi", "instructions": ["x"]}, "instructions", "invalid_value", "string"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value", "web_search"),
        (
            {"input": "hi", "tools": [{"type": "file_search", "vector_store_ids": []}]},
            "tools[0].type",
            "unsupported_value",
            "file_search",
        ),
        (
            {"input": "hi", "tools": [{"type": "computer_use_preview"}]},
            "tools[0].type",
            "unsupported_value",
            "computer_use_preview",
        ),
        (
            {"input": "hi", "tools": [ADD, {"type": "mcp", "server_label": "x"}]},
            "tools[1].type",
            "unsupported_value",
            "mcp",
        ),
        ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name", "invalid_value", "name"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice", "invalid_value", "tools"),
        (
            {"input": "hi", "tools": [ADD], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
            "tool_choice",
            "unsupported_value",
            "allowed_tools",
        ),
        (
            {"input": "hi", "tools": [ADD], "tool_choice": {"type": "web_search_preview"}},
            "tool_choice",
            "unsupported_value",
            "web_search_preview",
        ),
        ({"input": "hi", "tools": [ADD], "tool_choice": "sometimes"}, "tool_choice", "invalid_value", "sometimes"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "invalid_value", "positive"),
        ({"input": "hi", "text": {"format": {"type": "grammar"}}}, "text.format.type", "unsupported_value", "grammar"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name",
            "invalid_value",
            "name",
        ),
        ({"input": "hi", "n": 2}, "n", "unsupported_value", "'n'"),
    ],
)
def test_refused_with_400(body, param, code, says):
    error = rejected(body)
    assert (error.param, error.code) == (param, code)
    assert says in error.message


def test_not_an_object_is_refused():
    assert rejected([{"role": "user", "content": "hi"}]).code == "invalid_value"  # type: ignore[arg-type]


# --- from_chat -----------------------------------------------------------------------------------------------


def chat_completion(content=None, calls=(), finish="stop", usage=USAGE, reasoning=None) -> dict:
    message = {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "reasoning": reasoning,
        "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in calls
        ],
    }
    return {
        "id": "chatcmpl-41",
        "object": "chat.completion",
        "created": 1700000123,
        "model": "tiny",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        "usage": usage,
    }


def respond(chat: dict, request: dict) -> dict:
    response = from_chat(chat, request, response_id=RESPONSE_ID, created_at=CREATED)
    Response.model_validate(response)
    return response


REQUEST = {"model": "policy", "input": "What is 2 plus 3?", "tools": [ADD]}


def test_text_answer():
    request = {
        "model": "policy",
        "input": "hi",
        "instructions": "Be brief.",
        "temperature": 0.5,
        "top_p": 0.9,
        "max_output_tokens": 32,
        "metadata": {"run": "7"},
        "user": "u-1",
        "store": True,
    }
    response = respond(chat_completion("The answer is 5."), request)
    assert response["output"] == [
        {
            "id": "msg_7f3a9c_0",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "The answer is 5.", "annotations": [], "logprobs": []}],
        }
    ]
    assert Response.model_validate(response).output_text == "The answer is 5."
    assert {
        k: response[k]
        for k in (
            "id",
            "object",
            "created_at",
            "status",
            "error",
            "incomplete_details",
            "model",
            "instructions",
            "temperature",
            "top_p",
            "max_output_tokens",
            "metadata",
            "user",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "text",
            "truncation",
            "previous_response_id",
        )
    } == {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "model": "policy",
        "instructions": "Be brief.",
        "temperature": 0.5,
        "top_p": 0.9,
        "max_output_tokens": 32,
        "metadata": {"run": "7"},
        "user": "u-1",
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "previous_response_id": None,
    }
    assert response["usage"] == {
        "input_tokens": 18,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 27,
    }


def test_tool_only_answer():
    response = respond(chat_completion(None, [("chatcmpl-tool-1", "add", '{"a": 2, "b": 3}')], "tool_calls"), REQUEST)
    assert response["output"] == [
        {
            "id": "fc_7f3a9c_0",
            "type": "function_call",
            "status": "completed",
            "call_id": "chatcmpl-tool-1",
            "name": "add",
            "arguments": '{"a": 2, "b": 3}',
        }
    ]
    assert response["status"] == "completed"
    assert response["tools"] == [ADD]
    parsed = Response.model_validate(response)
    assert parsed.output[0].type == "function_call" and parsed.output_text == ""


def test_text_and_tools_answer_and_echoes():
    request = {
        **REQUEST,
        "tool_choice": {"type": "function", "name": "add"},
        "parallel_tool_calls": False,
        "text": {"format": {"type": "json_object"}},
    }
    response = respond(
        chat_completion("Adding.", [("t1", "add", '{"a": 2, "b": 3}'), ("t2", "add", "{}")], "tool_calls"), request
    )
    assert [(item["type"], item["id"], item.get("call_id")) for item in response["output"]] == [
        ("message", "msg_7f3a9c_0", None),
        ("function_call", "fc_7f3a9c_1", "t1"),
        ("function_call", "fc_7f3a9c_2", "t2"),
    ]
    assert response["tool_choice"] == {"type": "function", "name": "add"}
    assert response["parallel_tool_calls"] is False
    assert response["text"] == {"format": {"type": "json_object"}}


def test_length_truncated_answer_is_incomplete():
    response = respond(
        chat_completion("The answer", finish="length"), {"model": "policy", "input": "hi", "max_output_tokens": 2}
    )
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert Response.model_validate(response).output_text == "The answer"


def test_reasoning_becomes_a_reasoning_item_first():
    usage = {
        **USAGE,
        "prompt_tokens_details": {"cached_tokens": 16},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    response = respond(chat_completion("5", reasoning="2+3=5", usage=usage), {"model": "policy", "input": "hi"})
    assert response["output"][0] == {
        "id": "rs_7f3a9c_0",
        "type": "reasoning",
        "summary": [],
        "status": "completed",
        "content": [{"type": "reasoning_text", "text": "2+3=5"}],
    }
    assert response["output"][1]["id"] == "msg_7f3a9c_1"
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 16
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == 4


def test_empty_answer_and_missing_usage():
    response = respond(chat_completion("", usage=None), {"model": "policy", "input": "hi"})
    assert response["output"] == [] and response["usage"] is None


# --- the stream ----------------------------------------------------------------------------------------------


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {**BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def vllm_chunks(text_pieces=(), calls=(), finish="stop", usage=USAGE) -> list[dict]:
    """`calls`: (id, name, argument pieces). Shaped like vLLM 0.32's chat stream with the hermes tool parser."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in text_pieces]
    for index, (call_id, name, pieces) in enumerate(calls):
        chunks.append(
            chunk({"tool_calls": [{"id": call_id, "type": "function", "index": index, "function": {"name": name}}]})
        )
        chunks += [chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}) for piece in pieces]
    chunks.append(chunk({"content": ""} if not calls else {}, finish))
    if usage is not None:
        chunks.append({**BASE, "choices": [], "usage": usage})
    return chunks


def parse_sse(data: bytes) -> list[dict]:
    events = []
    assert data.endswith(b"\n\n")
    for block in data.decode().split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        event = orjson.loads(data_line.removeprefix("data: "))
        assert event["type"] == name_line.removeprefix("event: ")
        assert EVENT.validate_python(event).type == event["type"]
        events.append(event)
    return events


def run_stream(chunks: list[dict], request: dict) -> tuple[list[dict], ResponsesStream]:
    stream = ResponsesStream(request, response_id=RESPONSE_ID, created_at=CREATED)
    data = stream.start()
    for c in chunks:
        data += stream.feed(copy.deepcopy(c))
    data += stream.finish()
    events = parse_sse(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, stream


def test_stream_text_then_tool_calls_matches_non_stream():
    calls = [("chatcmpl-tool-a", "add", ['{"a": ', "2, ", '"b": 3}']), ("chatcmpl-tool-b", "add", ['{"a": 4, "b": 5}'])]
    events, stream = run_stream(vllm_chunks(["Let", " me", " add."], calls, "tool_calls"), REQUEST)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, in_progress = events[0]["response"], events[1]["response"]
    assert created["status"] == in_progress["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    assert events[2]["item"] == {
        "id": "msg_7f3a9c_0",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert events[3]["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert [e["delta"] for e in events[4:7]] == ["Let", " me", " add."]
    assert all(
        e["item_id"] == "msg_7f3a9c_0" and e["output_index"] == 0 and e["content_index"] == 0 for e in events[3:9]
    )
    assert events[7]["text"] == "Let me add."
    assert events[10]["item"] == {
        "id": "fc_7f3a9c_1",
        "type": "function_call",
        "status": "in_progress",
        "call_id": "chatcmpl-tool-a",
        "name": "add",
        "arguments": "",
    }
    assert events[14]["arguments"] == '{"a": 2, "b": 3}'
    assert events[15]["item"]["status"] == "completed"
    assert events[16]["output_index"] == 2 and events[17]["item_id"] == "fc_7f3a9c_2"

    expected = respond(
        chat_completion(
            "Let me add.",
            [("chatcmpl-tool-a", "add", '{"a": 2, "b": 3}'), ("chatcmpl-tool-b", "add", '{"a": 4, "b": 5}')],
            "tool_calls",
        ),
        REQUEST,
    )
    final = events[-1]["response"]
    assert final == expected == stream.response()
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == final["output"]


def test_stream_tool_only_has_no_message_item():
    events, _ = run_stream(vllm_chunks([], [("t1", "add", ['{"a": 2,', ' "b": 3}'])], "tool_calls"), REQUEST)
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"] == ["function_call"]
    assert events[-1]["response"] == respond(
        chat_completion(None, [("t1", "add", '{"a": 2, "b": 3}')], "tool_calls"), REQUEST
    )


def test_stream_length_is_incomplete():
    request = {"model": "policy", "input": "hi", "max_output_tokens": 2}
    events, _ = run_stream(vllm_chunks(["The", " answer"], finish="length"), request)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final == respond(chat_completion("The answer", finish="length"), request)
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert done[0]["item"]["status"] == "incomplete"


def test_stream_reasoning_then_text_matches_non_stream():
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning": "2+3"}),
        chunk({"reasoning": "=5"}),
        chunk({"content": "5"}),
        chunk({}, "stop"),
        {**BASE, "choices": [], "usage": USAGE},
    ]
    request = {"model": "policy", "input": "hi"}
    events, _ = run_stream(chunks, request)
    types = [e["type"] for e in events]
    assert types[2:10] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]
    assert events[-1]["response"] == respond(chat_completion("5", reasoning="2+3=5"), request)


def test_stream_without_usage_chunk():
    events, _ = run_stream(vllm_chunks(["hi"], usage=None), {"model": "policy", "input": "hi"})
    assert events[-1]["response"]["usage"] is None


def test_in_band_error_fails_the_response():
    stream = ResponsesStream(REQUEST, response_id=RESPONSE_ID, created_at=CREATED)
    data = (
        stream.start()
        + stream.feed(chunk({"role": "assistant", "content": ""}))
        + stream.feed(chunk({"content": "Par"}))
    )
    data += stream.feed(
        {
            "error": {
                "message": "EngineDeadError: engine died",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
    )
    assert stream.feed(chunk({"content": "tial"})) == b""
    assert stream.finish() == b""
    events = parse_sse(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "server_error" and "engine died" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "EngineDeadError: engine died"}
    assert failed["output"][0]["content"][0]["text"] == "Par" and failed["output"][0]["status"] == "incomplete"
    assert stream.response() == failed
    Response.model_validate(failed)


def test_response_after_an_early_stop_is_what_was_sent():
    stream = ResponsesStream(REQUEST, response_id=RESPONSE_ID, created_at=CREATED)
    stream.start()
    for c in vllm_chunks(["Hel", "lo"], [("t1", "add", ['{"a"'])])[:5]:
        stream.feed(c)
    partial = stream.response()
    Response.model_validate(partial)
    assert partial["status"] == "in_progress"
    assert [(i["type"], i["status"]) for i in partial["output"]] == [
        ("message", "completed"),
        ("function_call", "in_progress"),
    ]
    assert partial["output"][1]["arguments"] == '{"a"'


def test_finish_once_and_start_implied():
    stream = ResponsesStream({"model": "policy", "input": "hi"}, response_id=RESPONSE_ID, created_at=CREATED)
    data = stream.feed(chunk({"content": "hi"}, "stop")) + stream.finish()
    assert stream.finish() == b"" and stream.feed(chunk({"content": "more"})) == b"" and stream.start() == b""
    events = parse_sse(data)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert sum(e["type"] == "response.completed" for e in events) == 1


# --- the OpenAI SDK itself reads what is produced ------------------------------------------------------------


def sdk_client(body: bytes, content_type: str) -> openai.OpenAI:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    return openai.OpenAI(
        api_key="x",
        base_url="http://trainwire.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )


def test_sdk_reads_the_non_stream_answer():
    response = from_chat(
        chat_completion("5", [("t1", "add", '{"a": 2, "b": 3}')], "tool_calls"),
        REQUEST,
        response_id=RESPONSE_ID,
        created_at=CREATED,
    )
    parsed = sdk_client(orjson.dumps(response), "application/json").responses.create(model="policy", input="2+3?")
    assert parsed.output_text == "5"
    assert (parsed.output[1].call_id, parsed.output[1].arguments) == ("t1", '{"a": 2, "b": 3}')
    assert parsed.usage.total_tokens == 27


def test_sdk_stream_helper_accumulates_the_events():
    calls = [("t1", "add", ['{"a": 2,', ' "b": 3}']), ("t2", "add", ["{}"])]
    stream = ResponsesStream(REQUEST, response_id=RESPONSE_ID, created_at=CREATED)
    data = stream.start() + b"".join(stream.feed(c) for c in vllm_chunks(["Add", "ing."], calls, "tool_calls"))
    data += stream.finish()
    client = sdk_client(data, "text/event-stream")
    with client.responses.stream(model="policy", input="2+3?", tools=[ADD]) as events:
        seen = [event.type for event in events]
        final = events.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert final.output_text == "Adding."
    assert [(item.call_id, item.arguments) for item in final.output[1:]] == [("t1", '{"a": 2, "b": 3}'), ("t2", "{}")]
    raw = list(client.responses.create(model="policy", input="2+3?", stream=True))
    assert [event.sequence_number for event in raw] == list(range(len(raw)))


# --- property: chunk boundaries do not matter ----------------------------------------------------------------


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(max_size=40),
    text_cuts=st.lists(st.integers(0, 60), max_size=8),
    calls=st.lists(
        st.tuples(
            st.sampled_from(["add", "mul", "lookup"]),
            st.dictionaries(st.text(max_size=6), json_values, max_size=3),
            st.lists(st.integers(0, 80), max_size=6),
        ),
        max_size=3,
    ),
    finish=st.sampled_from(["stop", "tool_calls", "length"]),
)
def test_any_chunk_split_gives_the_non_stream_response(text, text_cuts, calls, finish):
    arguments = [orjson.dumps(args).decode() for _, args, _ in calls]
    stream_calls = [
        (f"chatcmpl-tool-{i}", name, split(args, cuts))
        for i, ((name, _, cuts), args) in enumerate(zip(calls, arguments))
    ]
    events, stream = run_stream(vllm_chunks(split(text, text_cuts), stream_calls, finish), REQUEST)
    expected = respond(
        chat_completion(
            text or None, [(cid, name, args) for (cid, name, _), args in zip(stream_calls, arguments)], finish
        ),
        REQUEST,
    )
    assert events[-1]["response"] == expected == stream.response()
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text


# --- namespaces of function tools (Codex CLI's sub-agent tools) ----------------------------------------------

NAMESPACE = {"type": "namespace", "name": "agents", "description": "Sub-agents.", "tools": [{**ADD, "name": "spawn"}]}
NS_REQUEST = {"model": "policy", "input": "hi", "tools": [ADD, NAMESPACE]}


def test_a_namespace_becomes_one_chat_tool_per_function():
    chat = translate(NS_REQUEST)
    assert [t["function"]["name"] for t in chat["tools"]] == ["add", "agents.spawn"]
    history = [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "spawn", "namespace": "agents", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
    ]
    messages = translate({**NS_REQUEST, "input": history})["messages"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "agents.spawn"
    assert rejected({**NS_REQUEST, "tools": [{**NAMESPACE, "tools": [{"type": "web_search"}]}]}).param == (
        "tools[0].tools[0].type"
    )


def test_a_namespaced_call_answers_with_its_namespace_streamed_or_not():
    calls = [("t1", "agents.spawn", ['{"a": 1}']), ("t2", "add", ["{}"]), ("t3", "other.spawn", ["{}"])]
    events, _ = run_stream(vllm_chunks([], calls, "tool_calls"), NS_REQUEST)
    final = events[-1]["response"]
    expected = respond(chat_completion(None, [(i, n, "".join(p)) for i, n, p in calls], "tool_calls"), NS_REQUEST)
    assert final == expected
    assert [(o["name"], o.get("namespace")) for o in final["output"]] == [
        ("spawn", "agents"),
        ("add", None),
        ("other.spawn", None),  # not a namespace of the request: the name as the model wrote it
    ]
    assert Response.model_validate(final).tools[1].type == "namespace"
