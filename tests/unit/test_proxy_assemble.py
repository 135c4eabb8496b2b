"""proxy/assemble.py: training data out of a response (`tokens_of`) and SSE chunks back into one response
(`StreamAssembler`). The chunk sequences are shaped like vLLM's (role delta first, content and tool-call deltas with
`token_ids` and `logprobs` per chunk, a finish chunk, a usage-only chunk, `[DONE]`); the assembled body is compared
whole with the non-stream answer for the same generation. vLLM's always-null fields (`refusal`, `service_tier`, ...)
are not reproduced by the assembler and are left out of the expected bodies."""

from __future__ import annotations

import copy
import string

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainwire.proxy.assemble import StreamAssembler, Tokens, tokens_of
from trainwire.proxy.forward import _data_of, _split_events

PROMPT = [151644, 872, 198, 3838, 374, 279, 9104, 30]
BASE = {"id": "chatcmpl-9f2c", "object": "chat.completion.chunk", "created": 1700000001, "model": "policy"}


def lp(token_id: int, logprob: float) -> dict:
    return {"token": f"t{token_id}", "logprob": logprob, "bytes": [token_id % 256], "top_logprobs": []}


def chunk(**choice) -> dict:
    return {**BASE, "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **choice}]}


# --- tokens_of ---------------------------------------------------------------------------------------------


def test_tokens_of_chat_non_stream():
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "prompt_token_ids": [1, 2, 3],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "token_ids": [7, 8],
                "logprobs": {"content": [lp(7, -0.25), lp(8, -1.5)]},
                "finish_reason": "stop",
            }
        ],
    }
    assert tokens_of(body) == Tokens(
        prompt_token_ids=[1, 2, 3], completion_token_ids=[7, 8], logprobs=[-0.25, -1.5], finish_reason="stop"
    )


def test_tokens_of_completion_non_stream_reads_prompt_ids_from_the_choice():
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "hi",
                "prompt_token_ids": [4, 5],
                "token_ids": [9],
                "logprobs": {
                    "text_offset": [0],
                    "token_logprobs": [-0.75],
                    "tokens": ["t9"],
                    "top_logprobs": [{"t9": -0.75}],
                },
                "finish_reason": "length",
            }
        ],
    }
    assert tokens_of(body) == Tokens(
        prompt_token_ids=[4, 5], completion_token_ids=[9], logprobs=[-0.75], finish_reason="length"
    )


def test_tokens_of_top_level_prompt_ids_win_over_the_choice():
    body = {"prompt_token_ids": [1], "choices": [{"prompt_token_ids": [2], "token_ids": [3]}]}
    assert tokens_of(body).prompt_token_ids == [1]
    body["prompt_token_ids"] = []  # empty top-level list: falls back to the choice's
    assert tokens_of(body).prompt_token_ids == [2]


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        3,
        {},
        {"choices": []},
        {"choices": None},
        {"choices": [None]},
        {"choices": ["x"]},
        {"choices": [{}]},
    ],
)
def test_tokens_of_missing_everything(body):
    assert tokens_of(body) == Tokens(None, None, None, None)


def test_tokens_of_missing_fields_in_a_choice():
    # answered without return_token_ids / logprobs: only the finish reason is there
    body = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"completion_tokens": 1},
    }
    assert tokens_of(body) == Tokens(finish_reason="stop")
    assert tokens_of({"choices": [{"logprobs": {"content": None}}]}).logprobs is None
    assert tokens_of({"choices": [{"logprobs": {"top_logprobs": []}}]}).logprobs is None
    assert tokens_of({"choices": [{"logprobs": "yes"}]}).logprobs is None


def test_tokens_of_n_greater_than_one_takes_choice_zero():
    body = {
        "prompt_token_ids": [1],
        "choices": [
            {
                "index": 0,
                "token_ids": [10, 11],
                "logprobs": {"content": [lp(10, -0.1), lp(11, -0.2)]},
                "finish_reason": "stop",
            },
            {"index": 1, "token_ids": [20], "logprobs": {"content": [lp(20, -3.0)]}, "finish_reason": "length"},
        ],
    }
    assert tokens_of(body) == Tokens([1], [10, 11], [-0.1, -0.2], "stop")


def test_tokens_of_chat_logprob_entry_without_logprob_is_none():
    assert tokens_of({"choices": [{"logprobs": {"content": [{"token": "a"}, lp(2, -1.0)]}}]}).logprobs == [None, -1.0]


