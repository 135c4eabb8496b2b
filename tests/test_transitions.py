"""Samples built from claimed sessions (rl/transitions.py) in the tensors the engine hands verl
(rl/engine/batch.py): the tokens of a merged trajectory that the model did not generate carry no behaviour
log-prob and no advantage, padding sits left of prompts and right of responses, and episode weights reach
the loss as rollout_is_weights. The sample-building rules themselves: tests/unit/test_rl_transitions.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl")

from trainwire.rl.engine.batch import padded_ppo_tensors  # noqa: E402
from trainwire.rl.transitions import build_samples  # noqa: E402
from trainwire.store.episodes import ClaimedCall, ClaimedSession  # noqa: E402

PAD = 0


def call(cid, prompt, completion, logprobs):
    return ClaimedCall(
        id=cid,
        seq=0,
        agent_name="a",
        policy_version=0,
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        logprobs=logprobs,
        finish_reason="stop",
        reward=0.0,
        aborted=False,
        status_code=200,
    )


def test_trajectory_samples_in_verl_layout():
    # Episode 1: two calls merged; the tool result [6 7] is context (mask 0).
    tool_use = ClaimedSession(
        id="s1",
        task_id="T",
        final_reward=1.0,
        calls=[
            call("a1", [1, 2, 3], [4, 5], [-0.1, -0.2]),
            call("a2", [1, 2, 3, 4, 5, 6, 7], [8], [-0.3]),
        ],
    )
    # Episode 2: the second call re-renders the history ([9 10] -> [9 11]): a chain break, two samples.
    broken = ClaimedSession(
        id="s2",
        task_id="T",
        final_reward=0.0,
        calls=[
            call("b1", [9], [10], [-0.4]),
            call("b2", [9, 11], [12, 13, 14], [-0.5, -0.6, -0.7]),
        ],
    )
    built = build_samples([tool_use, broken], mode="trajectory")
    assert [s.weight for s in built.samples] == [1.0, 0.5, 0.5]
    samples = [replace(s, advantage=a) for s, a in zip(built.samples, [2.0, -1.0, 0.5])]

    t = padded_ppo_tensors(samples, PAD, with_weights=True)

    assert t["prompts"].tolist() == [[1, 2, 3], [PAD, PAD, 9], [PAD, 9, 11]]
    assert t["responses"].tolist() == [[4, 5, 6, 7, 8], [10, PAD, PAD, PAD, PAD], [12, 13, 14, PAD, PAD]]
    assert torch.equal(t["input_ids"], torch.cat([t["prompts"], t["responses"]], dim=1))
    assert t["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0],
    ]
    assert t["response_mask"].tolist() == [[1, 1, 0, 0, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert torch.allclose(
        t["old_log_probs"], torch.tensor([[-0.1, -0.2, 0.0, 0.0, -0.3], [-0.4, 0, 0, 0, 0], [-0.5, -0.6, -0.7, 0, 0]])
    )
    assert t["advantages"].tolist() == [[2.0, 2.0, 0.0, 0.0, 2.0], [-1.0, 0, 0, 0, 0], [0.5, 0.5, 0.5, 0, 0]]
    assert t["rollout_is_weights"][:, 0].tolist() == [1.0, 0.5, 0.5]
    # positions count real tokens only, from the first one
    assert t["position_ids"][1, 2:4].tolist() == [0, 1] and t["position_ids"][2, 1:6].tolist() == [0, 1, 2, 3, 4]
    assert "rollout_is_weights" not in padded_ppo_tensors(samples, PAD, with_weights=False)
