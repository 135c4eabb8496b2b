"""Train-inference agreement (rl/agreement.py and its pass in rl/collective.py) by hand: the metrics on sampled
tokens only, the k1 and k3 estimates, one log-prob pass over only the marked samples and none when no sample is
marked, and under torchrun every rank measuring its shard with the sums added up. Fakes stand in for the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trainwire.rl.agreement import agreement_metrics, agreement_sums
from trainwire.rl.collective import Collective
from trainwire.rl.samples import Sample


def sample(old, mask=None, prompt=(1,)) -> Sample:
    mask = mask or [1] * len(old)
    return Sample(
        prompt_ids=list(prompt),
        response_ids=list(range(10, 10 + len(old))),
        response_mask=mask,
        old_logprobs=old,
        advantage=0.0,
    )


def test_the_metrics_by_hand():
    a = sample([-1.0, -2.0, -0.5])
    b = sample([-3.0, None, -1.0], mask=[1, 0, 1])  # a masked (context) token has no recorded log-prob
    new = [[-1.1, -2.0, -0.3], [-3.0, -9.0, -1.5]]
    sums = agreement_sums([a, b], new)
    d = [0.1, 0.0, -0.2, 0.0, 0.5]  # old - new on the 5 sampled tokens
    m = agreement_metrics(sums)
    assert m["agreement/tokens"] == 5 and m["agreement/samples"] == 2
    assert m["agreement/mean_abs_dlogp"] == pytest.approx(sum(map(abs, d)) / 5)
    assert m["agreement/max_abs_dlogp"] == pytest.approx(0.5)
    assert m["agreement/ppo_kl"] == pytest.approx(sum(d) / 5)
    assert m["agreement/kl_k3"] == pytest.approx(sum(math.exp(-x) - 1 + x for x in d) / 5)
    assert set(m) == {
        "agreement/mean_abs_dlogp",
        "agreement/max_abs_dlogp",
        "agreement/ppo_kl",
        "agreement/kl_k3",
        "agreement/tokens",
        "agreement/samples",
    }


def test_identical_log_probs_agree_exactly_and_k3_is_never_negative():
    s = sample([-0.25, -4.0])
    m = agreement_metrics(agreement_sums([s], [[-0.25, -4.0]]))
    assert m["agreement/mean_abs_dlogp"] == m["agreement/max_abs_dlogp"] == m["agreement/ppo_kl"] == 0
    assert m["agreement/kl_k3"] == 0
    far = agreement_metrics(agreement_sums([s], [[-60.0, -0.001]]))
    assert far["agreement/kl_k3"] >= 0 and math.isfinite(far["agreement/kl_k3"])


def test_no_tokens_no_metrics():
    assert agreement_metrics(agreement_sums([], [])) == {}
    assert agreement_metrics(agreement_sums([sample([None], mask=[0])], [[-1.0]])) == {}


class LogprobPolicy:
    """step/export/save_checkpoint/logprobs like PolicyEngine; logprobs returns old + shift for every token."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.calls: list[tuple] = []

    def logprobs(self, samples):
        self.calls.append(("logprobs", [s.prompt_ids[0] for s in samples]))
        return [[(lp or 0.0) + self.shift for lp in s.old_logprobs] for s in samples]

    def step(self, samples):
        self.calls.append(("step", [s.prompt_ids[0] for s in samples]))
        return {"loss": 0.1}

    def export(self, out_dir: Path) -> Path:
        return out_dir

    def save_checkpoint(self):
        pass


async def test_one_pass_over_only_the_marked_samples_before_the_update(tmp_path):
    policy = LogprobPolicy(shift=-0.01)
    samples = [sample([-1.0, -1.0], prompt=(i,)) for i in range(4)]
    ranks = Collective(policy, tmp_path, rank=0, world=1, broadcast=None)
    outcome = await ranks.train_step(samples, 1, check=[True, False, True, False])
    assert policy.calls == [("logprobs", [0, 2]), ("step", [0, 1, 2, 3])]
    assert outcome.metrics["agreement/samples"] == 2 and outcome.metrics["agreement/tokens"] == 4
    assert outcome.metrics["agreement/mean_abs_dlogp"] == pytest.approx(0.01)
    assert outcome.metrics["agreement/ppo_kl"] == pytest.approx(0.01)  # old - new
    assert outcome.metrics["loss"] == 0.1


