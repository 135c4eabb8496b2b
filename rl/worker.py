"""`trainwire train`: the background worker.

check the checkpoint directory is this run's (:mod:`trainwire.rl.identity`) -> build the engine, resume ->
retire sessions beyond --max-staleness (:mod:`trainwire.store.staleness`) -> claim finished sessions -> build samples
from recorded token ids -> credit assignment -> advantages (verl) -> agreement pass over the samples served by the
current weights (:mod:`trainwire.rl.agreement`), with --off-policy tis|decoupled a proximal pass over all of them
(:mod:`trainwire.rl.offpolicy`) -> one optimizer step (verl's engine) -> export -> publish into every vLLM upstream -> record the version (the proxy switches on
the next request) -> checkpoint -> mark sessions trained -> log metrics.

SIGTERM or SIGINT stops it at any moment with exit code 0 and the claims of an unfinished step given back
(:mod:`trainwire.rl.stopping`); a checkpoint directory of another run stops it before the engine is built, with
one line on stderr and exit code 2.

Under torchrun rank 0 does everything above and every rank trains its shard; the ranks' shared sequence
(agreement pass, step, export, checkpoint) is :mod:`trainwire.rl.collective`'s, with rank 0's publishing as its
hook."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from trainwire.rl import pending_step
from trainwire.rl.agreement import AgreementExceeded
from trainwire.rl.collective import Collective, StepHooks
from trainwire.rl.db_wait import DbWait
from trainwire.rl.identity import Refused, RunIdentity, check_checkpoint_dir, move_aside, write_manifest
from trainwire.rl.offpolicy import needs_proximal
from trainwire.rl.stopping import Stopper, StopRequested
from trainwire.settings import TrainerSettings
from trainwire.store import claims, episodes
from trainwire.store.db import make_engine, redact
from trainwire.store.db_errors import is_transient
from trainwire.store.identity import store_id
from trainwire.store.policy import latest_version, record_publish
from trainwire.store.staleness import retire_stale
from trainwire.store.trainer_lease import LeaseHeld, TrainerLease
from trainwire.store.training import record_train_step

if TYPE_CHECKING:
    from trainwire.rl.publish import PublishResult
    from trainwire.rl.retokenize import ChatRenderer

log = logging.getLogger("trainwire.train")

# LoRA adapters go on every linear layer (PEFT's "all-linear"); recorded in the run's manifest.
LORA_TARGET_MODULES = "all-linear"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(msg: str) -> None:
    if _rank() == 0:  # under torchrun only rank 0 speaks
        print(f"[trainwire train] {msg}", flush=True)


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


class _Publish(StepHooks):
    """Rank 0's part of a step: give the claims back when the step fails; publish the export into vLLM and
    record the version before the checkpoint; in one process, let a stop signal interrupt the step's work."""

    def __init__(self, trainer: "Trainer", session_ids: list[str], version: int) -> None:
        self.trainer = trainer
        self.session_ids = session_ids
        self.version = version
        self.result: PublishResult | None = None  # set by exported(), which runs in every step that returns

    def guard(self) -> AbstractContextManager:
        # Under torchrun the other ranks are in the same collective calls: the step is finished, then stopped.
        return self.trainer.stopper.interruptible() if self.trainer.ranks.world == 1 else nullcontext()

    async def step_failed(self) -> None:
        await self.trainer._release_failed(self.session_ids)

    async def refused(self) -> None:
        # Nothing was trained: the sessions go back as they were, for a trainer that agrees with vLLM.
        await claims.release(self.trainer.db, self.session_ids, worker_id=self.trainer.worker_id)

    async def exported(self, path: Path) -> None:
        tr = self.trainer
        result = await tr.pub.publish(self.version, str(tr.vllm_root / path.name))
        served = result.served_model if tr.pub.kind == "lora" else (tr.base_model or tr.model)
        if result.reached:
            await tr.db_wait(
                f"recording v{self.version}",
                lambda: record_publish(
                    tr.db,
                    version=self.version,
                    kind=tr.pub.kind,
                    served_model=served,
                    path=str(path),
                    train_step=tr.policy.global_step,
                    reached=result.reached,
                    failed=list(result.failed),
                ),
            )
            tr.version = self.version
            tr.weights_version = self.version
        else:
            tr.weights_version = None  # the trainer's weights are no version anything serves
        for url, why in result.failed.items():
            _say(f"WARNING: publish of v{self.version} to {url} failed: {why}")
        self.result = result


