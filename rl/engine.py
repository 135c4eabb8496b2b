"""The training engine: one code path for policy updates, on CPU and on GPU.

``PolicyEngine`` wraps verl's ``TrainingWorker`` (``verl.workers.engine_workers``) with the FSDP2
engine and verl's PPO loss (``verl.workers.utils.losses.ppo_loss``, which dispatches to the policy
loss registry in ``verl.trainer.ppo.core_algos``: vanilla, gspo, cispo, ...). We use verl one
layer below its trainers because none of verl's trainers trains on externally generated data:
our rollouts come from a vLLM server behind the proxy, not from rollout servers verl starts.

Data flow of one :meth:`PolicyEngine.step`::

    list[Sample] --(_build_batch)--> padded PPO batch in verl's trainer layout
        prompts (left-padded) | responses (right-padded) | input_ids | attention_mask |
        position_ids | response_mask | old_log_probs | advantages | [rollout_is_weights] |
        [ref_log_prob] + non-tensor temperature
      --(left_right_2_no_padding)--> no-padding (nested) layout the engine consumes
      + non-tensor keys train_mini_batch reads (global_batch_size, mini_batch_size, epochs, seed,
        dataloader_kwargs, compute_loss, calculate_entropy)
      --> TrainingWorker.train_mini_batch  (forward, ppo_loss, backward, clip, AdamW step)
      --> flat dict of float metrics

Per-sample loss weights (``Sample.weight``) travel as verl's ``rollout_is_weights``: every
registered policy loss except ``bypass_mode`` multiplies the per-token policy-gradient loss by it
before aggregation (``geo_mean`` folds it in geometrically, which for a per-sequence constant is
the same multiplier). KL and entropy terms are not weighted.

Running it
----------
* **One process, CPU or one GPU** (tests, CPU demo, the trainer worker): just construct
  ``PolicyEngine(cfg)``. Without CUDA it activates :mod:`rl.cpu_platform` (device ``cpu``,
  backend ``gloo``); with CUDA verl's own CUDA platform and NCCL are used. Either way a
  world-size-1 process group is created if none exists.
* **Many GPUs with torchrun** (SPMD, verl's FSDP way): ``torchrun --nproc-per-node N script.py``;
  every rank constructs ``PolicyEngine(cfg)`` (``init_single_process_group`` keeps torchrun's
  RANK/WORLD_SIZE/MASTER_* and initialises ``cpu:gloo,cuda:nccl``), FSDP2 shards the model over the
  N ranks, and every rank calls :meth:`step` with *its own shard* of the batch. Ranks may pass
  different numbers of samples: the engine pads every rank to the same count with fully masked
  dummy samples (required by verl's data-parallel mini-batching) and uses the global token /
  sample counts for loss normalisation. :meth:`export` and :meth:`save_checkpoint` are
  collective (all ranks must call them); only rank 0 writes the exported folder.
* **Many GPUs with Ray** (verl's single-controller way): wrap ``TrainingWorker`` in a
  ``verl.single_controller.ray.RayWorkerGroup`` (``RayResourcePool([n_gpus])`` +
  ``RayClassWithInitArgs(ray.remote(TrainingWorker), config=training_worker_config(cfg))``), call
  ``wg.reset()`` and ``wg.set_loss_fn(policy_loss_fn(cfg))``, and send
  ``to_no_padding(padded_ppo_tensors(samples, pad_id, ...), cfg.temperature, <the non-tensor keys
  build_train_batch sets>)`` to ``wg.train_mini_batch(td)`` (``.get()`` the result); its DP
  dispatch splits the batch across ranks (pad it to a multiple of dp * micro_batch_size). On CPU-only Ray workers export
  ``VERL_USE_EXTERNAL_MODULES=trainwire.rl.cpu_platform VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda`` and make
  the group exist before the worker is built (verl would build the invalid backend string
  ``cpu:gloo,cpu:gloo``). Nothing here hard-codes a world size of 1.

Behaviour log-probs from vLLM: vLLM returns *raw* log-probs (before temperature) unless it runs
with ``logprobs_mode=processed_logprobs``; set ``EngineConfig.temperature`` to match what the
recorded ``old_logprobs`` mean (1.0 for raw log-probs).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from trainwire.rl import cpu_platform
from trainwire.rl.samples import Sample

# Must run before anything imports verl.workers (its FSDP engine reads the device name on import).
cpu_platform.activate()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["EngineConfig", "PolicyEngine"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_ENGINE_STATE_FILE = "trainwire_engine.json"
_LATEST_FILE = "latest_checkpointed_iteration.txt"  # verl's tracker file name
# Losses whose rollout_is_weights argument is not a plain per-token multiplier.
_LOSSES_IGNORING_WEIGHTS = {"bypass_mode"}


@dataclass
class EngineConfig:
    model_path: str
    # LoRA: rank 0 = full fine-tuning.
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_target_modules: Any = "all-linear"
    # Optimiser (AdamW, constant LR after warm-up).
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_warmup_steps: int = 0
    # Loss: a name from verl's policy-loss registry and one of verl's aggregation modes.
    policy_loss: str = "vanilla"
    # Extra fields of verl's PolicyLossConfig for the chosen loss (e.g. {"dro_beta": 0.1}).
    policy_loss_options: dict = field(default_factory=dict)
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages (vanilla)
    kl_coef: float = 0.0  # > 0 adds a KL-to-reference loss; reference = the base model
    kl_type: str = "low_var_kl"
    entropy_coeff: float = 0.0
    calculate_entropy: bool = True  # report entropy (one extra pass over the logits)
    temperature: float = 1.0
    # Batching: samples per forward/backward micro-batch; one optimiser step per step() call
    # unless mini_batch_size is set (then len(samples) / mini_batch_size steps per epoch).
    micro_batch_size: int = 4
    mini_batch_size: Optional[int] = None
    ppo_epochs: int = 1
    # Token budget per micro-batch; when set, verl's dynamic batching replaces micro_batch_size.
    max_tokens_per_micro_batch: Optional[int] = None
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    # save_checkpoint() without a path keeps this many newest global_step_* folders (0 = all).
    keep_checkpoints: int = 2
    # Numerics / memory. None = pick per device: fp32 params + no checkpointing on CPU;
    # bf16 compute + gradient checkpointing on GPU.
    param_dtype: Optional[str] = None
    gradient_checkpointing: Optional[bool] = None
    attn_implementation: str = "sdpa"
    use_remove_padding: bool = True
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be >= 0")
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        if self.mini_batch_size is not None:
            if self.mini_batch_size < 1:
                raise ValueError("mini_batch_size must be >= 1")
            if self.max_tokens_per_micro_batch is None and self.mini_batch_size % self.micro_batch_size:
                raise ValueError("mini_batch_size must be a multiple of micro_batch_size")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        from trainwire.rl.advantages import policy_loss_names

        names = policy_loss_names()
        if self.policy_loss not in names:
            raise ValueError(f"unknown policy_loss {self.policy_loss!r}; verl has: {', '.join(names)}")


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------- verl configs


def _param_dtype(cfg: EngineConfig) -> str:
    if cfg.param_dtype:
        return cfg.param_dtype
    return "bf16" if _on_cuda() else "fp32"


def training_worker_config(cfg: EngineConfig, reference: bool = False):
    """The verl ``TrainingWorkerConfig`` for the policy (or, with ``reference``, for a frozen
    copy of the base model). Usable for an in-process worker and for a Ray worker group."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, TrainingWorkerConfig

    grad_ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else _on_cuda()
    is_lora = cfg.lora_rank > 0 and not reference
    model_config = HFModelConfig(
        path=cfg.model_path,
        # verl's default is flash_attention_2, which does not exist on CPU.
        override_config={"attn_implementation": cfg.attn_implementation},
        lora_rank=cfg.lora_rank if is_lora else 0,
        lora_alpha=cfg.lora_alpha,
        target_modules=cfg.lora_target_modules,
        enable_gradient_checkpointing=grad_ckpt and not reference,
        use_remove_padding=cfg.use_remove_padding,
        trust_remote_code=cfg.trust_remote_code,
    )
    dynamic = cfg.max_tokens_per_micro_batch is not None
    engine_config = FSDPEngineConfig(
        strategy="fsdp2",  # FSDP1 refuses CPU parameters (sync_module_states)
        # verl's forward-only engines always use FSDP2's CPUOffloadPolicy(pin_memory=True), which
        # needs an accelerator; on CPU the reference is an ordinary engine that is never stepped
        # (AdamW allocates its state lazily, so that costs nothing).
        forward_only=reference and _on_cuda(),
        model_dtype="fp32",
        mixed_precision={"param_dtype": _param_dtype(cfg), "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_dynamic_bsz=dynamic,
        micro_batch_size_per_gpu=cfg.micro_batch_size,
        infer_micro_batch_size_per_gpu=cfg.micro_batch_size,
        max_token_len_per_gpu=cfg.max_tokens_per_micro_batch,
        infer_max_token_len_per_gpu=cfg.max_tokens_per_micro_batch,
        seed=cfg.seed,
        # torch.compile of the entropy kernel needs a C++ toolchain and minutes on CPU.
        use_torch_compile=_on_cuda(),
    )
    optimizer_config = FSDPOptimizerConfig(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        clip_grad=cfg.grad_clip,
        lr_warmup_steps=cfg.lr_warmup_steps if cfg.lr_warmup_steps > 0 else -1,
        lr_scheduler_type="constant",
    )
    contents = ["model", "optimizer", "extra"]
    checkpoint_config = CheckpointConfig(save_contents=contents, load_contents=contents, save_lora_only=is_lora)
    return TrainingWorkerConfig(
        model_type="language_model",
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=checkpoint_config,
    )


def actor_config(cfg: EngineConfig):
    """verl ``FSDPActorConfig`` carrying the loss settings ``ppo_loss`` reads."""
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    return FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=1,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=cfg.micro_batch_size,
        use_dynamic_bsz=cfg.max_tokens_per_micro_batch is not None,
        ppo_max_token_len_per_gpu=cfg.max_tokens_per_micro_batch or 16384,
        clip_ratio=cfg.clip_ratio_low,
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        clip_ratio_c=cfg.clip_ratio_c,
        policy_loss=PolicyLossConfig(loss_mode=cfg.policy_loss, **cfg.policy_loss_options),
        loss_agg_mode=cfg.loss_agg_mode,
        entropy_coeff=cfg.entropy_coeff,
        calculate_entropy=cfg.calculate_entropy,
        use_kl_loss=cfg.kl_coef > 0,
        kl_loss_coef=cfg.kl_coef,
        kl_loss_type=cfg.kl_type,
        use_torch_compile=_on_cuda(),
        ppo_epochs=cfg.ppo_epochs,
    )


