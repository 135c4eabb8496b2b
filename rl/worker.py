"""`trainwire train`: the background worker.

claim finished sessions -> build samples from recorded token ids -> credit assignment -> advantages (verl)
-> one optimizer step (verl's engine) -> export -> publish into every vLLM upstream -> record the version
(the proxy switches on the next request) -> mark sessions trained -> checkpoint -> log metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path

from trainwire.settings import Settings
from trainwire.store import claims
from trainwire.store.db import make_engine
from trainwire.store.policy import latest_version, record_publish
from trainwire.store.training import record_train_step

log = logging.getLogger("trainwire.train")


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(f"[trainwire train] {msg}", flush=True)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj=None):
    """Rank 0's command to every rank (gloo carries Python objects on CPU and beside NCCL on GPU)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


class MetricsSink:
    """TensorBoard (always) and Weights & Biases (when a project is given)."""

    def __init__(self, settings: Settings) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(settings.tensorboard_dir or settings.checkpoint_dir / "tensorboard"))
        self.wandb = None
        if settings.wandb_project:
            import wandb

            self.wandb = wandb.init(project=settings.wandb_project, config=settings.model_dump(mode="json"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Trainer:
    def __init__(self, settings: Settings) -> None:
        if not settings.model:
            raise SystemExit("trainwire train: --model is required (the base model path vLLM serves)")
        self.s = settings
        self.db = make_engine(settings.resolved_database_url)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.stop_requested = False
        self.publish_root = settings.checkpoint_dir / "published"
        self.vllm_root = Path(settings.publish_dir) / "published" if settings.publish_dir else self.publish_root

    def _engine_config(self):
        from trainwire.rl.engine import EngineConfig

        s = self.s
        return EngineConfig(model_path=s.model, lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, lr=s.lr,
                            policy_loss=s.policy_loss, loss_agg_mode=s.loss_agg_mode, clip_ratio_low=s.clip_ratio,
                            clip_ratio_high=s.clip_ratio, kl_coef=s.kl_coef, temperature=s.temperature,
                            seed=s.seed, checkpoint_dir=str(s.checkpoint_dir / "state"))

    async def run(self) -> int:
        from trainwire.rl.advantages import advantage_estimator_names

        s = self.s
        if s.adv_estimator not in advantage_estimator_names():
            raise SystemExit(f"trainwire train: unknown --adv-estimator {s.adv_estimator!r}; verl has: "
                             + ", ".join(advantage_estimator_names()))
        _say(f"loading {s.model} into verl's engine ({'LoRA rank %d' % s.lora_rank if s.lora_rank else 'full fine-tuning'})")
        t0 = time.perf_counter()
        from trainwire.rl.engine import PolicyEngine

        self.policy = PolicyEngine(self._engine_config())
        resumed = self.policy.load_checkpoint()
        self.rank, self.world = _world()
        if self.rank != 0:
            return self._follow()
        _say(f"engine ready in {time.perf_counter() - t0:.1f}s" + (f"; resumed from {resumed}" if resumed else "")
             + (f"; {self.world} ranks (torchrun): rank 0 claims and publishes, every rank trains its shard"
                if self.world > 1 else ""))
        try:
            return await self._lead()
        finally:
            self._tell({"op": "stop"})

    def _tell(self, command: dict) -> None:
        if self.world > 1:
            _broadcast(command)

    def _follow(self) -> int:
        """Ranks other than 0 (under torchrun): train their shard of what rank 0 claimed, in the same order of
        collective calls (step, export, checkpoint)."""
        while True:
            command = _broadcast()
            if command["op"] == "stop":
                return 0
            if command["op"] == "step":
                self.policy.step(command["samples"][self.rank::self.world])
                self.policy.export(self.publish_root / f"v{command['version']}")
                self.policy.save_checkpoint()

    def _train(self, samples: list, version: int) -> dict:
        self._tell({"op": "step", "samples": samples, "version": version})
        return self.policy.step(samples[self.rank::self.world])

    async def _lead(self) -> int:
        s = self.s
        from trainwire.rl.publish import Publisher

        self.sink = MetricsSink(s)
        kind = "lora" if s.lora_rank else "full"
        async with Publisher(s.upstream, kind=kind, policy_name=s.policy_model, api_key=s.upstream_api_key,
                             lora_grace_s=s.lora_grace_s) as pub:
            self.pub = pub
            warning = await pub.logprobs_mode_warning()
            if warning:
                log.warning(warning)
                _say(f"WARNING: {warning}")
            self.base_model = await pub.base_model()
            self.version = await latest_version(self.db)
            adopted = await pub.adopt_loaded(self.version)
            if adopted:
                _say(f"adapters already loaded in vLLM: {', '.join(adopted)} (older ones unload after "
                     f"{s.lora_grace_s:.0f}s)")
            _say(f"policy version in the store: {self.version}; waiting for rewarded sessions "
                 f"(batch {s.batch_size}, settle {s.settle_s}s)")
            steps = 0
            idle_since = time.monotonic()
            while not self.stop_requested:
                released = await claims.release_stale_claims(self.db, older_than_s=s.claim_timeout_s)
                if released:
                    _say(f"released {released} stale claims of a crashed trainer")
                trained = await self.step_once()
                if trained is None:
                    self._tell({"op": "idle"})  # keeps other ranks' collectives from timing out
                    if time.monotonic() - idle_since > 60:
                        _say("still waiting for rewarded sessions...")
                        idle_since = time.monotonic()
                    await pub.unload_expired()
                    await asyncio.sleep(s.poll_s)
                    continue
                idle_since = time.monotonic()
                await pub.unload_expired()
                steps += 1
                if s.max_steps and steps >= s.max_steps:
                    _say(f"reached --max-steps {s.max_steps}")
                    break
        self.sink.close()
        await self.db.dispose()
        return 0

    async def step_once(self) -> dict | None:
        """One claim-train-publish cycle; None when nothing was ready."""
        from trainwire.rl.advantages import compute_advantages
        from trainwire.rl.transitions import build_samples

        s = self.s
        t = {"start": time.perf_counter()}
        batch = await claims.claim_batch(self.db, worker_id=self.worker_id, batch_size=s.batch_size,
                                         train_agents=s.train_agent, group_by_task=s.group_by_task,
                                         group_size=s.group_size, group_timeout_s=s.group_timeout_s,
                                         settle_s=s.settle_s)
        if not batch:
            return None
        ids = [b.id for b in batch]
        t["claim"] = time.perf_counter()
        try:
            built = build_samples(batch, mode=s.mode, gamma=s.gamma, default_reward=s.default_reward,
                                  group_by_task=s.group_by_task, current_version=self.version,
                                  max_staleness=s.max_staleness)
            if not built.samples:
                await claims.mark_skipped(self.db, ids, "no trainable samples (stale, or no token data)",
                                          worker_id=self.worker_id)
                _say(f"skipped {len(ids)} sessions: no trainable samples ({built.counters})")
                return {}
            advantages = compute_advantages(built.scores, built.group_ids, estimator=s.adv_estimator)
            samples = [replace(x, advantage=a) for x, a in zip(built.samples, advantages)]
            t["build"] = time.perf_counter()
            metrics = self._train(samples, self.version + 1)  # in the loop thread: verl state is per-thread
            t["train"] = time.perf_counter()
        except Exception:
            await claims.release(self.db, ids, worker_id=self.worker_id)
            log.exception("training step failed; released %d sessions for a later step", len(ids))
            raise
        step = self.policy.global_step
        version = self.version + 1
        out = self.policy.export(self.publish_root / f"v{version}")
        t["save"] = time.perf_counter()
        result = await self.pub.publish(version, str(self.vllm_root / out.name))
        served = result.served_model if self.pub.kind == "lora" else (self.base_model or s.model)
        if result.reached:
            await record_publish(self.db, version=version, kind=self.pub.kind, served_model=served,
                                 path=str(out), train_step=step, reached=result.reached,
                                 failed=list(result.failed))
            self.version = version
        for url, why in result.failed.items():
            _say(f"WARNING: publish of v{version} to {url} failed: {why}")
        t["publish"] = time.perf_counter()
        # The checkpoint is what survives a crash: a session becomes `trained` only once the weights that
        # learned from it are saved. A crash before this point leaves its claim to expire and the session is
        # trained again by the restarted trainer, from the checkpoint that does not contain it yet.
        self.policy.save_checkpoint()
        t["checkpoint"] = time.perf_counter()
        skipped = set(built.skipped_sessions)
        await claims.mark_trained(self.db, [sid for sid in ids if sid not in skipped], step,
                                  worker_id=self.worker_id)
        if skipped:
            await claims.mark_skipped(self.db, list(skipped), "stale or without token data",
                                      worker_id=self.worker_id)
        rewards = [x.final_reward for x in batch if x.final_reward is not None]
        r_mean, r_std = _stats(rewards)
        a_mean, a_std = _stats(advantages)
        metrics.update({
            "reward/mean": r_mean, "reward/std": r_std, "advantage/mean": a_mean, "advantage/std": a_std,
            "advantage/max": max(advantages), "advantage/min": min(advantages),
            "batch/sessions": len(ids), "batch/samples": len(samples),
            "batch/tokens": float(sum(sum(x.response_mask) for x in samples)),
            "staleness/mean": built.staleness_mean, **{f"batch/{k}": float(v) for k, v in built.counters.items()},
            "policy/version": float(self.version), "publish/failed_upstreams": float(len(result.failed)),
            "time/claim_s": t["claim"] - t["start"], "time/build_s": t["build"] - t["claim"],
            "time/train_s": t["train"] - t["build"], "time/save_s": t["save"] - t["train"],
            "time/publish_s": t["publish"] - t["save"], "time/checkpoint_s": t["checkpoint"] - t["publish"],
        })
        await record_train_step(self.db, step=step, policy_version=self.version, n_sessions=len(ids),
                                n_samples=len(samples), metrics=metrics)
        self.sink.log(step, metrics)
        _say(f"step {step} -> v{self.version} | sessions {len(ids)} samples {len(samples)} | reward "
             f"{r_mean:.3f}±{r_std:.3f} | loss {metrics.get('loss', float('nan')):.4f} grad "
             f"{metrics.get('grad_norm', float('nan')):.3f} | train {metrics['time/train_s']:.2f}s publish "
             f"{metrics['time/publish_s'] * 1000:.0f}ms")
        return metrics


def run(settings: Settings) -> int:
    trainer = Trainer(settings)

    def _stop(*_):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        _say("stopping after the current step (Ctrl-C again to abort)")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return asyncio.run(trainer.run())