@pytest.mark.parametrize("check", [None, [], [False, False]])
async def test_no_marked_sample_costs_nothing(tmp_path, check):
    policy = LogprobPolicy()
    ranks = Collective(policy, tmp_path, rank=0, world=1, broadcast=None)
    outcome = await ranks.train_step([sample([-1.0]), sample([-2.0])], 1, check=check)
    assert [c[0] for c in policy.calls] == ["step"]
    assert not any(k.startswith("agreement/") for k in outcome.metrics)


async def test_under_torchrun_each_rank_measures_its_shard_and_the_sums_are_added(tmp_path):
    samples = [sample([-1.0] * (i + 1), prompt=(i,)) for i in range(5)]
    check = [True, True, False, True, True]
    reduced: list[dict] = []
    per_rank = {}
    for rank in (0, 1):
        policy = LogprobPolicy(shift=-0.1 * (rank + 1))
        per_rank[rank] = agreement_sums(
            [s for s, c in list(zip(samples, check))[rank::2] if c],
            policy.logprobs([s for s, c in list(zip(samples, check))[rank::2] if c]),
        )
    total = {k: per_rank[0][k] + per_rank[1][k] for k in per_rank[0]}
    total["max"] = max(per_rank[0]["max"], per_rank[1]["max"])

    def fake_all_reduce(sums):
        reduced.append(sums)
        return total

    policy = LogprobPolicy(shift=-0.1)
    lead = Collective(policy, tmp_path, rank=0, world=2, broadcast=lambda obj: obj, reduce=fake_all_reduce)
    metrics = lead.agreement(samples, check)
    assert policy.calls == [("logprobs", [0, 4])]  # rank 0's shard is samples 0, 2, 4; 2 is not marked
    assert reduced == [per_rank[0]]
    assert metrics["agreement/samples"] == 4 and metrics["agreement/tokens"] == 1 + 2 + 4 + 5
    assert metrics["agreement/max_abs_dlogp"] == pytest.approx(0.2)
    # a rank whose shard has no marked sample still makes the call (the forward pass is collective)
    follower = Collective(
        LogprobPolicy(), tmp_path, rank=1, world=2, broadcast=lambda obj: obj, reduce=lambda sums: sums
    )
    follower.agreement(samples, [True, False, True, False, True])
    assert follower.policy.calls == [("logprobs", [])]


async def test_the_step_command_carries_the_marks_to_the_other_ranks(tmp_path):
    sent = []
    lead = Collective(
        LogprobPolicy(), tmp_path, rank=0, world=2, broadcast=lambda obj: sent.append(obj), reduce=lambda sums: sums
    )
    from trainwire.rl.collective import StepHooks

    await lead.step([sample([-1.0]), sample([-1.0])], 4, StepHooks(), check=[False, True])
    assert sent[0]["op"] == "step" and sent[0]["check"] == [False, True] and sent[0]["version"] == 4


class RecordingStep(LogprobPolicy):
    def step(self, samples):
        self.stepped = list(samples)
        return super().step(samples)


async def test_with_correction_one_pass_over_the_whole_shard_gives_proximal_and_agreement(tmp_path):
    """--off-policy tis|decoupled: every sample gets its proximal log-probs from one pass before the update; a
    sample served by the trainer's weights keeps its recorded ones as proximal (exactly on-policy)."""
    policy = RecordingStep(shift=-0.01)
    samples = [sample([-1.0, -1.0], prompt=(i,)) for i in range(4)]
    ranks = Collective(policy, tmp_path, rank=0, world=1, broadcast=None, proximal=True)
    outcome = await ranks.train_step(samples, 1, check=[True, False, True, False])
    assert policy.calls == [("logprobs", [0, 1, 2, 3]), ("step", [0, 1, 2, 3])]
    assert [s.proximal_logprobs for s in policy.stepped] == [[-1.0, -1.0], [-1.01, -1.01]] * 2
    assert outcome.metrics["agreement/samples"] == 2 and outcome.metrics["agreement/mean_abs_dlogp"] == pytest.approx(
        0.01
    )


async def test_with_correction_each_rank_corrects_its_own_shard(tmp_path):
    policy = RecordingStep(shift=-0.5)
    samples = [sample([-1.0], prompt=(i,)) for i in range(5)]
    ranks = Collective(policy, tmp_path, rank=1, world=2, broadcast=None, reduce=lambda sums: sums, proximal=True)
    outcome = await ranks.train_step(samples, 1, check=None)
    assert policy.calls == [("logprobs", [1, 3]), ("step", [1, 3])]
    assert [s.proximal_logprobs for s in policy.stepped] == [[-1.5], [-1.5]]
    assert not any(k.startswith("agreement/") for k in outcome.metrics)
