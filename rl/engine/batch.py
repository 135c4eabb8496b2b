"""Samples into the tensors verl's engine consumes.

Data flow of one :meth:`PolicyEngine.step <trainwire.rl.engine.PolicyEngine.step>`::

    list[Sample] --(padded_ppo_tensors)--> padded PPO batch in verl's trainer layout
        prompts (left-padded) | responses (right-padded) | input_ids | attention_mask |
        position_ids | response_mask | old_log_probs | advantages | [rollout_is_weights] |
        [ref_log_prob] + non-tensor temperature
      --(to_no_padding: left_right_2_no_padding)--> no-padding (nested) layout the engine consumes
      + non-tensor keys train_mini_batch reads (global_batch_size, mini_batch_size, epochs, seed,
        dataloader_kwargs, compute_loss, calculate_entropy)
      --> TrainingWorker.train_mini_batch  (forward, ppo_loss, backward, clip, AdamW step)
      --> flat dict of float metrics

Per-sample loss weights (``Sample.weight``) travel as verl's ``rollout_is_weights``: every
registered policy loss except ``bypass_mode`` multiplies the per-token policy-gradient loss by it
before aggregation (``geo_mean`` folds it in geometrically, which for a per-sequence constant is
the same multiplier). KL and entropy terms are not weighted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainwire.rl import cpu_platform
from trainwire.rl.samples import Sample

__all__ = ["padded_ppo_tensors", "to_no_padding"]


def padded_ppo_tensors(
    samples: Sequence[Sample], pad_token_id: int, with_weights: bool, with_proximal: bool = False
) -> dict[str, torch.Tensor]:
    """verl's PPO-trainer layout: prompts left-padded, responses right-padded, masks, position
    ids, behaviour log-probs (zeroed under mask 0), broadcast advantages, optional weights; with
    ``with_proximal`` also ``proximal_log_probs`` (not a verl key: the caller turns it into the correction of
    :mod:`trainwire.rl.offpolicy` and removes it; a sample without them counts as on-policy)."""
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
    proximal = torch.zeros((bsz, R), dtype=torch.float32)
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
        if s.proximal_logprobs is None:
            proximal[i, :r] = old_log_probs[i, :r]
        else:
            plp = torch.tensor([float(lp) if lp is not None else 0.0 for lp in s.proximal_logprobs])
            proximal[i, :r] = torch.where(mask.bool(), plp, torch.zeros_like(plp))
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
    if with_proximal:
        out["proximal_log_probs"] = proximal
    return out


def to_no_padding(tensors: dict[str, torch.Tensor], temperature: float, **non_tensor):
    """Padded tensors -> the no-padding TensorDict verl's engines consume, plus non-tensor keys.
    Build a fresh one per worker call: ``train_mini_batch`` pops some of the keys."""
    cpu_platform.activate()
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = tu.get_tensordict(dict(tensors), non_tensor_dict={"temperature": float(temperature)})
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, **non_tensor)
    return td