def policy_loss_fn(cfg: EngineConfig):
    """The loss the worker runs: verl's ``ppo_loss`` bound to :func:`actor_config`."""
    from verl.workers.utils.losses import ppo_loss

    return functools.partial(ppo_loss, config=actor_config(cfg))


# ---------------------------------------------------------------------- batches


def padded_ppo_tensors(samples: Sequence[Sample], pad_token_id: int, with_weights: bool) -> dict[str, torch.Tensor]:
    """verl's PPO-trainer layout: prompts left-padded, responses right-padded, masks, position
    ids, behaviour log-probs (zeroed under mask 0), broadcast advantages, optional weights."""
    from verl.utils.model import compute_position_id_with_mask

    bsz = len(samples)
    P = max(len(s.prompt_ids) for s in samples)
    R = max(len(s.response_ids) for s in samples)
    prompts = torch.full((bsz, P), pad_token_id, dtype=torch.long)
    responses = torch.full((bsz, R), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, P + R), dtype=torch.long)
    response_mask = torch.zeros((bsz, R), dtype=torch.long)
    old_log_probs = torch.zeros((bsz, R), dtype=torch.float32)
    advantages = torch.zeros((bsz, R), dtype=torch.float32)
    weights = torch.zeros((bsz, R), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        prompts[i, P - p :] = torch.tensor(s.prompt_ids, dtype=torch.long)
        responses[i, :r] = torch.tensor(s.response_ids, dtype=torch.long)
        attention_mask[i, P - p : P + r] = 1
        mask = torch.tensor([1 if m else 0 for m in s.response_mask], dtype=torch.long)
        response_mask[i, :r] = mask
        lps = torch.tensor([float(lp) if lp is not None else 0.0 for lp in s.old_logprobs], dtype=torch.float32)
        old_log_probs[i, :r] = torch.where(mask.bool(), lps, torch.zeros_like(lps))
        advantages[i, :r] = float(s.advantage) * mask
        weights[i, :r] = float(s.weight)
    out = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": compute_position_id_with_mask(attention_mask),
        "response_mask": response_mask,
        "old_log_probs": old_log_probs,
        "advantages": advantages,
    }
    if with_weights:
        out["rollout_is_weights"] = weights
    return out


