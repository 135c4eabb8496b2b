"""The torchrun step protocol (rl/collective.py) with recording fakes for the engine and the broadcast: rank 0
and the other ranks make the same collective calls in the same order, each on its own shard, with rank 0's
publish hook between export and checkpoint. No torch: the fakes stand in for PolicyEngine and gloo."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from trainwire.rl.collective import Collective, StepHooks


class FakePolicy:
    """Records the collective calls PolicyEngine would make."""

    def __init__(self, log: list, rank: int, fail_step: bool = False) -> None:
        self.log, self.rank, self.fail_step = log, rank, fail_step

    def step(self, samples):
        if self.fail_step:
            raise RuntimeError("step failed")
        self.log.append(("step", self.rank, list(samples)))
        return {"loss": 0.5}

    def export(self, out_dir: Path) -> Path:
        self.log.append(("export", self.rank, out_dir))
        return out_dir

    def save_checkpoint(self):
        self.log.append(("checkpoint", self.rank))


class Channel:
    """broadcast_object_list between ranks run one after the other: rank 0's sends queue up for the others."""

    def __init__(self) -> None:
        self.sent: deque = deque()

    def send(self, obj):
        assert obj is not None, "rank 0 always sends a command"
        self.sent.append(obj)
        return obj

    def receive(self, obj):
        assert obj is None, "other ranks send nothing"
        return self.sent.popleft()


class RecordingHooks(StepHooks):
    def __init__(self, log: list) -> None:
        self.log = log

    async def step_failed(self) -> None:
        self.log.append(("step_failed",))

    async def exported(self, path: Path) -> None:
        self.log.append(("publish", path))


def kinds(log):
    return [entry[0] for entry in log]


async def test_every_rank_makes_the_same_collective_calls_in_the_same_order(tmp_path):
    channel = Channel()
    lead_log, follow_log = [], []
    lead = Collective(FakePolicy(lead_log, 0), tmp_path, rank=0, world=2, broadcast=channel.send)
    follower = Collective(FakePolicy(follow_log, 1), tmp_path, rank=1, world=2, broadcast=channel.receive)

    samples = ["s0", "s1", "s2", "s3", "s4"]
    outcome = await lead.step(samples, 7, RecordingHooks(lead_log))
    lead.idle()
    await lead.step(["t0", "t1"], 8, RecordingHooks(lead_log))
    lead.stop()
    assert await follower.follow() == 0
    assert not channel.sent  # the follower consumed every command, up to stop

    assert kinds(lead_log) == ["step", "export", "publish", "checkpoint"] * 2
    assert kinds(follow_log) == ["step", "export", "checkpoint"] * 2
    # each rank trains its own shard of the one batch rank 0 claimed
    assert [e for e in lead_log if e[0] == "step"] == [("step", 0, ["s0", "s2", "s4"]), ("step", 0, ["t0"])]
    assert [e for e in follow_log if e[0] == "step"] == [("step", 1, ["s1", "s3"]), ("step", 1, ["t1"])]
    # and both export into the same version folder
    for log in (lead_log, follow_log):
        assert [e[2] for e in log if e[0] == "export"] == [tmp_path / "v7", tmp_path / "v8"]
    assert outcome.metrics == {"loss": 0.5} and outcome.exported == tmp_path / "v7"
    assert outcome.trained_at <= outcome.exported_at <= outcome.hooked_at <= outcome.checkpointed_at


async def test_rank_zero_publishes_between_export_and_checkpoint(tmp_path):
    log = []
    lead = Collective(FakePolicy(log, 0), tmp_path, rank=0, world=1, broadcast=_no_broadcast)
    await lead.step(["s0", "s1"], 3, RecordingHooks(log))
    assert log == [
        ("step", 0, ["s0", "s1"]),
        ("export", 0, tmp_path / "v3"),
        ("publish", tmp_path / "v3"),
        ("checkpoint", 0),
    ]


async def test_one_process_sends_nothing(tmp_path):
    lead = Collective(FakePolicy([], 0), tmp_path, rank=0, world=1, broadcast=_no_broadcast)
    lead.idle()
    await lead.step(["s0"], 1, StepHooks())
    lead.stop()


async def test_a_failed_step_calls_the_hook_and_goes_no_further(tmp_path):
    log = []
    lead = Collective(FakePolicy(log, 0, fail_step=True), tmp_path, rank=0, world=1, broadcast=_no_broadcast)
    with pytest.raises(RuntimeError, match="step failed"):
        await lead.step(["s0"], 1, RecordingHooks(log))
    assert log == [("step_failed",)]


