"""proxy/transparency.py: `prepare` adds to a request what training needs (`return_token_ids`, `logprobs`,
`stream_options.include_usage`) and says what it added; `strip` removes exactly that from the answer. The property at
the end runs a small stand-in for vLLM (its answer depends on the request the way vLLM's does) and checks that the
client gets, after injection and stripping, what it would have got without the proxy."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainwire.proxy.transparency import Injected, prepare, strip

# --- prepare ---------------------------------------------------------------------------------------------


def test_chat_non_stream_gets_token_ids_and_logprobs_but_no_stream_options():
    body = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}
    inj = prepare("chat", body)
    assert inj == Injected(token_ids=True, logprobs=True, usage=False)
    assert body == {
        "model": "policy",
        "messages": [{"role": "user", "content": "hi"}],
        "return_token_ids": True,
        "logprobs": True,
    }


def test_chat_stream_also_gets_include_usage():
    body = {"model": "policy", "messages": [], "stream": True}
    inj = prepare("chat", body)
    assert inj == Injected(token_ids=True, logprobs=True, usage=True)
    assert body == {
        "model": "policy",
        "messages": [],
        "stream": True,
        "return_token_ids": True,
        "logprobs": True,
        "stream_options": {"include_usage": True},
    }


def test_completion_gets_logprobs_zero():
    body = {"model": "policy", "prompt": "2+2="}
    inj = prepare("completion", body)
    assert inj == Injected(token_ids=True, logprobs=True, usage=False)
    assert body == {"model": "policy", "prompt": "2+2=", "return_token_ids": True, "logprobs": 0}
    assert body["logprobs"] is not False and type(body["logprobs"]) is int


def test_completion_stream_gets_include_usage():
    body = {"prompt": "x", "stream": True}
    assert prepare("completion", body) == Injected(True, True, True)
    assert body["stream_options"] == {"include_usage": True}
    assert body["logprobs"] == 0


def test_nothing_injected_when_the_client_asked_for_everything():
    chat = {
        "messages": [],
        "stream": True,
        "return_token_ids": True,
        "logprobs": True,
        "top_logprobs": 3,
        "stream_options": {"include_usage": True},
    }
    before = copy.deepcopy(chat)
    inj = prepare("chat", chat)
    assert inj == Injected(False, False, False) and not inj.any
    assert chat == before
    completion = {"prompt": "x", "return_token_ids": True, "logprobs": 2}
    assert prepare("completion", completion) == Injected(False, False, False)
    assert completion == {"prompt": "x", "return_token_ids": True, "logprobs": 2}


def test_completion_logprobs_zero_from_the_client_is_its_own():
    body = {"prompt": "x", "logprobs": 0}
    inj = prepare("completion", body)
    assert inj.logprobs is False and body["logprobs"] == 0
    assert inj.token_ids is True


def test_falsy_client_values_are_overridden_and_counted_as_injected():
    body = {"messages": [], "return_token_ids": False, "logprobs": False}
    assert prepare("chat", body) == Injected(True, True, False)
    assert body["return_token_ids"] is True and body["logprobs"] is True
    body = {"prompt": "x", "logprobs": None}
    assert prepare("completion", body).logprobs is True and body["logprobs"] == 0


@pytest.mark.parametrize(
    "opts, merged",
    [
        (None, {"include_usage": True}),
        ({}, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        ({"continuous_usage_stats": True}, {"continuous_usage_stats": True, "include_usage": True}),
        ("junk", {"include_usage": True}),
    ],
)
def test_stream_options_are_merged_not_replaced(opts, merged):
    body = {"messages": [], "stream": True, "stream_options": opts}
    assert prepare("chat", body).usage is True
    assert body["stream_options"] == merged


def test_stream_options_untouched_without_stream():
    body = {"messages": [], "stream": False, "stream_options": {"include_usage": False}}
    assert prepare("chat", body).usage is False
    assert body["stream_options"] == {"include_usage": False}


@pytest.mark.parametrize("kind", ["other", "passthrough", ""])
def test_other_kinds_are_left_alone(kind):
    body = {"input": "x", "stream": True}
    inj = prepare(kind, body)
    assert inj == Injected() and not inj.any
    assert body == {"input": "x", "stream": True}


def test_injected_any():
    assert not Injected().any
    assert Injected(token_ids=True).any and Injected(logprobs=True).any and Injected(usage=True).any


# --- strip -------------------------------------------------------------------------------------------------


def chat_response(**choice_extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "policy",
        "prompt_token_ids": [1, 2],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "token_ids": [5],
                "logprobs": {"content": [{"token": "hi", "logprob": -0.5}]},
                "finish_reason": "stop",
                **choice_extra,
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }


def test_strip_everything_injected_from_a_non_stream_answer():
    body = chat_response()
    assert strip(body, Injected(token_ids=True, logprobs=True)) is True
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "policy",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }


def test_strip_keeps_the_logprobs_the_client_asked_for():
    body = chat_response()
    strip(body, Injected(token_ids=True))
    assert body["choices"][0]["logprobs"] == {"content": [{"token": "hi", "logprob": -0.5}]}
    assert "token_ids" not in body["choices"][0] and "prompt_token_ids" not in body


def test_strip_keeps_the_token_ids_the_client_asked_for():
    body = chat_response()
    strip(body, Injected(logprobs=True))
    assert body["choices"][0]["token_ids"] == [5] and body["prompt_token_ids"] == [1, 2]
    assert body["choices"][0]["logprobs"] is None


def test_strip_nothing_injected_changes_nothing():
    body = chat_response()
    before = copy.deepcopy(body)
    assert strip(body, Injected()) is True
    assert body == before


def test_strip_completion_choice_level_prompt_ids():
    body = {
        "choices": [
            {"index": 0, "text": "x", "prompt_token_ids": [1], "token_ids": [2], "logprobs": {"token_logprobs": [-1.0]}}
        ]
    }
    strip(body, Injected(token_ids=True, logprobs=True))
    assert body == {"choices": [{"index": 0, "text": "x", "logprobs": None}]}


def test_strip_does_not_add_a_logprobs_key():
    body = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    strip(body, Injected(logprobs=True))
    assert body == {"choices": [{"index": 0, "delta": {"content": "x"}}]}


def test_usage_only_chunk_is_dropped_only_when_usage_was_injected():
    usage_chunk = {"id": "c", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    assert strip(copy.deepcopy(usage_chunk), Injected(token_ids=True, logprobs=True, usage=True)) is False
    kept = copy.deepcopy(usage_chunk)
    assert strip(kept, Injected(token_ids=True, logprobs=True, usage=False)) is True
    assert kept == usage_chunk
    no_choices_key = {"id": "c", "usage": {"prompt_tokens": 2}}
    assert strip(no_choices_key, Injected(usage=True)) is False


def test_usage_on_a_chunk_with_choices_is_removed_but_the_chunk_kept():
    c = {
        "id": "c",
        "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1},
    }
    assert strip(c, Injected(usage=True)) is True
    assert c == {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None}]}


def test_chunk_without_usage_is_kept_when_usage_was_injected():
    c = {"id": "c", "choices": []}
    assert strip(c, Injected(usage=True)) is True
    assert c == {"id": "c", "choices": []}


# --- property: prepare, then strip, is invisible to the client --------------------------------------------

PROMPT = [11, 12, 13]
PIECES = [("The", [1], [-0.5]), (" answer", [2, 3], [-0.25, -1.0]), (" is 4", [4, 5, 6], [-2.0, -0.125, -0.75])]


def fake_vllm(kind: str, req: dict) -> dict | list[dict]:
    """What vLLM answers to `req`: token ids only with return_token_ids, logprobs only when asked (null otherwise),
    usage on streams only with include_usage (on every chunk with continuous_usage_stats)."""
    want_ids = bool(req.get("return_token_ids"))
    want_lp = bool(req.get("logprobs")) if kind == "chat" else req.get("logprobs") is not None
    top_n = (req.get("top_logprobs") or 0) if kind == "chat" else (req.get("logprobs") or 0)
    opts = req.get("stream_options") if isinstance(req.get("stream_options"), dict) else {}
    include_usage = bool(opts.get("include_usage"))
    continuous = include_usage and bool(opts.get("continuous_usage_stats"))
    base = {
        "id": "x-1",
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": 1700000000,
        "model": req["model"],
    }

    def logprobs(pieces):
        ids = [i for _, ids, _ in pieces for i in ids]
        lps = [x for _, _, lps in pieces for x in lps]
        if not want_lp:
            return None
        if kind == "chat":
            return {
                "content": [
                    {
                        "token": f"t{i}",
                        "logprob": x,
                        "bytes": [i],
                        "top_logprobs": [{"token": f"t{i}", "logprob": x}] * top_n,
                    }
                    for i, x in zip(ids, lps)
                ]
            }
        return {
            "text_offset": list(range(len(ids))),
            "token_logprobs": lps,
            "tokens": [f"t{i}" for i in ids],
            "top_logprobs": [{f"t{i}": x} for i, x in zip(ids, lps)] if top_n else None,
        }

    n_out = sum(len(ids) for _, ids, _ in PIECES)
    usage = {"prompt_tokens": len(PROMPT), "completion_tokens": n_out, "total_tokens": len(PROMPT) + n_out}
    if not req.get("stream"):
        choice: dict = {"index": 0}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": "".join(t for t, _, _ in PIECES)}
        else:
            choice["text"] = "".join(t for t, _, _ in PIECES)
        choice["logprobs"] = logprobs(PIECES)
        choice["finish_reason"] = "stop"
        if want_ids:
            choice["token_ids"] = [i for _, ids, _ in PIECES for i in ids]
            if kind == "completion":
                choice["prompt_token_ids"] = PROMPT
        body = {
            **base,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "choices": [choice],
            "usage": usage,
        }
        if want_ids and kind == "chat":
            body["prompt_token_ids"] = PROMPT
        return body
    chunks = []
    if kind == "chat":
        first = {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
        if want_ids:
            first["prompt_token_ids"] = PROMPT
        chunks.append(first)
    done = 0
    for n, piece in enumerate(PIECES):
        text, ids, _ = piece
        choice = {"index": 0}
        if kind == "chat":
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs([piece])
        choice["finish_reason"] = None
        if want_ids:
            choice["token_ids"] = ids
            if kind == "completion" and n == 0:
                choice["prompt_token_ids"] = PROMPT
        done += len(ids)
        chunks.append({**base, "choices": [choice]})
    last = {
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
        **({"delta": {}} if kind == "chat" else {"text": ""}),
    }
    if want_ids:
        last["token_ids"] = []
    chunks.append({**base, "choices": [last]})
    if continuous:
        for c in chunks:
            c["usage"] = {"prompt_tokens": len(PROMPT), "completion_tokens": done, "total_tokens": len(PROMPT) + done}
    if include_usage:
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


ABSENT = object()


@st.composite
def client_requests(draw):
    kind = draw(st.sampled_from(["chat", "completion"]))
    req: dict = {"model": "policy"}
    req["messages" if kind == "chat" else "prompt"] = [{"role": "user", "content": "q"}] if kind == "chat" else "q"
    ids = draw(st.sampled_from([ABSENT, True, False]))
    if ids is not ABSENT:
        req["return_token_ids"] = ids
    if kind == "chat":
        lp = draw(st.sampled_from([ABSENT, True, False]))
        if lp is not ABSENT:
            req["logprobs"] = lp
            if lp is True and draw(st.booleans()):
                req["top_logprobs"] = draw(st.integers(1, 3))
    else:
        lp = draw(st.sampled_from([ABSENT, None, 0, 1, 3]))
        if lp is not ABSENT:
            req["logprobs"] = lp
    stream = draw(st.sampled_from([ABSENT, False, True]))
    if stream is not ABSENT:
        req["stream"] = stream
    opts = draw(
        st.sampled_from(
            [
                ABSENT,
                None,
                {},
                {"include_usage": True},
                {"include_usage": False},
                {"continuous_usage_stats": True},
                {"include_usage": True, "continuous_usage_stats": True},
            ]
        )
    )
    if opts is not ABSENT and stream is True:
        req["stream_options"] = copy.deepcopy(opts)
    return kind, req


def client_view(kind: str, answer, inj: Injected):
    if isinstance(answer, dict):
        assert strip(answer, inj) is True
        return answer
    return [c for c in answer if strip(c, inj)]


@settings(max_examples=300, deadline=None)
@given(client_requests())
def test_prepare_then_strip_is_what_the_client_would_have_got(case):
    kind, req = case
    without_proxy = fake_vllm(kind, copy.deepcopy(req))
    sent = copy.deepcopy(req)
    inj = prepare(kind, sent)
    with_injection = fake_vllm(kind, sent)
    # the injection did reach the upstream: token ids and logprobs are always there for training
    first_choices = with_injection["choices"] if isinstance(with_injection, dict) else with_injection[1]["choices"]
    assert first_choices[0]["logprobs"] is not None
    assert first_choices[0]["token_ids"]
    assert client_view(kind, with_injection, inj) == without_proxy
