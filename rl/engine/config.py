"""``EngineConfig``, the engine's settings, and their translation into verl's configuration objects.

verl's defaults assume a GPU; the translation picks per device (:func:`_on_cuda`) where a GPU default does not
run on CPU, so one config works on both. The verl objects are built here and nowhere else, for the in-process
engine and for a Ray worker group alike (see :mod:`trainwire.rl.engine`).

Behaviour log-probs from vLLM: vLLM returns *raw* log-probs (before temperature) unless it runs
with ``logprobs_mode=processed_logprobs``; set ``EngineConfig.temperature`` to match what the
recorded ``old_logprobs`` mean (1.0 for raw log-probs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

from trainwire.rl import cpu_platform

__all__ = [
    "OBJECTIVES",
    "EngineConfig",
    "actor_config",
    "freezes_embeddings",
    "loss_fn",
    "policy_loss_fn",
    "training_worker_config",
]

# Losses whose rollout_is_weights argument is not a plain per-token multiplier.
LOSSES_IGNORING_WEIGHTS = {"bypass_mode"}
OBJECTIVES = ("rl", "sft")


@dataclass
class EngineConfig:
    model_path: str
    # LoRA: rank 0 = full fine-tuning.
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_target_modules: Any = "all-linear"
    # Full fine-tuning: keep the input embeddings (and an output layer tied to them) as they are. See
    # trainwire.settings.TrainerSettings.freeze_embeddings for when and why.
    freeze_embeddings: bool = False
    # Optimiser (AdamW, constant LR after warm-up).
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_warmup_steps: int = 0
    # What a step optimises: "rl" (verl's ppo_loss with the policy loss below) or "sft" (verl's sft_loss: the mean
    # negative log-likelihood of the response tokens with mask 1; advantages, old log-probs and weights unused).
    objective: str = "rl"
    # Loss: a name from verl's policy-loss registry and one of verl's aggregation modes.
    policy_loss: str = "vanilla"
    # Extra fields of verl's PolicyLossConfig for the chosen loss (e.g. {"dro_beta": 0.1}).
    policy_loss_options: dict = field(default_factory=dict)
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages (vanilla)
    # Off-policy correction (rl/offpolicy.py): "drop" (none), "tis" or "decoupled"; the last two need each
    # sample's proximal_logprobs and weight tokens by min(pi_proximal / pi_behaviour, is_cap).
    off_policy: str = "drop"
    is_cap: float = 2.0
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
        from trainwire.rl.offpolicy import needs_proximal

        if needs_proximal(self.off_policy) and self.policy_loss in LOSSES_IGNORING_WEIGHTS:
            raise ValueError(
                f"off_policy {self.off_policy!r} weights tokens; policy_loss {self.policy_loss!r} ignores that"
            )
        if self.is_cap <= 0:
            raise ValueError("is_cap must be > 0")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        from trainwire.rl.advantages import policy_loss_names

        names = policy_loss_names()
        if self.policy_loss not in names:
            raise ValueError(f"unknown policy_loss {self.policy_loss!r}; verl has: {', '.join(names)}")

    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0


def freezes_embeddings(choice: str, model_path: str) -> bool:
    """``--freeze-embeddings``: ``on``, ``off``, or ``auto`` (on when the model ties its output layer to them)."""
    if choice != "auto":
        return choice == "on"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return bool(getattr(config, "tie_word_embeddings", False))


def _on_cuda() -> bool:
    return cpu_platform.cuda_available()


def _param_dtype(cfg: EngineConfig) -> str:
    if cfg.param_dtype:
        return cfg.param_dtype
    return "bf16" if _on_cuda() else "fp32"


def training_worker_config(cfg: EngineConfig, reference: bool = False):
    """The verl ``TrainingWorkerConfig`` for the policy (or, with ``reference``, for a frozen
    copy of the base model). Usable for an in-process worker and for a Ray worker group."""
    cpu_platform.activate()
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
    cpu_platform.activate()
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
    cpu_platform.activate()
    from verl.workers.utils.losses import ppo_loss

    return functools.partial(ppo_loss, config=actor_config(cfg))


def loss_fn(cfg: EngineConfig):
    """The loss of ``cfg.objective``: :func:`policy_loss_fn` for RL, verl's ``sft_loss`` for SFT (it reads the
    batch's ``loss_mask``, which :meth:`PolicyEngine.build_train_batch` sets to the response mask over the whole
    sequence)."""
    if cfg.objective == "rl":
        return policy_loss_fn(cfg)
    cpu_platform.activate()
    from verl.workers.utils.losses import sft_loss

    return functools.partial(sft_loss, config=actor_config(cfg))