async def test_a_failed_broadcast_calls_the_hook_before_any_step(tmp_path):
    def broken(obj):
        raise ConnectionError("gloo")

    log = []
    lead = Collective(FakePolicy(log, 0), tmp_path, rank=0, world=2, broadcast=broken)
    with pytest.raises(ConnectionError):
        await lead.step(["s0"], 1, RecordingHooks(log))
    assert log == [("step_failed",)]


async def test_followers_run_no_rank_zero_work(tmp_path):
    """A follower's step has no hooks: an export on a follower must not publish or give claims back."""
    channel = Channel()
    log = []
    channel.send({"op": "step", "samples": ["s0", "s1", "s2"], "version": 2})
    channel.send({"op": "stop"})
    follower = Collective(FakePolicy(log, 2), tmp_path, rank=2, world=3, broadcast=channel.receive)
    assert await follower.follow() == 0
    assert log == [("step", 2, ["s2"]), ("export", 2, tmp_path / "v2"), ("checkpoint", 2)]


def _no_broadcast(obj):
    raise AssertionError("a single process must not broadcast")


class DisagreeingPolicy(FakePolicy):
    """The trainer's log-probs are ``offset`` nats from what vLLM recorded (tied weights served untied, say)."""

    def __init__(self, log: list, rank: int, offset: float) -> None:
        super().__init__(log, rank)
        self.offset = offset

    def logprobs(self, samples):
        self.log.append(("logprobs", self.rank, len(samples)))
        return [[(lp or 0.0) - self.offset for lp in s.old_logprobs] for s in samples]


class RefusalHooks(RecordingHooks):
    async def refused(self) -> None:
        self.log.append(("refused",))


def _served(n: int):
    from trainwire.rl.samples import Sample

    return [Sample([1, 2], [3, 4, 5], [1, 0, 1], [-0.5, 0.0, -1.5], advantage=1.0) for _ in range(n)]


@pytest.mark.parametrize("offset, refused", [(3.19, True), (0.49, False), (1e-6, False)])
async def test_agreement_max_refuses_the_step_on_every_rank_before_the_optimizer(tmp_path, offset, refused):
    from trainwire.rl.agreement import AgreementExceeded

    channel = Channel()
    lead_log, follow_log = [], []

    def summed(sums):  # the other rank measured the same disagreement on its shard
        return {k: (v if k == "max" else 2 * v) for k, v in sums.items()}

    lead = Collective(
        DisagreeingPolicy(lead_log, 0, offset), tmp_path, rank=0, world=2, broadcast=channel.send,
        reduce=summed, agreement_max=0.5,
    )  # fmt: skip
    follower = Collective(
        DisagreeingPolicy(follow_log, 1, offset), tmp_path, rank=1, world=2, broadcast=channel.receive,
        reduce=summed, agreement_max=0.5,
    )  # fmt: skip
    samples, check = _served(4), [True] * 4
    if not refused:
        outcome = await lead.step(samples, 2, RefusalHooks(lead_log), check)
        assert outcome.metrics["agreement/mean_abs_dlogp"] == pytest.approx(offset)
        assert kinds(lead_log) == ["logprobs", "step", "export", "publish", "checkpoint"]
        return
    with pytest.raises(AgreementExceeded) as err:
        await lead.step(samples, 2, RefusalHooks(lead_log), check)
    line = str(err.value)
    assert "\n" not in line and "3.190 nats" in line and "--agreement-max 0.5" in line
    for cause in ("tied embeddings", "transformers", "--temperature", "processed_logprobs"):
        assert cause in line
    assert kinds(lead_log) == ["logprobs", "refused"]  # no optimizer step, no export, claims given back
    lead.stop()
    with pytest.raises(AgreementExceeded):  # the follower refuses the same step, so neither waits on the other
        await follower.follow()
    assert kinds(follow_log) == ["logprobs"]


async def test_agreement_max_zero_never_refuses(tmp_path):
    log = []
    lead = Collective(
        DisagreeingPolicy(log, 0, 21.0), tmp_path, rank=0, world=1, broadcast=_no_broadcast, agreement_max=0
    )
    outcome = await lead.step(_served(1), 1, RefusalHooks(log), [True])
    assert outcome.metrics["agreement/mean_abs_dlogp"] == pytest.approx(21.0)