# --- StreamAssembler: a realistic vLLM chat stream -----------------------------------------------------


def chat_stream_with_tools() -> list[dict]:
    """vLLM's chunks for: text, then two tool calls whose argument deltas interleave by index."""
    first = chunk(delta={"role": "assistant", "content": ""})
    first["prompt_token_ids"] = PROMPT
    usage = {"prompt_tokens": len(PROMPT), "total_tokens": len(PROMPT) + 9, "completion_tokens": 9}
    return [
        first,
        chunk(delta={"content": "Let me"}, token_ids=[10, 11], logprobs={"content": [lp(10, -0.5), lp(11, -0.25)]}),
        chunk(delta={"content": " check."}, token_ids=[12], logprobs={"content": [lp(12, -0.125)]}),
        chunk(
            delta={
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "chatcmpl-tool-a1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            token_ids=[13, 14],
            logprobs={"content": [lp(13, -1.0), lp(14, -2.0)]},
        ),
        chunk(
            delta={"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            token_ids=[15],
            logprobs={"content": [lp(15, -0.0625)]},
        ),
        chunk(
            delta={
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "chatcmpl-tool-b2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz"'},
                    }
                ]
            },
            token_ids=[16],
            logprobs={"content": [lp(16, -3.0)]},
        ),
        chunk(
            delta={"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
            token_ids=[17],
            logprobs={"content": [lp(17, -0.5)]},
        ),
        chunk(
            delta={"tool_calls": [{"index": 1, "function": {"arguments": ': "CET"}'}}]},
            token_ids=[18],
            logprobs={"content": [lp(18, -0.75)]},
        ),
        chunk(delta={}, finish_reason="tool_calls", stop_reason=None, token_ids=[]),
        {**BASE, "choices": [], "usage": usage},
    ]


CHAT_NON_STREAM = {
    "id": "chatcmpl-9f2c",
    "object": "chat.completion",
    "created": 1700000001,
    "model": "policy",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "chatcmpl-tool-a1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "chatcmpl-tool-b2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                    },
                ],
            },
            "logprobs": {
                "content": [
                    lp(10, -0.5),
                    lp(11, -0.25),
                    lp(12, -0.125),
                    lp(13, -1.0),
                    lp(14, -2.0),
                    lp(15, -0.0625),
                    lp(16, -3.0),
                    lp(17, -0.5),
                    lp(18, -0.75),
                ]
            },
            "finish_reason": "tool_calls",
            "token_ids": [10, 11, 12, 13, 14, 15, 16, 17, 18],
        }
    ],
    "usage": {"prompt_tokens": 8, "total_tokens": 17, "completion_tokens": 9},
    "prompt_token_ids": PROMPT,
}


def test_chat_stream_assembles_to_the_non_stream_body():
    asm = StreamAssembler("chat")
    for c in chat_stream_with_tools():
        asm.feed(c)
    asm.feed_event(b"[DONE]")
    assert asm.done
    assert asm.events == 10
    assert asm.error is None
    assert asm.body() == CHAT_NON_STREAM
    assert (
        tokens_of(asm.body())
        == tokens_of(CHAT_NON_STREAM)
        == Tokens(
            PROMPT, list(range(10, 19)), [-0.5, -0.25, -0.125, -1.0, -2.0, -0.0625, -3.0, -0.5, -0.75], "tool_calls"
        )
    )


def test_chat_stream_through_the_sse_parser_in_arbitrary_byte_pieces():
    raw = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chat_stream_with_tools()) + b"data: [DONE]\n\n"
    for size in (1, 7, 64, len(raw)):
        asm = StreamAssembler("chat")
        buf = b""
        for i in range(0, len(raw), size):
            events, buf = _split_events(buf + raw[i : i + size])
            for e in events:
                asm.feed_event(_data_of(e))
        assert buf == b""
        assert asm.done
        assert asm.body() == CHAT_NON_STREAM


def test_feeding_does_not_alias_the_chunks():
    chunks = chat_stream_with_tools()
    before = copy.deepcopy(chunks)
    asm = StreamAssembler("chat")
    for c in chunks:
        asm.feed(c)
    asm.body()
    assert chunks == before


