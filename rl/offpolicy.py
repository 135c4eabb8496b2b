"""Off-policy correction (``trainwire train --off-policy drop|tis|decoupled``, ``--is-cap``).

Agents keep sampling while the trainer steps, so a session's tokens were sampled by a *behaviour* policy (the
version vLLM served, whose log-probs the proxy recorded) that may be several versions behind the weights being
trained. Three ways to train on them:

* ``drop``: sessions served more than ``--max-staleness`` versions ago are skipped; the PPO ratio is taken
  against the behaviour log-probs as if they were on-policy.
* ``tis`` (truncated importance sampling, verl's rollout correction as Agent Lightning uses it): the PPO ratio
  against the behaviour log-probs, each token weighted by ``min(pi_proximal / pi_behaviour, cap)``.
* ``decoupled`` (decoupled PPO, AReaL): the PPO ratio clipped against the *proximal* log-probs (the trainer's
  weights before this update, one forward pass), each token weighted by ``min(pi_proximal / pi_behaviour, cap)``.
  The trust region is around the weights being updated, not around a policy several steps old, so stale tokens
  still move the policy, and the weight corrects for their having been sampled by another policy.

``--max-staleness`` stays the hard bound in every mode. The truncated weights are verl's
(:func:`verl.trainer.ppo.rollout_corr_helper.compute_rollout_correction_weights`, token level); they travel to
verl's policy loss as ``rollout_is_weights``, multiplied with the per-episode loss weight (``Sample.weight``),
and the loss itself is verl's (``ppo_loss`` with the configured policy loss).

A sample served entirely by the weights the trainer holds is on-policy: its proximal log-probs *are* its
behaviour log-probs (the agreement pass measures the numerical difference, :mod:`trainwire.rl.agreement`), so the
trainer uses the recorded ones (:func:`with_proximal`) and a batch served by the current version trains exactly as
``drop`` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from trainwire.rl.samples import Sample

if TYPE_CHECKING:
    import torch

__all__ = ["MODES", "correct", "needs_proximal", "with_proximal"]

MODES = ("drop", "tis", "decoupled")


def needs_proximal(mode: str) -> bool:
    """Whether the step needs the proximal log-probs (a forward pass before the update)."""
    if mode not in MODES:
        raise ValueError(f"off_policy must be one of {', '.join(MODES)}, got {mode!r}")
    return mode != "drop"


def with_proximal(
    samples: Sequence[Sample], logprobs: Sequence[Sequence[float]], on_policy: Sequence[bool]
) -> list[Sample]:
    """The samples with their proximal log-probs: the trainer's (``logprobs``), or, for a sample marked
    ``on_policy`` (served by the weights the trainer holds), its recorded behaviour log-probs."""
    out = []
    for s, lps, same in zip(samples, logprobs, on_policy):
        proximal: list[float | None] = list(s.old_logprobs) if same else [float(x) for x in lps]
        out.append(replace(s, proximal_logprobs=proximal))
    return out


def correct(
    mode: str,
    behaviour: torch.Tensor,
    proximal: torch.Tensor,
    response_mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(old_log_probs, is_weights, metrics)`` for verl's policy loss, padded ``(bsz, response_len)`` tensors in.

    ``old_log_probs`` is what the PPO ratio is taken against (behaviour for ``tis``, proximal for ``decoupled``);
    ``is_weights`` = ``min(exp(proximal - behaviour), cap)`` per token (0 under mask 0). Metrics:
    ``offpolicy/is_mean`` and ``offpolicy/is_max`` of the applied (truncated) weights, ``offpolicy/is_raw_max``
    before truncation, ``offpolicy/truncated_share`` (tokens whose weight was cut to ``cap``) and
    ``offpolicy/tokens``."""
    import torch
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    if mode not in ("tis", "decoupled"):
        raise ValueError(f"no correction for off_policy {mode!r}")
    mask = response_mask.to(behaviour.dtype)
    log_ratio = (proximal - behaviour) * mask
    if not bool(response_mask.bool().any()):  # a data-parallel rank holding only padding
        return behaviour, torch.zeros_like(behaviour), {}
    weights, verl_metrics = compute_rollout_correction_weights(
        log_ratio=log_ratio, response_mask=mask, rollout_is="token", rollout_is_threshold=float(cap)
    )
    valid = response_mask.bool()
    metrics = {
        "offpolicy/is_mean": float(verl_metrics["rollout_is_mean"]),
        "offpolicy/is_max": float(verl_metrics["rollout_is_max"]),
        "offpolicy/is_raw_max": float(log_ratio[valid].max().exp()),
        "offpolicy/truncated_share": float(verl_metrics["rollout_is_ratio_fraction_high"]),
        "offpolicy/tokens": float(valid.sum()),
    }
    old = proximal if mode == "decoupled" else behaviour
    return old * mask, weights, metrics
