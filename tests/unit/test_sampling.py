"""Sampling integrity (proxy/sampling.py): what each --sampling-policy does to a trainable call's settings."""

from __future__ import annotations

import pytest

from trainwire.proxy.errors import ApiError
from trainwire.proxy.sampling import apply, neutral


def test_omitted_settings_are_sent_explicitly_so_model_defaults_never_apply():
    body = {"messages": []}
    out = apply(body, policy="enforce", temperature=1.0)
    assert {k: body[k] for k in neutral(1.0)} == neutral(1.0)
    assert out.requested == {} and out.changed == [] and out.untrainable is None
    assert out.effective == neutral(1.0)


@pytest.mark.parametrize("policy", ["enforce", "reject", "record"])
def test_settings_equal_to_the_training_ones_pass_under_every_policy(policy):
    body = {"temperature": 0.7, "top_p": 1, "top_k": -1, "min_p": 0}
    out = apply(body, policy=policy, temperature=0.7)
    assert out.untrainable is None and out.changed == []
    assert body["top_k"] == 0  # -1 and 0 both mean "off"; the one vLLM documents is sent
    assert out.requested == {"temperature": 0.7, "top_p": 1, "top_k": -1, "min_p": 0}


def test_enforce_replaces_other_settings_and_says_which():
    body = {"temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.5}
    out = apply(body, policy="enforce", temperature=1.0)
    assert (body["temperature"], body["top_p"], body["presence_penalty"]) == (1.0, 1.0, 0.0)
    assert out.changed == ["temperature", "top_p", "presence_penalty"]
    assert out.untrainable is None
    assert out.record() == {
        "requested": {"temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.5},
        "effective": neutral(1.0),
        "enforced": ["temperature", "top_p", "presence_penalty"],
    }


def test_reject_names_the_setting():
    with pytest.raises(ApiError) as exc:
        apply({"temperature": 0.7}, policy="reject", temperature=1.0)
    assert exc.value.status == 400 and exc.value.param == "temperature"
    assert "temperature 0.7" in exc.value.message and "temperature=1.0" in exc.value.message
    with pytest.raises(ApiError) as exc:
        apply({"temperature": 0}, policy="reject", temperature=1.0)
    assert "greedy" in exc.value.message


def test_record_sends_as_asked_and_marks_the_call_untrainable():
    body = {"temperature": 0.7}
    out = apply(body, policy="record", temperature=1.0)
    assert body["temperature"] == 0.7 and out.effective["temperature"] == 0.7
    assert out.untrainable == "sampling: temperature 0.7 differs from the training value 1.0"


def test_greedy_never_enters_training_silently():
    assert "greedy" in apply({"temperature": 0.0}, policy="record", temperature=1.0).untrainable
    body = {"temperature": 0.0}
    out = apply(body, policy="enforce", temperature=1.0)  # sampled at the training temperature instead
    assert body["temperature"] == 1.0 and out.changed == ["temperature"]


@pytest.mark.parametrize(
    "extra, what",
    [
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"min_tokens": 3}, "min_tokens"),
    ],
)
def test_constraints_cannot_be_enforced_so_they_mark_the_call(extra, what):
    out = apply(dict(extra), policy="enforce", temperature=1.0)
    assert out.untrainable and what in out.untrainable
    with pytest.raises(ApiError):
        apply(dict(extra), policy="reject", temperature=1.0)


def test_harmless_settings_are_not_constraints():
    for extra in (
        {"tool_choice": "auto"},
        {"response_format": {"type": "text"}},
        {"logit_bias": {}},
        {"seed": 3},
        {"stop": ["x"]},
        {"max_tokens": 5},
    ):
        assert apply(dict(extra), policy="enforce", temperature=1.0).untrainable is None


STRICT_TOOLS = [
    {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}, "strict": True}},
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
]


def test_strict_tools_are_sent_without_strict_under_enforce():
    """vLLM decodes a strict tool's arguments under a grammar (the OpenAI Agents SDK marks every tool strict):
    enforce leaves strict out upstream and says so; the client's tool list is not changed in place."""
    body = {"messages": [], "tools": STRICT_TOOLS}
    out = apply(body, policy="enforce", temperature=1.0)
    assert out.untrainable is None and out.changed == ["tools.strict"]
    assert [t["function"] for t in body["tools"]] == [
        {"name": "calculator", "parameters": {"type": "object"}},
        {"name": "other", "parameters": {"type": "object"}},
    ]
    assert STRICT_TOOLS[0]["function"]["strict"] is True
    assert body["temperature"] == 1.0  # the neutral settings still go in


def test_strict_tools_under_reject_and_record():
    with pytest.raises(ApiError) as exc:
        apply({"tools": STRICT_TOOLS}, policy="reject", temperature=1.0)
    assert exc.value.status == 400 and exc.value.param == "tools" and "strict" in exc.value.message
    body = {"tools": STRICT_TOOLS}
    out = apply(body, policy="record", temperature=1.0)
    assert body["tools"] is STRICT_TOOLS and "strict" in out.untrainable


def test_tools_without_strict_pass_untouched():
    tools = [dict(STRICT_TOOLS[1]), {"type": "function", "function": {"name": "f", "strict": False}}]
    body = {"tools": tools}
    out = apply(body, policy="reject", temperature=1.0)
    assert body["tools"] is tools and out.changed == [] and out.untrainable is None
