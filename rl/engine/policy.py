"""``PolicyEngine``: verl's training worker behind a sample-level API (step, log-probs, export, checkpoints).

It owns the worker and the global step and keeps data-parallel ranks in lock step: every rank's batch is padded
to the same number of samples (verl's mini-batching splits the batch evenly), and loss normalisation uses the
global sample and token counts. :meth:`~PolicyEngine.step`, :meth:`~PolicyEngine.logprobs`,
:meth:`~PolicyEngine.export` and :meth:`~PolicyEngine.save_checkpoint` are collective under data parallelism.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from trainwire.rl import cpu_platform
from trainwire.rl.engine import checkpoint
from trainwire.rl.engine.batch import padded_ppo_tensors, to_no_padding
from trainwire.rl.engine.config import LOSSES_IGNORING_WEIGHTS, EngineConfig, loss_fn, training_worker_config
from trainwire.rl.engine.export import export_weights
from trainwire.rl.offpolicy import correct, needs_proximal
from trainwire.rl.samples import Sample

__all__ = ["PolicyEngine"]


class PolicyEngine:
    """verl ``TrainingWorker`` (FSDP2) + ``ppo_loss`` behind a small sample-level API."""

    def __init__(self, cfg: EngineConfig):
        # Before anything imports verl.workers' engines: their modules read the device name on import.
        cpu_platform.activate()
        self.cfg = cfg
        self.global_step = 0
        cpu_platform.init_single_process_group()
        torch.manual_seed(cfg.seed)
        self.worker = self._build_worker(reference=False)
        if cfg.freeze_embeddings and not self.is_lora:
            freeze_input_embeddings(self.worker.engine.module)
        self.worker.set_loss_fn(loss_fn(cfg))
        self._ref_worker = None  # full fine-tuning + KL: a frozen copy of the base model
        if cfg.kl_coef > 0 and not self.is_lora and cfg.objective == "rl":
            self._ref_worker = self._build_worker(reference=True)

    # ------------------------------------------------------------------ construction

    @property
    def is_lora(self) -> bool:
        return self.cfg.is_lora

    def _build_worker(self, reference: bool):
        from verl.workers.engine_workers import TrainingWorker

        worker = TrainingWorker(training_worker_config(self.cfg, reference=reference))
        worker.reset()
        return worker

    # ------------------------------------------------------------------ batches

    def _dp_group(self):
        return self.worker.engine.get_data_parallel_group()

    def _dp_size(self) -> int:
        return self.worker.engine.get_data_parallel_size()

    def _all_reduce_int(self, value: int, op) -> int:
        if self._dp_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=op, group=self._dp_group())
        return int(t.item())

    def _pad_token(self) -> int:
        tok = self.worker.model_config.tokenizer
        for tid in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if tid is not None:
                return int(tid)
        return 0

    def _padded(self, samples: Sequence[Sample]) -> tuple[list[Sample], int]:
        """Pad the local batch with fully masked dummies so every DP rank holds the same
        number of samples, a multiple of mini_batch_size when it is set, else of micro_batch_size (verl's splitting
        requires both)."""
        n = len(samples)
        target = self._all_reduce_int(n, dist.ReduceOp.MAX)
        m = self.cfg.mini_batch_size or (
            self.cfg.micro_batch_size if self.cfg.max_tokens_per_micro_batch is None else 1
        )
        target = ((max(target, 1) + m - 1) // m) * m
        pad = self._pad_token()
        dummy = Sample(
            prompt_ids=[pad], response_ids=[pad], response_mask=[0], old_logprobs=[0.0], advantage=0.0, weight=0.0
        )
        return list(samples) + [dummy] * (target - n), n

    def _infer_padded(self, samples: Sequence[Sample], reference: bool) -> torch.Tensor:
        """Log-probs of the response tokens, (bsz, max_response_len), for an already padded batch."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        tensors = padded_ppo_tensors(samples, self._pad_token(), with_weights=False)
        non_tensor: dict[str, Any] = {"compute_loss": False, "calculate_entropy": False}
        worker = self.worker
        if reference:
            if self.is_lora:
                non_tensor["no_lora_adapter"] = True
            else:
                if self._ref_worker is None:
                    self._ref_worker = self._build_worker(reference=True)
                worker = self._ref_worker
        td = to_no_padding(tensors, self.cfg.temperature, **non_tensor)
        out = worker.infer_batch(td)
        return no_padding_2_padding(tu.get(out, "log_probs"), td).float().cpu()

    def build_train_batch(self, samples: Sequence[Sample]):
        """The no-padding TensorDict ``train_mini_batch`` consumes, plus bookkeeping numbers.

        Collective under data parallelism (pads every rank to the same sample count).
        """
        if not samples:
            raise ValueError("step() needs at least one sample")
        for s in samples:
            s.validate()
        padded, n_real = self._padded(samples)
        sft = self.cfg.objective == "sft"
        correcting = not sft and needs_proximal(self.cfg.off_policy)
        with_weights = correcting or (not sft and any(s.weight != 1.0 for s in samples))
        if with_weights and self.cfg.policy_loss in LOSSES_IGNORING_WEIGHTS:
            raise ValueError(f"policy_loss {self.cfg.policy_loss!r} ignores per-sample weights")
        tensors = padded_ppo_tensors(padded, self._pad_token(), with_weights=with_weights, with_proximal=correcting)
        correction: dict[str, float] = {}
        if correcting:
            old, is_weights, correction = correct(
                self.cfg.off_policy,
                tensors["old_log_probs"],
                tensors.pop("proximal_log_probs"),
                tensors["response_mask"],
                self.cfg.is_cap,
            )
            tensors["old_log_probs"] = old
            tensors["rollout_is_weights"] = tensors["rollout_is_weights"] * is_weights
        if self.cfg.kl_coef > 0 and not sft:
            tensors["ref_log_prob"] = self._infer_padded(padded, reference=True)
        n_local = len(padded)
        dp = self._dp_size()
        n_global_real = self._all_reduce_int(n_real, dist.ReduceOp.SUM)
        mini = self.cfg.mini_batch_size
        if mini is None:
            mini_global = n_local * dp
        else:
            if n_local % mini != 0:
                raise ValueError(f"batch of {n_local} (padded) is not divisible by mini_batch_size {mini}")
            mini_global = mini * dp
        td = to_no_padding(
            tensors,
            self.cfg.temperature,
            # seq-mean aggregation modes divide by the number of sequences in a mini-batch;
            # the padding dummies are fully masked and do not count.
            global_batch_size=max(1, n_global_real if mini is None else mini_global),
            mini_batch_size=mini_global,
            epochs=self.cfg.ppo_epochs,
            seed=self.cfg.seed,
            dataloader_kwargs={"shuffle": False},
            compute_loss=True,
            calculate_entropy=not sft and (self.cfg.calculate_entropy or self.cfg.entropy_coeff != 0),
        )
        if sft:
            td["loss_mask"] = sequence_loss_mask(tensors, td)
        info = {
            **correction,
            "samples": float(n_global_real),
            "tokens": float(self._all_reduce_int(int(tensors["response_mask"].sum()), dist.ReduceOp.SUM)),
        }
        return td, info

    # ------------------------------------------------------------------ public API

    def step(self, samples: Sequence[Sample]) -> dict[str, float]:
        """One policy update on ``samples``; returns float metrics."""
        from verl.utils import tensordict_utils as tu

        t0 = time.perf_counter()
        td, info = self.build_train_batch(samples)
        out = self.worker.train_mini_batch(td)
        raw = tu.get(out, "metrics") if out is not None else {}
        self.global_step += 1
        metrics = _flatten_metrics(raw)
        result: dict[str, float] = {}
        aliases = {
            "loss": "loss",
            "pg_loss": "actor/pg_loss",
            "grad_norm": "grad_norm",
            "lr": "lr",
            "clip_frac": "actor/pg_clipfrac",
            "clip_frac_lower": "actor/pg_clipfrac_lower",
            "ppo_kl": "actor/ppo_kl",
            "entropy": "actor/entropy_loss",
            "kl": "kl_loss",
        }
        for short, key in aliases.items():
            if key in metrics:
                result[short] = metrics[key]
        for key, val in metrics.items():
            if key.startswith("perf/") or key == "mfu":
                continue
            result.setdefault(f"verl/{key}", val)
        result.update(info)
        result["step"] = float(self.global_step)
        result["step_time_s"] = time.perf_counter() - t0
        return result

    def logprobs(self, samples: Sequence[Sample], reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each sample's response under the current policy (or, with
        ``reference=True``, the base model), at ``cfg.temperature``. Collective under DP: every rank calls it,
        also one with no samples of its own (it then runs on padding)."""
        if not samples and self._dp_size() == 1:
            return []
        padded, n = self._padded(samples)
        lp = self._infer_padded(padded, reference=reference)
        return [lp[i, : len(s.response_ids)].tolist() for i, s in enumerate(samples[:n])]

    # ------------------------------------------------------------------ export

    def export(self, out_dir: Path) -> Path:
        """Write weights vLLM can load into ``out_dir`` (replaced if it exists); return it.

        LoRA: a PEFT adapter folder; full fine-tuning: a complete HF model folder
        (:mod:`trainwire.rl.engine.export`). Collective under DP: every rank must call it; rank 0 writes.
        """
        return export_weights(self.worker, self.cfg, out_dir)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, step: Optional[int] = None) -> Path:
        return checkpoint.checkpoint_path(self.cfg, self.global_step if step is None else step)

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint under ``cfg.checkpoint_dir`` (verl's tracker file), or None."""
        return checkpoint.latest_checkpoint(self.cfg)

    def save_checkpoint(self, ckpt_dir: Optional[Path] = None) -> Path:
        """Save model + optimizer + LR scheduler + RNG state (verl's FSDP checkpoint manager).

        Without ``ckpt_dir`` it writes ``cfg.checkpoint_dir/global_step_<n>`` and updates verl's
        ``latest_checkpointed_iteration.txt`` there. Collective under DP.
        """
        return checkpoint.save_checkpoint(self.worker, self.cfg, self.global_step, ckpt_dir)

    def load_checkpoint(self, ckpt_dir: Optional[Path] = None) -> Optional[Path]:
        """Restore a checkpoint written by :meth:`save_checkpoint` (default: the latest one under
        ``cfg.checkpoint_dir``). Returns the path loaded, or None if there was none."""
        loaded = checkpoint.load_checkpoint(self.worker, self.cfg, ckpt_dir)
        if loaded is None:
            return None
        path, step = loaded
        if step is not None:
            self.global_step = step
        self._set_lr(self.cfg.lr)
        return path

    def _set_lr(self, lr: float) -> None:
        """The learning rate of this run, also after a resume: the optimizer and scheduler state a checkpoint
        restores carry the learning rate of the run that saved it (an RL run continuing an SFT checkpoint would
        otherwise train at the SFT rate). The optimizer's moments are kept."""
        engine = self.worker.engine
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
            group["initial_lr"] = lr
        scheduler = getattr(engine, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
            scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]

    # ------------------------------------------------------------------ introspection

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable-model state on CPU with HF/PEFT names; for tests and tools.
        Collective under DP."""
        out = {}
        for name, tensor in self.worker.engine.module.state_dict().items():
            t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            out[name] = t.detach().to("cpu").clone()
        return out


def freeze_input_embeddings(module: torch.nn.Module) -> None:
    """No gradient for the input embeddings, so AdamW never moves them (a parameter without a gradient is skipped,
    its moments included); with tied embeddings this holds the output layer too."""
    embeddings = module.get_input_embeddings()
    for p in embeddings.parameters():
        p.requires_grad_(False)


def sequence_loss_mask(tensors: dict[str, torch.Tensor], td) -> torch.Tensor:
    """verl's SFT loss mask: per sample, over the whole sequence (prompt and response) in the no-padding layout,
    1 on the response tokens with mask 1 (the loss rolls it by one to align it with the log-probs, which score the
    next token). :func:`~trainwire.rl.engine.batch.to_no_padding` sets ``loss_mask`` to the padded response mask,
    which is what the PPO loss reads."""
    attention = tensors["attention_mask"]
    prompt_len = tensors["prompts"].shape[1]
    full = torch.zeros_like(attention)
    full[:, prompt_len:] = tensors["response_mask"]
    values = full[attention.bool()]  # row by row, as the no-padding input_ids
    return torch.nested.nested_tensor_from_jagged(values, offsets=td["input_ids"].offsets())


def _flatten_metrics(raw: dict) -> dict[str, float]:
    """verl returns lists (one entry per mini-batch / micro-batch); report their mean."""
    out: dict[str, float] = {}
    for key, val in raw.items():
        if isinstance(val, (list, tuple)):
            vals = [f for f in (_to_float(v) for v in val) if f is not None]
            if vals:
                out[key] = sum(vals) / len(vals)
        else:
            v = _to_float(val)
            if v is not None:
                out[key] = v
    return out


def _to_float(v: Any) -> Optional[float]:
    if hasattr(v, "value") and not isinstance(v, (int, float)):  # verl Metric
        v = v.value
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
