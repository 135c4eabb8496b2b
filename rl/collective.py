"""The order of collective calls in one training step, defined once for every torchrun rank.

Under torchrun every rank holds a shard of the model (FSDP2), and a training step is a sequence of collective
calls: the optimizer step, the weight gather of the export, the checkpoint save. Every rank must make them in
the same order or the ranks wait on each other forever. So there is one sequence, :meth:`Collective.train_step`,
and every rank runs it: rank 0 through :meth:`Collective.step` after it has claimed sessions and built the
samples, the other ranks through :meth:`Collective.follow` when rank 0's command arrives. Work only rank 0 does
(publishing into vLLM between the export and the checkpoint, giving claims back when the step fails) comes in
as :class:`StepHooks`, never as calls of its own.

Commands, rank 0 to all (``broadcast_object_list``; gloo carries Python objects on CPU and beside NCCL on GPU):

* ``{"op": "step", "samples": [...], "version": n, "check": [...] | None}``: measure train-inference agreement on
  the samples ``check`` marks (those served by the version the weights are now: :mod:`trainwire.rl.agreement`),
  then train on ``samples[rank::world]``, export as ``v<n>``; with off-policy correction
  (:mod:`trainwire.rl.offpolicy`) one forward pass over the shard gives both the agreement and the proximal
  log-probs the step is corrected with;
* ``{"op": "idle"}``: nothing was ready; keeps the other ranks' waiting broadcast from timing out;
* ``{"op": "stop"}``: leave.

Without torchrun (one process) nothing is broadcast and the same sequence runs in the one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwire.rl.agreement import SUM_KEYS, AgreementExceeded, agreement_metrics, agreement_sums, refusal

__all__ = ["Collective", "StepHooks", "StepOutcome"]

STEP, IDLE, STOP = "step", "idle", "stop"


def _broadcast(obj: Any = None) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce(sums: dict[str, float]) -> dict[str, float]:
    """Add up the agreement sums of every rank (the max with max)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([sums[k] for k in SUM_KEYS], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    m = torch.tensor([sums["max"]], dtype=torch.float64)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return {**dict(zip(SUM_KEYS, t.tolist())), "max": float(m.item())}


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepHooks:
    """Rank 0's work inside the sequence. The defaults do nothing: that is what the other ranks run."""

    async def step_failed(self) -> None:
        """Sending or running the optimizer step raised; called in the handler, the exception propagates."""

    async def refused(self) -> None:
        """The agreement pass refused the step (``--agreement-max``); :class:`AgreementExceeded` follows."""

    async def exported(self, path: Path) -> None:
        """The new weights are in ``path``; runs before the checkpoint (rank 0 publishes them here)."""

    def guard(self) -> AbstractContextManager:
        """Wraps the work of the step that may be dropped when the trainer is told to stop (the agreement pass,
        the optimizer step, the export): rank 0's stopper makes it interruptible in one process."""
        return nullcontext()


@dataclass
class StepOutcome:
    metrics: dict[str, float]  # PolicyEngine.step's, for this rank's shard
    exported: Path
    # time.perf_counter() at the end of each part
    trained_at: float
    exported_at: float
    hooked_at: float
    checkpointed_at: float


class Collective:
    """This rank's side of the step protocol; ``policy`` is a ``PolicyEngine`` (or anything with its
    ``step``/``export``/``save_checkpoint``)."""

    def __init__(
        self,
        policy,
        publish_root: Path,
        *,
        rank: int | None = None,
        world: int | None = None,
        broadcast: Callable[[Any], Any] = _broadcast,
        reduce: Callable[[dict[str, float]], dict[str, float]] = _all_reduce,
        proximal: bool = False,
        agreement_max: float | None = None,
    ) -> None:
        if rank is None or world is None:
            rank, world = _world()
        self.policy = policy
        self.publish_root = Path(publish_root)
        self.rank, self.world = rank, world
        self._broadcast = broadcast
        self._reduce = reduce
        # Off-policy correction (rl/offpolicy.py): every step first computes the proximal log-probs of the shard.
        self.proximal = proximal
        self.agreement_max = agreement_max

    def export_dir(self, version: int) -> Path:
        return self.publish_root / f"v{version}"

    async def train_step(
        self, samples: Sequence, version: int, hooks: StepHooks | None = None, check: Sequence[bool] | None = None
    ) -> StepOutcome:
        """The sequence every rank runs for one step: the agreement pass over the samples ``check`` marks (none:
        no pass), train on this rank's shard, export ``v<version>``, the rank-0 hook, checkpoint. ``samples`` and
        ``check`` are the whole batch's (the same on every rank)."""
        hooks = hooks or StepHooks()
        try:
            with hooks.guard():
                if self.proximal:
                    shard, agreement = self.proximal_pass(samples, check)
                else:
                    shard, agreement = list(samples[self.rank :: self.world]), self.agreement(samples, check)
                # The sums are every rank's, so every rank refuses alike and none waits in the step's collectives.
                refused = refusal(agreement, self.agreement_max)
                if refused is None:
                    metrics = self.policy.step(shard)
        except Exception:
            await hooks.step_failed()
            raise
        if refused is not None:
            await hooks.refused()
            raise AgreementExceeded(refused)
        metrics.update(agreement)
        trained_at = time.perf_counter()
        with hooks.guard():
            out = self.policy.export(self.export_dir(version))
        exported_at = time.perf_counter()
        await hooks.exported(out)
        hooked_at = time.perf_counter()
        self.policy.save_checkpoint()
        return StepOutcome(
            metrics=metrics,
            exported=out,
            trained_at=trained_at,
            exported_at=exported_at,
            hooked_at=hooked_at,
            checkpointed_at=time.perf_counter(),
        )

    def agreement(self, samples: Sequence, check: Sequence[bool] | None) -> dict[str, float]:
        """The ``agreement/*`` metrics (:mod:`trainwire.rl.agreement`) of the marked samples, before the update:
        one forward pass over this rank's marked samples, the sums added up over the ranks. Nothing at all when
        no sample of the batch is marked (every rank sees the same marks, so all or none make the collective
        calls)."""
        if not check or not any(check):
            return {}
        mine = [s for s, c in list(zip(samples, check))[self.rank :: self.world] if c]
        sums = agreement_sums(mine, self.policy.logprobs(mine))
        if self.world > 1:
            sums = self._reduce(sums)
        return agreement_metrics(sums)

    def proximal_pass(self, samples: Sequence, check: Sequence[bool] | None) -> tuple[list, dict[str, float]]:
        """This rank's shard with its proximal log-probs (one forward pass over the whole shard, before the
        update; :func:`~trainwire.rl.offpolicy.with_proximal`), and the agreement metrics of the marked samples
        from the same pass. Every rank makes the forward call, also one whose shard is empty."""
        from trainwire.rl.offpolicy import with_proximal

        shard = list(samples[self.rank :: self.world])
        marks = list(check[self.rank :: self.world]) if check else [False] * len(shard)
        logprobs = self.policy.logprobs(shard)
        agreement: dict[str, float] = {}
        if check and any(check):
            mine = [(s, lp) for s, lp, c in zip(shard, logprobs, marks) if c]
            sums = agreement_sums([s for s, _ in mine], [lp for _, lp in mine])
            if self.world > 1:
                sums = self._reduce(sums)
            agreement = agreement_metrics(sums)
        return with_proximal(shard, logprobs, marks), agreement

    # ------------------------------------------------------------------ rank 0

    def tell(self, op: str, **fields: Any) -> None:
        if self.world > 1:
            self._broadcast({"op": op, **fields})

    async def step(
        self, samples: Sequence, version: int, hooks: StepHooks, check: Sequence[bool] | None = None
    ) -> StepOutcome:
        """Rank 0: send the batch to every rank, then run the step here too."""
        try:
            self.tell(STEP, samples=list(samples), version=version, check=list(check) if check else None)
        except Exception:
            await hooks.step_failed()
            raise
        return await self.train_step(samples, version, hooks, check)

    def idle(self) -> None:
        self.tell(IDLE)

    def stop(self) -> None:
        self.tell(STOP)

    # ------------------------------------------------------------------ other ranks

    async def follow(self) -> int:
        """Ranks other than 0: run rank 0's commands until it says stop."""
        while True:
            command = self._broadcast(None)
            if command["op"] == STOP:
                return 0
            if command["op"] == STEP:
                await self.train_step(command["samples"], command["version"], check=command.get("check"))