def test_chat_text_only_stream_with_stop_reason():
    first = chunk(delta={"role": "assistant", "content": ""})
    first["prompt_token_ids"] = [1, 2]
    asm = StreamAssembler("chat")
    for c in [
        first,
        chunk(delta={"content": "4"}, token_ids=[19]),
        chunk(delta={"content": ""}, finish_reason="stop", stop_reason=151645, token_ids=[]),
    ]:
        asm.feed(c)
    body = asm.body()
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "4"},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": 151645,
            "token_ids": [19],
        }
    ]
    assert body["prompt_token_ids"] == [1, 2]
    assert "usage" not in body  # no usage chunk: none invented


def test_chat_reasoning_deltas_are_joined():
    asm = StreamAssembler("chat")
    asm.feed(chunk(delta={"role": "assistant", "reasoning_content": "think "}))
    asm.feed(chunk(delta={"reasoning": "more"}))
    asm.feed(chunk(delta={"content": "ok"}, finish_reason="stop"))
    msg = asm.body()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "ok", "reasoning_content": "think more"}


def test_tool_call_only_answer_has_null_content_and_a_missing_role_defaults_to_assistant():
    asm = StreamAssembler("chat")
    asm.feed(chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}))
    asm.feed(chunk(delta={"tool_calls": [{"index": 0, "id": "x1", "function": {"name": "f"}}]}))
    asm.feed(chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, finish_reason="tool_calls"))
    assert asm.body()["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "x1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }


def test_n_greater_than_one_stream_keeps_choices_apart():
    asm = StreamAssembler("chat")
    asm.feed(
        {
            **BASE,
            "choices": [
                {"index": 1, "delta": {"role": "assistant", "content": "B"}, "token_ids": [2]},
                {"index": 0, "delta": {"role": "assistant", "content": "A"}, "token_ids": [1]},
            ],
        }
    )
    asm.feed({**BASE, "choices": [{"index": 0, "delta": {"content": "a"}, "token_ids": [3], "finish_reason": "stop"}]})
    asm.feed(
        {**BASE, "choices": [{"index": 1, "delta": {"content": "b"}, "token_ids": [4], "finish_reason": "length"}]}
    )
    body = asm.body()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["Aa", "Bb"]
    assert [c["token_ids"] for c in body["choices"]] == [[1, 3], [2, 4]]
    assert tokens_of(body) == Tokens(None, [1, 3], None, "stop")


def test_prompt_token_ids_from_the_top_level_are_not_replaced_by_a_choice_s():
    asm = StreamAssembler("chat")
    asm.feed({"prompt_token_ids": [1, 2], "choices": [{"index": 0, "delta": {"content": "a"}}]})
    asm.feed({"choices": [{"index": 0, "prompt_token_ids": [9], "delta": {"content": "b"}}]})
    assert asm.body()["prompt_token_ids"] == [1, 2]


def test_meta_comes_from_the_first_chunk_that_has_it():
    asm = StreamAssembler("chat")
    asm.feed({"id": "a", "created": 1, "model": "m1", "system_fingerprint": "fp", "choices": []})
    asm.feed({"id": "b", "created": 2, "model": "m2", "choices": []})
    body = asm.body()
    assert (body["id"], body["created"], body["model"], body["system_fingerprint"]) == ("a", 1, "m1", "fp")
    assert body["object"] == "chat.completion"


def test_error_chunk_mid_stream():
    asm = StreamAssembler("chat")
    asm.feed(chunk(delta={"role": "assistant", "content": "par"}, token_ids=[5]))
    asm.feed_event(orjson.dumps({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}))
    body = asm.body()
    assert body["error"] == {"message": "engine died", "type": "InternalServerError", "code": 500}
    assert body["choices"][0]["message"]["content"] == "par"
    assert body["choices"][0]["token_ids"] == [5]
    assert asm.error == body["error"] and not asm.done


def test_error_chunk_that_is_a_string_and_one_with_choices():
    asm = StreamAssembler("chat")
    asm.feed({"error": "boom"})
    assert asm.body()["error"] == {"message": "boom"}
    asm = StreamAssembler("chat")
    asm.feed({"error": None, "choices": [{"index": 0, "delta": {"content": "x"}}]})  # has choices: not an error
    assert asm.error is None and "error" not in asm.body()
    assert asm.body()["choices"][0]["message"]["content"] == "x"


