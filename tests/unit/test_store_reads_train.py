"""Whether a recorded call will be trained on, and why not (train_status, a pure function of its row); the
same rule in SQL (UNTRAINED) is checked against it on both databases in tests/test_read_api.py."""

from __future__ import annotations

import pytest

from trainwire.store.read_models import TrainStatus
from trainwire.store.reads.trainability import train_status


def status(**kw):
    base = dict(
        trainable=True,
        route="policy",
        kind="chat",
        model="policy",
        status_code=200,
        aborted=False,
        prompt_tokens=12,
        completion_tokens=3,
        n_logprobs=3,
        untrainable_reason=None,
    )
    return train_status(**{**base, **kw})


def test_a_recorded_policy_call_is_trained_on():
    assert status() == {"trainable": True, "reason": None}
    assert status(aborted=True) == {"trainable": True, "reason": None}  # a truncated stream still trains
    assert TrainStatus(**status()).model_dump() == {"trainable": True, "reason": None}


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"trainable": False}, "evaluation call (X-Trainwire-Train: false)"),
        ({"trainable": False, "route": "frozen", "model": "gpt-judge"}, "frozen route (model gpt-judge)"),
        ({"trainable": False, "route": "frozen", "model": None}, "frozen route (model ?)"),
        ({"trainable": False, "route": "passthrough", "kind": "other"}, "pass-through call (no token ids)"),
        ({"trainable": False, "kind": "other"}, "pass-through call (no token ids)"),
        ({"status_code": 502}, "failed upstream call (status 502)"),
        ({"status_code": 400, "prompt_tokens": None}, "failed upstream call (status 400)"),
        ({"prompt_tokens": None, "completion_tokens": None}, "no token ids recorded"),
        ({"completion_tokens": 0}, "no token ids recorded"),
        ({"prompt_tokens": 0}, "no token ids recorded"),
        ({"aborted": True, "completion_tokens": None}, "aborted without tokens"),
        ({"n_logprobs": None}, "no logprobs recorded"),
        (
            {"untrainable_reason": "sampling: temperature 0.7 differs from the training value 1.0"},
            "sampling: temperature 0.7 differs from the training value 1.0",
        ),
        (
            {"untrainable_reason": "tokens: 3 recorded prompt token ids, but the upstream's usage says 4"},
            "tokens: 3 recorded prompt token ids, but the upstream's usage says 4",
        ),
    ],
)
def test_why_a_call_is_not_trained_on(kw, reason):
    assert status(**kw) == {"trainable": False, "reason": reason}


def test_the_first_reason_wins():
    # Not meant for training says so before anything about its tokens; a failure before missing tokens.
    assert status(trainable=False, status_code=500, untrainable_reason="sampling: x")["reason"].startswith(
        "evaluation call"
    )
    assert (
        status(status_code=500, prompt_tokens=None, untrainable_reason="sampling: x")["reason"]
        == "failed upstream call (status 500)"
    )
    assert status(prompt_tokens=None, untrainable_reason="sampling: x")["reason"] == "no token ids recorded"
    assert status(untrainable_reason="")["trainable"] is True  # an empty stored reason is no reason