def to_no_padding(tensors: dict[str, torch.Tensor], temperature: float, **non_tensor):
    """Padded tensors -> the no-padding TensorDict verl's engines consume, plus non-tensor keys.
    Build a fresh one per worker call: ``train_mini_batch`` pops some of the keys."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = tu.get_tensordict(dict(tensors), non_tensor_dict={"temperature": float(temperature)})
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, **non_tensor)
    return td


class PolicyEngine:
    """verl ``TrainingWorker`` (FSDP2) + ``ppo_loss`` behind a small sample-level API."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.global_step = 0
        cpu_platform.init_single_process_group()
        torch.manual_seed(cfg.seed)
        self.worker = self._build_worker(reference=False)
        self.worker.set_loss_fn(policy_loss_fn(cfg))
        self._ref_worker = None  # full fine-tuning + KL: a frozen copy of the base model
        if cfg.kl_coef > 0 and not self.is_lora:
            self._ref_worker = self._build_worker(reference=True)

    # ------------------------------------------------------------------ construction

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

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
        number of samples, a multiple of micro_batch_size (verl's splitting requires both)."""
        n = len(samples)
        target = self._all_reduce_int(n, dist.ReduceOp.MAX)
        if self.cfg.max_tokens_per_micro_batch is None:
            m = self.cfg.micro_batch_size
            target = ((max(target, 1) + m - 1) // m) * m
        pad = self._pad_token()
        dummy = Sample(prompt_ids=[pad], response_ids=[pad], response_mask=[0], old_logprobs=[0.0], advantage=0.0,
                       weight=0.0)
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
        with_weights = any(s.weight != 1.0 for s in samples)
        if with_weights and self.cfg.policy_loss in _LOSSES_IGNORING_WEIGHTS:
            raise ValueError(f"policy_loss {self.cfg.policy_loss!r} ignores per-sample weights")
        tensors = padded_ppo_tensors(padded, self._pad_token(), with_weights=with_weights)
        if self.cfg.kl_coef > 0:
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
            calculate_entropy=self.cfg.calculate_entropy or self.cfg.entropy_coeff != 0,
        )
        info = {
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
        ``reference=True``, the base model), at ``cfg.temperature``. Collective under DP."""
        if not samples:
            return []
        padded, n = self._padded(samples)
        lp = self._infer_padded(padded, reference=reference)
        return [lp[i, : len(s.response_ids)].tolist() for i, s in enumerate(samples[:n])]

    # ------------------------------------------------------------------ export

    def _peft_model(self):
        module = self.worker.engine.module
        return getattr(module, "_fsdp_wrapped_module", module)

    def export(self, out_dir: Path) -> Path:
        """Write weights vLLM can load into ``out_dir`` (replaced if it exists); return it.

        LoRA: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for
        vLLM's ``/v1/load_lora_adapter``. Full fine-tuning: a complete HF model folder (config,
        safetensors, tokenizer files from ``model_path``) for vLLM's ``reload_weights``.
        Collective under DP: every rank must call it; rank 0 writes.
        """
        out_dir = Path(out_dir).resolve()
        writer = _rank() == 0
        tmp: Optional[Path] = None
        if writer:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            if self.is_lora:
                self._write_lora(tmp)
            else:
                self._write_full(tmp)
            if writer:
                os.chmod(tmp, 0o755)
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                os.replace(tmp, out_dir)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return out_dir

    def _write_lora(self, tmp: Optional[Path]) -> None:
        from safetensors.torch import save_file

        params, _ = self.worker.engine.get_per_tensor_param(base_sync_done=True)
        tensors = {}
        for name, tensor in params:
            # PEFT names, without the adapter-name segment vLLM and PEFT do not expect on disk.
            name = name.replace(".default.", ".")
            t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            tensors[name] = t.detach().to("cpu").contiguous()
        if tmp is None:
            return
        peft_config = _clean_peft_config(self._peft_model().peft_config["default"], self.cfg.model_path)
        peft_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    def _write_full(self, tmp: Optional[Path]) -> None:
        from transformers import AutoConfig

        src = Path(self.worker.model_config.local_path)
        hf_config = AutoConfig.from_pretrained(str(src), trust_remote_code=self.cfg.trust_remote_code)
        dtype = _config_dtype(hf_config)
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        params, _ = self.worker.engine.get_per_tensor_param()
        shards = _ShardWriter(tmp) if tmp is not None else None
        for name, tensor in params:
            t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if shards is None:
                continue
            if tied and name == "lm_head.weight":
                continue
            t = t.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(dtype)
            shards.add(name, t.contiguous())
        if shards is None:
            return
        shards.close()
        for f in sorted(src.iterdir()):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
                continue
            shutil.copy2(f, tmp / f.name)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, step: Optional[int] = None) -> Path:
        if not self.cfg.checkpoint_dir:
            raise ValueError("EngineConfig.checkpoint_dir is not set")
        return Path(self.cfg.checkpoint_dir) / f"global_step_{self.global_step if step is None else step}"

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint under ``cfg.checkpoint_dir`` (verl's tracker file), or None."""
        if not self.cfg.checkpoint_dir:
            return None
        tracker = Path(self.cfg.checkpoint_dir) / _LATEST_FILE
        if not tracker.is_file():
            return None
        path = self.checkpoint_path(int(tracker.read_text().strip()))
        return path if path.is_dir() else None

    def save_checkpoint(self, ckpt_dir: Optional[Path] = None) -> Path:
        """Save model + optimizer + LR scheduler + RNG state (verl's FSDP checkpoint manager).

        Without ``ckpt_dir`` it writes ``cfg.checkpoint_dir/global_step_<n>`` and updates verl's
        ``latest_checkpointed_iteration.txt`` there. Collective under DP.
        """
        use_tracker = ckpt_dir is None
        path = Path(ckpt_dir) if ckpt_dir is not None else self.checkpoint_path()
        path = path.resolve()
        self.worker.save_checkpoint(str(path), global_step=self.global_step)
        if _rank() == 0:
            state = {"global_step": self.global_step, "config": asdict(self.cfg)}
            (path / _ENGINE_STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
            if use_tracker:
                tracker = Path(self.cfg.checkpoint_dir) / _LATEST_FILE
                tmp = tracker.with_suffix(".tmp")
                tmp.write_text(str(self.global_step))
                os.replace(tmp, tracker)
                self._prune_checkpoints(keep=path)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return path

    def _prune_checkpoints(self, keep: Path) -> None:
        """Delete all but the newest ``cfg.keep_checkpoints`` global_step_* folders (also ones
        left by earlier processes); never the one just written."""
        n = self.cfg.keep_checkpoints
        if not n or n < 1:
            return
        steps = []
        for d in Path(self.cfg.checkpoint_dir).glob("global_step_*"):
            suffix = d.name[len("global_step_") :]
            if d.is_dir() and suffix.isdigit():
                steps.append((int(suffix), d))
        for _, d in sorted(steps)[:-n]:
            if d.resolve() != keep.resolve():
                shutil.rmtree(d, ignore_errors=True)

    def load_checkpoint(self, ckpt_dir: Optional[Path] = None) -> Optional[Path]:
        """Restore a checkpoint written by :meth:`save_checkpoint` (default: the latest one under
        ``cfg.checkpoint_dir``). Returns the path loaded, or None if there was none."""
        path = Path(ckpt_dir) if ckpt_dir is not None else self.latest_checkpoint()
        if path is None:
            return None
        path = path.resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path}")
        self.worker.load_checkpoint(str(path), del_local_after_load=False)
        state_file = path / _ENGINE_STATE_FILE
        if state_file.is_file():
            self.global_step = int(json.loads(state_file.read_text()).get("global_step", 0))
        return path

    # ------------------------------------------------------------------ introspection

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable-model state on CPU with HF/PEFT names; for tests and tools.
        Collective under DP."""
        out = {}
        for name, tensor in self.worker.engine.module.state_dict().items():
            t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            out[name] = t.detach().to("cpu").clone()
        return out


# ---------------------------------------------------------------------- helpers


def _flatten_metrics(raw: dict) -> dict[str, float]:
    """verl returns lists (one entry per mini-batch / micro-batch); report their mean."""
    out: dict[str, float] = {}
    for key, val in raw.items():
        if isinstance(val, (list, tuple)):
            vals = [_to_float(v) for v in val]
            vals = [v for v in vals if v is not None]
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


def _clean_peft_config(peft_config, base_model_path: str):
    """A copy of the live PEFT config fit for disk: leaf target-module names, inference mode,
    and the base model recorded."""
    import copy

    cfg = copy.deepcopy(peft_config)
    targets = cfg.target_modules
    if isinstance(targets, (set, list, tuple)):
        cfg.target_modules = sorted({t.split(".")[-1] for t in targets})
    cfg.base_model_name_or_path = str(Path(base_model_path).resolve()) if Path(base_model_path).exists() else (
        base_model_path
    )
    cfg.inference_mode = True
    return cfg


def _config_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class _ShardWriter:
    """Streams tensors into ``model-0000k-of-0000n.safetensors`` shards (HF layout)."""

    MAX_SHARD_BYTES = 5 * 1024**3

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.current and self.current_bytes + size > self.MAX_SHARD_BYTES:
            self._flush()
        self.current[name] = t
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.files[0][0], self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
