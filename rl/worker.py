"""`trainwire train`: the background worker.

claim finished sessions -> build samples from recorded token ids -> credit assignment -> advantages (verl)
-> one optimizer step (verl's engine) -> export -> publish into every vLLM upstream -> record the version
(the proxy switches on the next request) -> checkpoint -> mark sessions trained -> log metrics.

Under torchrun rank 0 does everything above and every rank trains its shard; the ranks' shared sequence
(step, export, checkpoint) is :mod:`trainwire.rl.collective`'s, with rank 0's publishing as its hook."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from trainwire.rl.collective import Collective, StepHooks
from trainwire.settings import Settings
from trainwire.store import claims
from trainwire.store.db import make_engine
from trainwire.store.policy import latest_version, record_publish
from trainwire.store.training import record_train_step

if TYPE_CHECKING:
    from trainwire.rl.publish import PublishResult

log = logging.getLogger("trainwire.train")


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(f"[trainwire train] {msg}", flush=True)


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


class _Publish(StepHooks):
    """Rank 0's part of a step: give the claims back when the step fails; publish the export into vLLM and
    record the version before the checkpoint."""

    def __init__(self, trainer: "Trainer", session_ids: list[str], version: int) -> None:
        self.trainer = trainer
        self.session_ids = session_ids
        self.version = version
        self.result: PublishResult | None = None  # set by exported(), which runs in every step that returns

    async def step_failed(self) -> None:
        await self.trainer._release_failed(self.session_ids)

    async def exported(self, path: Path) -> None:
        tr = self.trainer
        result = await tr.pub.publish(self.version, str(tr.vllm_root / path.name))
        served = result.served_model if tr.pub.kind == "lora" else (tr.base_model or tr.model)
        if result.reached:
            await record_publish(tr.db, version=self.version, kind=tr.pub.kind, served_model=served,
                                 path=str(path), train_step=tr.policy.global_step, reached=result.reached,
                                 failed=list(result.failed))
            tr.version = self.version
        for url, why in result.failed.items():
            _say(f"WARNING: publish of v{self.version} to {url} failed: {why}")
        self.result = result


class Trainer:
    def __init__(self, settings: Settings) -> None:
        if not settings.model:
            raise SystemExit("trainwire train: --model is required (the base model path vLLM serves)")
        self.s = settings
        self.model: str = settings.model
        self.db = make_engine(settings.resolved_database_url)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.stop_requested = False
        self.publish_root = settings.checkpoint_dir / "published"
        self.vllm_root = Path(settings.publish_dir) / "published" if settings.publish_dir else self.publish_root

    def _engine_config(self):
        from trainwire.rl.engine import EngineConfig

        s = self.s
        return EngineConfig(model_path=self.model, lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, lr=s.lr,
                            policy_loss=s.policy_loss, loss_agg_mode=s.loss_agg_mode, clip_ratio_low=s.clip_ratio,
                            clip_ratio_high=s.clip_ratio, kl_coef=s.kl_coef, temperature=s.temperature,
                            seed=s.seed, checkpoint_dir=str(s.checkpoint_dir / "state"))

    async def run(self) -> int:
        from trainwire.rl.advantages import advantage_estimator_names

        s = self.s
        if s.adv_estimator not in advantage_estimator_names():
            raise SystemExit(f"trainwire train: unknown --adv-estimator {s.adv_estimator!r}; verl has: "
                             + ", ".join(advantage_estimator_names()))
        _say(f"loading {s.model} into verl's engine "
             f"({f'LoRA rank {s.lora_rank}' if s.lora_rank else 'full fine-tuning'})")
        t0 = time.perf_counter()
        from trainwire.rl.engine import PolicyEngine

        self.policy = PolicyEngine(self._engine_config())
        resumed = self.policy.load_checkpoint()
        self.ranks = Collective(self.policy, self.publish_root)
        if self.ranks.rank != 0:
            return await self.ranks.follow()
        _say(f"engine ready in {time.perf_counter() - t0:.1f}s" + (f"; resumed from {resumed}" if resumed else "")
             + (f"; {self.ranks.world} ranks (torchrun): rank 0 claims and publishes, every rank trains its shard"
                if self.ranks.world > 1 else ""))
        try:
            return await self._lead()
        finally:
            self.ranks.stop()

    async def _lead(self) -> int:
        s = self.s
        from trainwire.rl.metrics_sink import MetricsSink
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
                    self.ranks.idle()
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

    async def _release_failed(self, ids: list[str]) -> None:
        await claims.release(self.db, ids, worker_id=self.worker_id)
        log.exception("training step failed; released %d sessions for a later step", len(ids))

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
                                  max_staleness=s.max_staleness, temperature=s.temperature)
            for why, n in built.skip_reasons.items():
                log.info("skipped %d calls: %s", n, why)
            if not built.samples:
                await claims.mark_skipped(self.db, ids, "no trainable samples (stale, untrainable sampling, or no "
                                          "token data)", worker_id=self.worker_id)
                _say(f"skipped {len(ids)} sessions: no trainable samples ({built.counters})")
                return {}
            advantages = compute_advantages(built.scores, built.group_ids, estimator=s.adv_estimator)
            samples = [replace(x, advantage=a) for x, a in zip(built.samples, advantages)]
        except Exception:
            await self._release_failed(ids)
            raise
        t["build"] = time.perf_counter()
        hooks = _Publish(self, ids, self.version + 1)
        # In the loop thread: verl state is per-thread.
        outcome = await self.ranks.step(samples, self.version + 1, hooks)
        step = self.policy.global_step
        metrics, result = outcome.metrics, hooks.result
        assert result is not None
        # The checkpoint is what survives a crash: a session becomes `trained` only once the weights that
        # learned from it are saved (the step above ends with the checkpoint). A crash before that point leaves
        # its claim to expire and the session is trained again by the restarted trainer, from the checkpoint
        # that does not contain it yet.
        skipped = set(built.skipped_sessions)
        await claims.mark_trained(self.db, [sid for sid in ids if sid not in skipped], step,
                                  worker_id=self.worker_id)
        if skipped:
            await claims.mark_skipped(self.db, list(skipped), "stale, or no trainable calls",
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
            "time/train_s": outcome.trained_at - t["build"], "time/save_s": outcome.exported_at - outcome.trained_at,
            "time/publish_s": outcome.hooked_at - outcome.exported_at,
            "time/checkpoint_s": outcome.checkpointed_at - outcome.hooked_at,
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