def test_feed_event_ignores_bad_json_and_non_objects_and_sees_done():
    asm = StreamAssembler("chat")
    asm.feed_event(b"{not json")
    asm.feed_event(b"[1, 2]")
    asm.feed_event(b'"x"')
    assert asm.events == 0
    asm.feed_event(b"  [DONE]\n")
    assert asm.done
    assert asm.body() == {"object": "chat.completion", "choices": []}


# --- completions streams -----------------------------------------------------------------------------------

COMPLETION_CHUNKS = [
    {
        "id": "cmpl-7",
        "object": "text_completion",
        "created": 1700000002,
        "model": "policy",
        "choices": [
            {
                "index": 0,
                "text": "The",
                "prompt_token_ids": [1, 2, 3],
                "token_ids": [30],
                "logprobs": {
                    "text_offset": [0],
                    "token_logprobs": [-0.5],
                    "tokens": ["The"],
                    "top_logprobs": [{"The": -0.5}],
                },
                "finish_reason": None,
            }
        ],
    },
    {
        "id": "cmpl-7",
        "object": "text_completion",
        "created": 1700000002,
        "model": "policy",
        "choices": [
            {
                "index": 0,
                "text": " sky",
                "token_ids": [31, 32],
                "logprobs": {
                    "text_offset": [3, 5],
                    "token_logprobs": [-0.25, -1.0],
                    "tokens": [" s", "ky"],
                    "top_logprobs": [{" s": -0.25}, {"ky": -1.0}],
                },
                "finish_reason": None,
            }
        ],
    },
    {
        "id": "cmpl-7",
        "object": "text_completion",
        "created": 1700000002,
        "model": "policy",
        "choices": [
            {"index": 0, "text": "", "token_ids": [], "logprobs": None, "finish_reason": "length", "stop_reason": None}
        ],
    },
    {
        "id": "cmpl-7",
        "object": "text_completion",
        "created": 1700000002,
        "model": "policy",
        "choices": [],
        "usage": {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3},
    },
]