class Trainer:
    def __init__(self, settings: TrainerSettings, stopper: Stopper | None = None) -> None:
        if not settings.model:
            raise Refused("--model is required (the base model path vLLM serves)")
        if settings.objective == "rl" and (settings.sft_from or settings.min_reward is not None):
            raise Refused(
                "--sft-from and --min-reward select calls for supervised fine-tuning: use them with --objective sft"
            )
        self.s = settings
        self.model: str = settings.model
        self.db = make_engine(settings.resolved_database_url)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = TrainerLease(self.db, self.worker_id)
        self.db_wait = DbWait(_say, lambda: self.stopper.requested)
        self.stopper = stopper or Stopper(say=_say)
        self.publish_root = settings.checkpoint_dir / "published"
        self.vllm_root = Path(settings.publish_dir) / "published" if settings.publish_dir else self.publish_root
        self.version = 0
        # The policy version whose weights the engine holds (what the agreement pass compares against); None
        # after a step whose publish reached no upstream.
        self.weights_version: int | None = None
        self._new_run: RunIdentity | None = None  # a first start: the manifest to write once the engine is built
        # --objective sft --sft-from: the policy's chat template (rl/retokenize.py)
        self.renderer: ChatRenderer | None = None
        # Sessions retired as stale in SQL since the last step (store/staleness.py), reported with the next step.
        self.retired = 0

    @property
    def stop_requested(self) -> bool:
        return self.stopper.requested

    def _engine_config(self):
        from trainwire.rl.engine import EngineConfig
        from trainwire.rl.engine.config import freezes_embeddings

        s = self.s
        # --mini-batch-size N: N samples per optimizer update (micro-batches of up to 4 that divide it)
        mini = s.mini_batch_size or None
        return EngineConfig(
            model_path=self.model,
            lora_rank=s.lora_rank,
            lora_alpha=s.lora_alpha,
            lora_target_modules=LORA_TARGET_MODULES,
            freeze_embeddings=s.lora_rank == 0 and freezes_embeddings(s.freeze_embeddings, self.model),
            lr=s.lr,
            objective=s.objective,
            ppo_epochs=s.epochs,
            mini_batch_size=mini,
            micro_batch_size=math.gcd(mini, 4) if mini else 4,
            policy_loss=s.policy_loss,
            loss_agg_mode=s.loss_agg_mode,
            clip_ratio_low=s.clip_ratio,
            clip_ratio_high=s.clip_ratio,
            kl_coef=s.kl_coef,
            off_policy=s.off_policy if s.objective == "rl" else "drop",
            is_cap=s.is_cap,
            temperature=s.temperature,
            seed=s.seed,
            checkpoint_dir=str(s.checkpoint_dir / "state"),
        )

    async def run(self) -> int:
        self.stopper.attach()
        try:
            return await self._run()
        except (StopRequested, asyncio.CancelledError):
            _say(f"stopped ({self.stopper.signal_name or 'cancelled'})")
            return 0
        finally:
            self.stopper.detach()
            await self.lease.release()
            await self.db.dispose()

    async def _run(self) -> int:
        s = self.s
        if _rank() == 0:
            # The other ranks' engines join rank 0's process group, which rank 0 forms only after this: they
            # read the checkpoint directory as rank 0 left it (moved aside by --fresh, say).
            await self._check_run()
        with self.stopper.interruptible():  # a signal here stops the start-up where it is
            from trainwire.rl.advantages import advantage_estimator_names

            if s.adv_estimator not in advantage_estimator_names():
                raise Refused(
                    f"unknown --adv-estimator {s.adv_estimator!r}; verl has: " + ", ".join(advantage_estimator_names())
                )
            if s.objective == "sft" and s.sft_from:
                from trainwire.rl.retokenize import ChatRenderer, RenderError

                try:
                    self.renderer = ChatRenderer.from_pretrained(self.model)
                except RenderError as exc:
                    raise Refused(f"--sft-from needs the policy's chat template: {exc}") from None
            _say(
                f"loading {s.model} into verl's engine "
                f"({f'LoRA rank {s.lora_rank}' if s.lora_rank else 'full fine-tuning'}"
                + (
                    "; supervised fine-tuning on the policy's own calls"
                    + (f" and those of {', '.join(s.sft_from)}" if s.sft_from else "")
                    + (f", sessions with a final reward >= {s.min_reward:g}" if s.min_reward is not None else "")
                    if s.objective == "sft"
                    else ""
                )
                + ")"
            )
            t0 = time.perf_counter()
            from trainwire.rl.engine import PolicyEngine

            config = self._engine_config()
            if config.freeze_embeddings:
                _say(
                    "input embeddings frozen (--freeze-embeddings "
                    f"{s.freeze_embeddings}{': tied to the output layer' if s.freeze_embeddings == 'auto' else ''})"
                )
            self.policy = PolicyEngine(config)
            if self._new_run is not None:
                write_manifest(s.checkpoint_dir, self._new_run)
            resumed = self.policy.load_checkpoint()
            self.ranks = Collective(
                self.policy,
                self.publish_root,
                proximal=s.objective == "rl" and needs_proximal(s.off_policy),
                agreement_max=s.agreement_max,
            )
        if self.ranks.rank != 0:
            return await self.ranks.follow()
        _say(
            f"engine ready in {time.perf_counter() - t0:.1f}s"
            + (f"; resumed from {resumed}" if resumed else "")
            + (
                f"; {self.ranks.world} ranks (torchrun): rank 0 claims and publishes, every rank trains its shard"
                if self.ranks.world > 1
                else ""
            )
        )
        try:
            return await self._lead()
        finally:
            self.ranks.stop()

    async def _check_run(self) -> None:
        """Refuse a checkpoint directory that holds another run (or, with --fresh, move it aside), before the
        engine is built: the engine would resume whatever it finds."""
        s = self.s
        url = s.resolved_database_url
        alembic = logging.getLogger("alembic")
        level = alembic.level
        alembic.setLevel(logging.WARNING)  # its INFO lines (plugins, revisions) are not the trainer's to print
        from trainwire.store.migrate import SchemaBehind, ensure_schema

        try:
            done = await ensure_schema(self.db, url)
            if done:
                _say(done)
            store = await store_id(self.db)
            await self.lease.acquire()
        except SchemaBehind as exc:
            raise Refused(str(exc)) from None
        except LeaseHeld as exc:
            raise Refused(f"{exc}; one trainer per store: stop that one first") from None
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise Refused(f"cannot reach the database at {redact(url)}: {str(exc).splitlines()[0]}", code=1) from None
        finally:
            alembic.setLevel(level)
        identity = RunIdentity.of(
            store_id=store,
            model=self.model,
            lora_rank=s.lora_rank,
            lora_alpha=s.lora_alpha,
            lora_target_modules=LORA_TARGET_MODULES,
        )
        if s.fresh:
            moved = move_aside(s.checkpoint_dir)
            if moved:
                _say(
                    f"--fresh: moved what {s.checkpoint_dir} held into {moved} (delete it when it is no longer "
                    "needed); starting at step 0"
                )
            self._new_run = identity
            return
        found = check_checkpoint_dir(s.checkpoint_dir, identity, shown=str(s.checkpoint_dir))
        if found is None:
            self._new_run = identity
        elif (found.get("base_model") or {}).get("path") != identity.base_model.get("path"):
            _say(
                f"the base model of this run was at {found['base_model'].get('path')}; the same config and "
                f"weights are now at {identity.base_model.get('path')}"
            )

    async def _settle_dead_claims(self) -> None:
        """Claims left in the store are a dead trainer's (this one holds the lease): the sessions of a step its
        checkpoint holds are trained by that step; the rest go back, at once (rl/pending_step.py)."""
        pending = pending_step.read(self.s.checkpoint_dir)
        if pending is not None and pending.step <= self.policy.global_step:
            done = await self.db_wait(
                "settling the last step",
                lambda: claims.mark_trained(self.db, pending.sessions, pending.step, worker_id=pending.worker_id),
            )
            if done:
                _say(f"step {pending.step} was saved before the last trainer stopped: its {done} sessions are trained")
        released = await self.db_wait(
            "giving back claims", lambda: claims.release_stale_claims(self.db, older_than_s=0)
        )
        if released:
            _say(f"gave back {released} sessions claimed by a trainer that is gone")
        pending_step.clear(self.s.checkpoint_dir)

    async def _lead(self) -> int:
        s = self.s
        await self._settle_dead_claims()
        from trainwire.rl.metrics_sink import MetricsSink
        from trainwire.rl.publish import Publisher

        self.sink = MetricsSink(s)
        kind = "lora" if s.lora_rank else "full"
        try:
            async with Publisher(
                s.upstream,
                kind=kind,
                policy_name=s.policy_model,
                api_key=s.upstream_api_key,
                lora_grace_s=s.lora_grace_s,
            ) as pub:
                self.pub = pub
                warning = await pub.logprobs_mode_warning()
                if warning:
                    log.warning(warning)
                    _say(f"WARNING: {warning}")
                self.base_model = await pub.base_model()
                self.version = await self.db_wait("reading the policy version", lambda: latest_version(self.db))
                self.weights_version = self.version
                adopted = await pub.adopt_loaded(self.version)
                if adopted:
                    _say(
                        f"adapters already loaded in vLLM: {', '.join(adopted)} (older ones unload after "
                        f"{s.lora_grace_s:.0f}s)"
                    )
                _say(
                    f"policy version in the store: {self.version}; waiting for rewarded sessions "
                    f"(batch {s.batch_size}, settle {s.settle_s}s)"
                )
                from trainwire.rl.serving_watch import ServingWatch

                watch = ServingWatch(
                    pub,
                    self.db,
                    every_s=s.serving_check_s,
                    vllm_root=self.vllm_root,
                    base_model=self.base_model or self.model,
                    say=_say,
                )
                steps = 0
                idle_since = time.monotonic()
                while not self.stopper.requested:
                    if not await self._keep_lease():
                        return 2
                    await watch.check(self.version)
                    released = await self.db_wait(
                        "releasing stale claims",
                        lambda: claims.release_stale_claims(self.db, older_than_s=s.claim_timeout_s),
                    )
                    if released:
                        _say(f"released {released} stale claims of a crashed trainer")
                    trained = await self.step_once()
                    if self.stopper.requested:
                        break
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
        finally:
            self.sink.close()
        if self.stopper.requested:
            _say(f"stopped ({self.stopper.signal_name})")
        return 0

    async def _keep_lease(self) -> bool:
        """False when another trainer took the store's lease (ours was lost with the database connection)."""
        now = time.monotonic()
        if now < getattr(self, "_lease_next", 0.0):
            return True
        self._lease_next = now + 5.0
        try:
            await self.lease.keep()
        except LeaseHeld as exc:
            _say(f"stopping: {exc}")
            return False
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("cannot check the trainer lease, the database is away: %s", exc)
        return True

    async def _mark_skipped(self, sessions: list[episodes.ClaimedSession], ids: list[str], sft: bool) -> None:
        """Claimed sessions no sample came from become ``skipped``, with the reason."""
        if not sft:
            await self._skip(ids, "stale, or no trainable calls (untrainable sampling or no token data)")
            return
        bar = self.s.min_reward
        low = {x.id for x in sessions if bar is not None and (x.final_reward is None or x.final_reward < bar)}
        if low:
            await self._skip([i for i in ids if i in low], f"final reward below --min-reward {bar:g}")
        rest = [i for i in ids if i not in low]
        if rest:
            await self._skip(
                rest,
                "no calls to fine-tune on (own calls without token data, or "
                "calls of the --sft-from routes that cannot be rendered)",
            )

    async def _skip(self, ids: list[str], reason: str) -> None:
        await self.db_wait(
            "marking sessions skipped",
            lambda: claims.mark_skipped(self.db, ids, reason, worker_id=self.worker_id),
        )

    async def _release_failed(self, ids: list[str]) -> None:
        await self.db_wait("giving claims back", lambda: claims.release(self.db, ids, worker_id=self.worker_id))
        log.exception("training step failed; released %d sessions for a later step", len(ids))

    async def step_once(self) -> dict | None:
        """One claim-train-publish cycle; None when nothing was ready. A stop signal during the step's work
        (before the publish) gives the claims back and raises StopRequested; once the publish has begun the step
        is finished first."""
        s = self.s
        t = {"start": time.perf_counter()}
        if s.objective == "rl" and s.max_staleness >= 0:
            self.retired += await self.db_wait(
                "retiring stale sessions",
                lambda: retire_stale(self.db, oldest_fresh=self.version - s.max_staleness, train_agents=s.train_agent),
            )
        batch = await self.db_wait(
            "claiming a batch",
            lambda: claims.claim_batch(
                self.db,
                worker_id=self.worker_id,
                batch_size=s.batch_size,
                train_agents=s.train_agent,
                group_by_task=s.group_by_task,
                group_size=s.group_size,
                group_timeout_s=s.group_timeout_s,
                settle_s=s.settle_s,
                sft_from=s.sft_from if s.objective == "sft" else (),
                newest_first=s.claim_order == "newest",
            ),
        )
        if not batch:
            return None
        ids = [b.id for b in batch]
        t["claim"] = time.perf_counter()
        with self.stopper.protected():
            try:
                return await self._train(batch, ids, t)
            except StopRequested:
                try:
                    released = await claims.release(self.db, ids, worker_id=self.worker_id)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self.stopper.say(
                        f"stopped during step {self.policy.global_step + 1}; the database is away, so its "
                        "sessions stay claimed until the next trainer starts (it gives them back at once)"
                    )
                    raise StopRequested() from None
                self.stopper.say(
                    f"stopped during step {self.policy.global_step + 1}; gave its {released} sessions back"
                )
                raise

    async def _train(self, batch: list[episodes.ClaimedSession], ids: list[str], t: dict[str, float]) -> dict:
        from trainwire.rl.advantages import compute_advantages
        from trainwire.rl.transitions import build_samples

        s = self.s
        sft = s.objective == "sft"
        try:
            if sft:
                from trainwire.rl.sft import build_sft_samples

                built = build_sft_samples(
                    batch, renderer=self.renderer, sft_from=s.sft_from, min_reward=s.min_reward, mode=s.mode
                )
            else:
                built = build_samples(
                    batch,
                    mode=s.mode,
                    gamma=s.gamma,
                    default_reward=s.default_reward,
                    group_by_task=s.group_by_task,
                    current_version=self.version,
                    max_staleness=s.max_staleness,
                    temperature=s.temperature,
                )
            for why, n in built.skip_reasons.items():
                log.info("skipped %d calls: %s", n, why)
            if not built.samples:
                await self._mark_skipped(batch, ids, sft)
                _say(f"skipped {len(ids)} sessions: nothing to train on ({built.counters})")
                return {}
            advantages = (
                [0.0] * len(built.samples)
                if sft
                else compute_advantages(built.scores, built.group_ids, estimator=s.adv_estimator)
            )
            samples = [replace(x, advantage=a) for x, a in zip(built.samples, advantages)]
        except Exception:
            await self._release_failed(ids)
            raise
        t["build"] = time.perf_counter()
        # Samples served by the weights the engine holds now: their recorded log-probs must be the engine's. SFT
        # trains on calls other models served too, and has no ratio to get wrong: no agreement pass.
        check = built.served_by(self.weights_version) if self.weights_version is not None and not sft else None
        served_by = self.weights_version
        skipped = set(built.skipped_sessions)
        trained = [sid for sid in ids if sid not in skipped]
        pending_step.write(
            s.checkpoint_dir, pending_step.PendingStep(self.policy.global_step + 1, self.worker_id, trained)
        )
        hooks = _Publish(self, ids, self.version + 1)
        # In the loop thread: verl state is per-thread.
        outcome = await self.ranks.step(samples, self.version + 1, hooks, check)
        step = self.policy.global_step
        metrics, result = outcome.metrics, hooks.result
        assert result is not None
        # The checkpoint is what survives a crash: a session becomes `trained` only once the weights that
        # learned from it are saved (the step above ends with the checkpoint). A crash before that point leaves
        # its claim to expire and the session is trained again by the restarted trainer, from the checkpoint
        # that does not contain it yet.
        await self.db_wait(
            f"marking step {step}'s sessions trained",
            lambda: claims.mark_trained(self.db, trained, step, worker_id=self.worker_id),
        )
        pending_step.clear(s.checkpoint_dir)
        if skipped:
            await self._mark_skipped([x for x in batch if x.id in skipped], list(skipped), sft)
        retired, self.retired = self.retired, 0
        rewards = [x.final_reward for x in batch if x.final_reward is not None]
        r_mean, r_std = _stats(rewards)
        a_mean, a_std = _stats(advantages)
        if not sft:
            metrics.update(
                {
                    "advantage/mean": a_mean,
                    "advantage/std": a_std,
                    "advantage/max": max(advantages),
                    "advantage/min": min(advantages),
                }
            )
        metrics.update(
            {
                "reward/mean": r_mean,
                "reward/std": r_std,
                "batch/sessions": len(ids),
                "batch/samples": len(samples),
                "batch/tokens": float(sum(sum(x.response_mask) for x in samples)),
                "staleness/mean": built.staleness_mean,
                **{f"staleness/sessions_{age}": float(n) for age, n in sorted(built.staleness_hist.items())},
                "sessions/trained": float(len(ids) - len(skipped)),
                "sessions/dropped_stale": float(built.skipped_stale + retired),
                "sessions/skipped_other": float(len(skipped) - built.skipped_stale),
                **{f"batch/{k}": float(v) for k, v in built.counters.items()},
                "policy/version": float(self.version),
                "publish/failed_upstreams": float(len(result.failed)),
                "time/claim_s": t["claim"] - t["start"],
                "time/build_s": t["build"] - t["claim"],
                "time/train_s": outcome.trained_at - t["build"],
                "time/save_s": outcome.exported_at - outcome.trained_at,
                "time/publish_s": outcome.hooked_at - outcome.exported_at,
                "time/checkpoint_s": outcome.checkpointed_at - outcome.hooked_at,
            }
        )
        await self.db_wait(
            f"recording step {step}",
            lambda: record_train_step(
                self.db,
                step=step,
                policy_version=self.version,
                n_sessions=len(ids),
                n_samples=len(samples),
                metrics=metrics,
            ),
        )
        self.sink.log(step, metrics)
        agree = ""
        if "agreement/mean_abs_dlogp" in metrics:
            agree = (
                f" | agreement |dlogp| {metrics['agreement/mean_abs_dlogp']:.2e} max "
                f"{metrics['agreement/max_abs_dlogp']:.2e} ({metrics['agreement/tokens']:.0f} tokens of v{served_by})"
            )
        what = (
            f"sft: {built.counters['teacher_calls']} calls of {', '.join(s.sft_from)}, "
            f"{built.counters['own_calls']} own, {len(skipped)} sessions skipped | "
            if sft and s.sft_from
            else f"sft: {built.counters['own_calls']} own calls | "
            if sft
            else ""
        )
        _say(
            f"step {step} -> v{self.version} | sessions {len(ids)} samples {len(samples)} | {what}"
            f"{'' if sft else _offpolicy_line(metrics, built.staleness_hist)}reward "
            f"{r_mean:.3f}±{r_std:.3f} | loss {metrics.get('loss', float('nan')):.4f} grad "
            f"{metrics.get('grad_norm', float('nan')):.3f} | train {metrics['time/train_s']:.2f}s publish "
            f"{metrics['time/publish_s'] * 1000:.0f}ms{agree}"
        )
        mean = metrics.get("agreement/mean_abs_dlogp")
        if mean is not None and mean > s.agreement_warn:
            warning = (
                f"the trainer's log-probs of the {metrics['agreement/tokens']:.0f} tokens v{served_by} served "
                f"differ from vLLM's by {mean:.4f} on average (max {metrics['agreement/max_abs_dlogp']:.4f}; "
                f"--agreement-warn {s.agreement_warn}): weights published but not served, a --temperature "
                f"other than the proxy's, or vLLM without --logprobs-mode processed_logprobs?"
            )
            log.warning(warning)
            _say(f"WARNING: {warning}")
        return metrics


def _offpolicy_line(metrics: dict, hist: dict[int, int]) -> str:
    """The console's part for staleness and correction: sessions trained/dropped, trained sessions by staleness,
    the importance weights (when correcting)."""
    ages = " ".join(f"{age}:{n}" for age, n in sorted(hist.items())) or "-"
    line = (
        f"trained {metrics['sessions/trained']:.0f} dropped {metrics['sessions/dropped_stale']:.0f} | "
        f"staleness {ages} | "
    )
    if "offpolicy/is_mean" in metrics:
        line += (
            f"IS mean {metrics['offpolicy/is_mean']:.3f} max {metrics['offpolicy/is_max']:.2f} "
            f"truncated {metrics['offpolicy/truncated_share'] * 100:.1f}% | "
        )
    return line


def run(settings: TrainerSettings) -> int:
    stopper = Stopper(say=_say).install()
    try:
        return asyncio.run(Trainer(settings, stopper).run())
    except Refused as exc:
        if _rank() == 0:
            print(f"trainwire train: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except AgreementExceeded as exc:
        if _rank() == 0:
            print(f"trainwire train: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except StopRequested:  # before the trainer's task began
        _say(f"stopped ({stopper.signal_name})")
        return 0
    finally:
        stopper.uninstall()
