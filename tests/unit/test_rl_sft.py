"""Supervised fine-tuning samples (rl/sft.py) and the re-tokenizing of calls another model served (rl/retokenize.py),
against hand-built expectations with the calculator model's tokenizer and chat template (demo/calc_model.py; the
tokenizer is trained in-process, no model weights).

* A teacher's tool call and its answer after the tool result render as the policy would generate them: the prompt
  is the template's rendering with the generation prompt, the completion the assistant turn up to and including
  its end-of-turn token (the EOS), never the newline the template writes after it.
* Only completion tokens are trained: in trajectory mode the two calls of a tool episode are one sample whose
  mask is 1 on exactly the tool call and the answer (each with its EOS) and 0 on the prompt, the tool result and
  the template's markers between them.
* ``sft_from`` and ``min_reward`` select exactly the right calls and sessions.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from demo import calc_model, calc_task  # noqa: E402
from trainwire.rl.retokenize import ChatRenderer, RenderError, normalize_message  # noqa: E402
from trainwire.rl.sft import build_sft_samples  # noqa: E402
from trainwire.store.episodes import ClaimedCall, ClaimedSession  # noqa: E402

Q = calc_task.Question(expression="37*48+29", text="What is 37*48+29?", answer=1805)
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "calculator", "arguments": '{"expression":"37*48+29"}'},
}  # compact, as a provider may
TOOL_CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "37*48+29"}}</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def tok():
    return calc_model._train_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
    return ChatRenderer(tok)


def first_request() -> dict:
    return {"model": "teacher", "messages": Q.messages(), "tools": [calc_task.TOOL]}


def second_request() -> dict:
    return {
        "model": "teacher",
        "tools": [calc_task.TOOL],
        "messages": Q.messages()
        + [
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "1805"},
        ],
    }


def answer(content=None, tool_calls=None) -> dict:
    return {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls" if tool_calls else "stop",
                "message": {"role": "assistant", "content": content, "tool_calls": tool_calls},
            }
        ]
    }


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def template(tok, messages, generation_prompt: bool) -> str:
    return tok.apply_chat_template(
        messages, tools=[calc_task.TOOL], add_generation_prompt=generation_prompt, tokenize=False
    )


# ------------------------------------------------------------------------------------------------ rendering


def test_a_teacher_tool_call_renders_as_the_policy_would_generate_it(tok, renderer):
    prompt, completion = renderer.call_tokens(first_request(), answer(tool_calls=[CALL]))
    want_prompt = template(tok, Q.messages(), True)
    assert want_prompt.endswith("<|im_start|>assistant\n")
    assert prompt == encode(tok, want_prompt)
    # the arguments are rendered from the parsed object, as vLLM renders them; the EOS ends the completion
    assert tok.decode(completion) == TOOL_CALL_TEXT
    assert completion[-1] == tok.eos_token_id and completion.count(tok.eos_token_id) == 1
    assert completion == encode(tok, TOOL_CALL_TEXT)


def test_the_answer_after_the_tool_result(tok, renderer):
    prompt, completion = renderer.call_tokens(second_request(), answer(content="1805"))
    text = tok.decode(prompt)
    assert text.endswith("<|im_start|>tool\n1805<|im_end|>\n<|im_start|>assistant\n")
    assert TOOL_CALL_TEXT + "\n" in text  # the earlier tool call, as the policy generated it, then the newline
    assert tok.decode(completion) == "1805<|im_end|>"
    assert [tok.decode([t]) for t in completion] == ["1", "8", "0", "5", "<|im_end|>"]  # digits one by one


def test_turns_continue_each_other(renderer):
    """The second call's prompt starts with the first call's prompt and completion: one trajectory."""
    p1, c1 = renderer.call_tokens(first_request(), answer(tool_calls=[CALL]))
    p2, _ = renderer.call_tokens(second_request(), answer(content="1805"))
    assert p2[: len(p1) + len(c1)] == p1 + c1


def test_messages_are_normalized_like_vllm():
    assert normalize_message(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ) == {"role": "user", "content": "a\nb"}
    assert normalize_message({"role": "assistant", "content": None}) == {"role": "assistant", "content": ""}
    bad = normalize_message(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": "calculator", "arguments": "{not json"}},
                {"id": "y", "type": "function", "function": {"name": "calculator", "arguments": "[1, 2]"}},
            ],
        }
    )
    assert [tc["function"]["arguments"] for tc in bad["tool_calls"]] == [{}, {}]
    assert "tool_calls" not in normalize_message({"role": "assistant", "content": "hi", "tool_calls": []})
    assert normalize_message({"role": "tool", "tool_call_id": "c", "content": "1", "extra": 1}) == {
        "role": "tool",
        "tool_call_id": "c",
        "content": "1",
    }


def test_calls_that_cannot_be_rendered_say_why(renderer):
    with pytest.raises(RenderError, match="no messages"):
        renderer.call_tokens({"model": "teacher"}, answer(content="1"))
    with pytest.raises(RenderError, match="empty"):
        renderer.call_tokens(first_request(), answer(content=""))
    with pytest.raises(RenderError, match="image_url"):
        renderer.call_tokens(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, answer(content="1")
        )


# ------------------------------------------------------------------------------------------------ samples

_n = 0


def frozen(request, response, *, model="teacher", status=200, sid="s", untrainable=None) -> ClaimedCall:
    global _n
    _n += 1
    return ClaimedCall(
        id=f"{sid}-f{_n}",
        seq=_n,
        agent_name="calculator",
        policy_version=None,
        prompt_token_ids=None,
        completion_token_ids=None,
        logprobs=None,
        finish_reason="stop",
        reward=0.0,
        aborted=False,
        status_code=status,
        route="frozen",
        model_requested=model,
        request=request,
        response=response,
        untrainable_reason=untrainable,
    )


def own(prompt, completion, *, untrainable=None, sid="s") -> ClaimedCall:
    global _n
    _n += 1
    return ClaimedCall(
        id=f"{sid}-p{_n}",
        seq=_n,
        agent_name="calculator",
        policy_version=3,
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        logprobs=[-0.5] * len(completion),
        finish_reason="stop",
        reward=0.0,
        aborted=False,
        status_code=200,
        untrainable_reason=untrainable,
    )


def teacher_episode(sid: str, final: float | None = 1.0, model: str = "teacher") -> ClaimedSession:
    return ClaimedSession(
        id=sid,
        task_id=None,
        final_reward=final,
        calls=[
            frozen(first_request(), answer(tool_calls=[CALL]), model=model, sid=sid),
            frozen(second_request(), answer(content="1805"), model=model, sid=sid),
        ],
    )


def test_trajectory_trains_only_the_completions(tok, renderer):
    res = build_sft_samples([teacher_episode("s1")], renderer=renderer, sft_from=["teacher"], mode="trajectory")
    (s,) = res.samples
    s.validate()
    assert res.counters["teacher_calls"] == 2 and res.counters["merged"] == 1
    assert tok.decode(s.prompt_ids) == template(tok, Q.messages(), True)
    trained = [t for t, m in zip(s.response_ids, s.response_mask) if m]
    masked = [t for t, m in zip(s.response_ids, s.response_mask) if not m]
    assert tok.decode(trained) == TOOL_CALL_TEXT + "1805<|im_end|>"
    assert tok.decode(masked) == "\n<|im_start|>tool\n1805<|im_end|>\n<|im_start|>assistant\n"
    # the mask, position by position: tool call (1), the result and markers (0), the answer (1)
    n_call = len(encode(tok, TOOL_CALL_TEXT))
    n_between = len(masked)
    assert s.response_mask == [1] * n_call + [0] * n_between + [1] * 5
    # the whole sequence is the template's rendering of the episode, cut after the last EOS
    full = Q.messages() + [
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1805"},
        {"role": "assistant", "content": "1805"},
    ]
    rendered = template(tok, [normalize_message(m) for m in full], False)
    assert tok.decode(s.prompt_ids + s.response_ids) == rendered[:-1]  # all but the template's last newline
    assert s.weight == 1.0 and s.advantage == 0.0


def test_transition_mode_one_sample_per_call(tok, renderer):
    res = build_sft_samples([teacher_episode("s1")], renderer=renderer, sft_from=["teacher"], mode="transition")
    a, b = res.samples
    assert tok.decode(a.response_ids) == TOOL_CALL_TEXT and a.response_mask == [1] * len(a.response_ids)
    assert tok.decode(b.response_ids) == "1805<|im_end|>" and b.response_mask == [1] * 5
    assert res.call_ids == [(res.call_ids[0][0],), (res.call_ids[1][0],)]


def test_sft_from_and_min_reward_select_exactly_the_right_calls(renderer):
    sessions = [
        teacher_episode("right", final=1.0),
        teacher_episode("wrong", final=0.0),  # below --min-reward
        teacher_episode("unrewarded", final=None),  # closed without a reward: no reward to pass
        teacher_episode("other-route", final=1.0, model="checker"),  # a frozen route not named in --sft-from
        ClaimedSession(
            id="mixed",
            task_id=None,
            final_reward=1.0,
            calls=[
                own([1, 2, 3], [4, 5], sid="mixed"),
                own(
                    [1, 2, 3, 4, 5, 6],
                    [7],
                    untrainable="tokens: 2 recorded prompt token ids, but usage says 3",
                    sid="mixed",
                ),
                frozen(first_request(), answer(tool_calls=[CALL]), sid="mixed"),
                frozen(first_request(), {"error": {"message": "boom"}}, status=502, sid="mixed"),
                frozen(first_request(), answer(content=""), sid="mixed"),  # nothing to render
                frozen(
                    first_request(),
                    answer(tool_calls=[CALL]),
                    sid="mixed",
                    untrainable="evaluation call (X-Trainwire-Train: false)",
                ),
            ],
        ),  # the proxy says: evaluation
    ]
    res = build_sft_samples(sessions, renderer=renderer, sft_from=["teacher"], min_reward=0.5, mode="transition")
    assert sorted(res.skipped_sessions) == ["other-route", "unrewarded", "wrong"]
    picked = [c for cs in res.call_ids for c in cs]
    right, mixed = sessions[0], sessions[4]
    assert picked == [c.id for c in right.calls] + [mixed.calls[0].id, mixed.calls[2].id]
    c = res.counters
    assert (
        c["teacher_calls"],
        c["own_calls"],
        c["skipped_reward"],
        c["skipped_untrainable"],
        c["skipped_failed"],
        c["skipped_render"],
        c["skipped_empty"],
    ) == (3, 1, 2, 2, 1, 1, 1)
    own_sample = res.samples[2]
    assert (own_sample.prompt_ids, own_sample.response_ids, own_sample.old_logprobs) == (
        [1, 2, 3],
        [4, 5],
        [-0.5, -0.5],
    )
    assert any("recorded answer is empty" in why for why in res.skip_reasons)
    assert res.skip_reasons["evaluation call (X-Trainwire-Train: false)"] == 1
    assert res.scores == [1.0] * len(res.samples)

    # without --min-reward every session with something to train on counts; without --sft-from only own calls
    assert sorted(build_sft_samples(sessions, renderer=renderer, sft_from=["teacher"]).skipped_sessions) == [
        "other-route"
    ]
    only_own = build_sft_samples(sessions, mode="transition")
    assert [c for cs in only_own.call_ids for c in cs] == [mixed.calls[0].id]
    both = build_sft_samples(sessions, renderer=renderer, sft_from=["teacher", "checker"], mode="trajectory")
    assert "other-route" not in both.skipped_sessions


def test_sft_from_needs_the_policy_template():
    with pytest.raises(ValueError, match="renderer"):
        build_sft_samples([], sft_from=["teacher"])


def test_renderer_needs_an_eos(tok):
    class NoEos:
        chat_template = tok.chat_template
        eos_token_id = None

    with pytest.raises(RenderError, match="EOS"):
        ChatRenderer(NoEos())


def test_teacher_arguments_round_trip_through_json(renderer, tok):
    """Spacing and key order of the provider's arguments string do not reach the tokens: the template renders the
    parsed object (what vLLM does), so every teacher call of one expression trains the same tokens."""
    spaced = {**CALL, "function": {**CALL["function"], "arguments": json.dumps({"expression": "37*48+29"}, indent=2)}}
    a = renderer.call_tokens(first_request(), answer(tool_calls=[CALL]))
    b = renderer.call_tokens(first_request(), answer(tool_calls=[spaced]))
    assert a == b