COMPLETION_NON_STREAM = {
    "id": "cmpl-7",
    "object": "text_completion",
    "created": 1700000002,
    "model": "policy",
    "choices": [
        {
            "index": 0,
            "text": "The sky",
            "prompt_token_ids": [1, 2, 3],
            "token_ids": [30, 31, 32],
            "logprobs": {
                "text_offset": [0, 3, 5],
                "token_logprobs": [-0.5, -0.25, -1.0],
                "tokens": ["The", " s", "ky"],
                "top_logprobs": [{"The": -0.5}, {" s": -0.25}, {"ky": -1.0}],
            },
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3},
}


def assemble_completion() -> dict:
    asm = StreamAssembler("completion")
    for c in COMPLETION_CHUNKS:
        asm.feed(c)
    return asm.body()


def test_completion_stream_text_tokens_usage_and_training_data():
    body = assemble_completion()
    assert body["object"] == "text_completion"
    assert (body["id"], body["created"], body["model"]) == ("cmpl-7", 1700000002, "policy")
    c = body["choices"][0]
    assert c["text"] == "The sky"
    assert c["token_ids"] == [30, 31, 32]
    assert c["finish_reason"] == "length"
    assert c["logprobs"]["token_logprobs"] == [-0.5, -0.25, -1.0]
    assert body["usage"] == COMPLETION_NON_STREAM["usage"]
    assert (
        tokens_of(body)
        == tokens_of(COMPLETION_NON_STREAM)
        == Tokens([1, 2, 3], [30, 31, 32], [-0.5, -0.25, -1.0], "length")
    )


def test_completion_stream_ignores_chat_deltas():
    asm = StreamAssembler("completion")
    asm.feed({"choices": [{"index": 0, "delta": {"content": "no"}, "text": "yes"}]})
    assert asm.body()["choices"] == [
        {"index": 0, "text": "yes", "logprobs": None, "finish_reason": None, "token_ids": None}
    ]


def test_completion_stream_keeps_prompt_token_ids_where_the_non_stream_answer_has_them():
    body = assemble_completion()
    assert body["choices"][0].get("prompt_token_ids") == [1, 2, 3]
    assert "prompt_token_ids" not in body


def test_completion_stream_logprobs_equal_the_non_stream_ones():
    assert assemble_completion()["choices"][0]["logprobs"] == COMPLETION_NON_STREAM["choices"][0]["logprobs"]


# --- property: chunk boundaries do not matter ---------------------------------------------------------------


def _cuts(draw, n: int, parts: int) -> list[tuple[int, int]]:
    points = sorted(draw(st.lists(st.integers(0, n), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *points, n]
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


@st.composite
def split_answers(draw):
    content = draw(st.text(max_size=40))
    names = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=12)
    tools = draw(st.lists(st.tuples(names, st.text(max_size=30)), max_size=3))
    n_tok = draw(st.integers(0, 25))
    ids = draw(st.lists(st.integers(0, 200_000), min_size=n_tok, max_size=n_tok))
    lps = draw(st.lists(st.floats(-30.0, 0.0, allow_nan=False), min_size=n_tok, max_size=n_tok))
    parts = draw(st.integers(1, 10))
    content_cuts = _cuts(draw, len(content), parts)
    tool_cuts = [_cuts(draw, len(args), parts) for _, args in tools]
    headers_at = [draw(st.integers(0, parts - 1)) for _ in tools]  # the chunk naming tool j
    id_cuts = _cuts(draw, n_tok, parts)
    lp_cuts = _cuts(draw, n_tok, parts)  # independent of the ids: the assembler must not pair them up
    chunks = [
        {
            **BASE,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
            "prompt_token_ids": [1, 2],
        }
    ]
    for k in range(parts):
        delta: dict = {}
        a, b = content_cuts[k]
        if b > a:
            delta["content"] = content[a:b]
        deltas = []
        for j, (name, args) in enumerate(tools):
            a, b = tool_cuts[j][k]
            tc: dict = {"index": j, "function": {"arguments": args[a:b]}}
            if k == headers_at[j]:
                tc.update(id=f"chatcmpl-tool-{j}", type="function")
                tc["function"]["name"] = name
            if b > a or k == headers_at[j]:
                deltas.append(tc)
        if deltas:
            delta["tool_calls"] = draw(st.permutations(deltas))
        a, b = id_cuts[k]
        c, d = lp_cuts[k]
        chunks.append(
            {
                **BASE,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "token_ids": ids[a:b],
                        "logprobs": {"content": [lp(i, x) for i, x in zip(range(c, d), lps[c:d])]} if d > c else None,
                        "finish_reason": None,
                    }
                ],
            }
        )
    chunks.append(
        {
            **BASE,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": "tool_calls" if tools else "stop",
                    "token_ids": [],
                }
            ],
        }
    )
    expected_msg: dict = {"role": "assistant", "content": content or None}
    if tools:
        expected_msg["tool_calls"] = [
            {"id": f"chatcmpl-tool-{j}", "type": "function", "function": {"name": name, "arguments": args}}
            for j, (name, args) in enumerate(tools)
        ]
    expected = {
        "id": BASE["id"],
        "object": "chat.completion",
        "created": BASE["created"],
        "model": BASE["model"],
        "choices": [
            {
                "index": 0,
                "message": expected_msg,
                "logprobs": {"content": [lp(i, x) for i, x in enumerate(lps)]} if lps else None,
                "finish_reason": "tool_calls" if tools else "stop",
                "token_ids": ids or None,
            }
        ],
        "prompt_token_ids": [1, 2],
    }
    return chunks, expected, ids, lps


@settings(max_examples=150, deadline=None)
@given(split_answers())
def test_any_chunking_assembles_back_to_the_same_answer(case):
    chunks, expected, ids, lps = case
    asm = StreamAssembler("chat")
    for c in chunks:
        asm.feed(c)
    body = asm.body()
    assert body == expected
    t = tokens_of(body)
    assert t.completion_token_ids == (ids or None)
    assert t.logprobs == (lps or None)
    assert t.prompt_token_ids == [1, 2]


@settings(max_examples=100, deadline=None)
@given(split_answers(), st.data())
def test_any_byte_split_of_the_sse_stream_assembles_the_same(case, data):
    chunks, expected, _, _ = case
    seps = [data.draw(st.sampled_from([b"\n\n", b"\r\n\r\n"])) for _ in chunks]
    raw = b"".join(b"data: " + orjson.dumps(c) + s for c, s in zip(chunks, seps)) + b"data: [DONE]\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    asm = StreamAssembler("chat")
    buf = b""
    for p in pieces:
        events, buf = _split_events(buf + p)
        for e in events:
            asm.feed_event(_data_of(e))
    assert buf == b""
    assert asm.done
    assert asm.events == len(chunks)
    assert asm.body() == expected
