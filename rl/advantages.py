"""Rollout-level advantages and loss-name validation, straight from verl's registries.

``compute_advantages`` feeds verl's outcome-advantage estimators
(``verl.trainer.ppo.core_algos.get_adv_estimator_fn``) the way verl's PPO trainer does, with one
twist: our samples are whole rollouts with one scalar score each, and the engine broadcasts one
advantage over a rollout's response tokens. So each rollout is presented to the estimator as a
one-token response carrying its score on that (last) token, with ``index`` = the group ids. For
the group estimators (grpo, rloo, ...) that is exactly verl's computation, since they only look at
the per-sequence score sum; for token-level whitening estimators (reinforce_plus_plus) it makes
the whitening statistics per rollout rather than per token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

__all__ = ["advantage_estimator_names", "compute_advantages", "policy_loss_names"]


def policy_loss_names() -> list[str]:
    """Names in verl's policy-loss registry (valid ``EngineConfig.policy_loss`` values)."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    return sorted(POLICY_LOSS_REGISTRY)


def advantage_estimator_names() -> list[str]:
    """Names in verl's advantage-estimator registry."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

    return sorted(ADV_ESTIMATOR_REGISTRY)


# Estimators that need more than one score per rollout (critic values, per-token statistics,
# reward baselines, per-dimension rewards): they cannot work on rollout-level scores alone.
_UNSUPPORTED = {
    "gae": "needs critic values",
    "remax": "needs greedy-rollout reward baselines",
    "optimal_token_baseline": "needs per-token sum_pi_squared from the actor",
    "tir_optimal_token_baseline": "needs per-token sum_pi_squared from the actor",
    "gdpo": "needs per-dimension rewards",
}


def compute_advantages(
    scores: Sequence[float],
    group_ids: Sequence[str],
    estimator: str = "grpo",
    **kw: Any,
) -> list[float]:
    """One advantage per rollout from verl's estimator ``estimator``.

    ``scores[i]`` is rollout i's scalar reward and ``group_ids[i]`` its group (rollouts of the
    same task/prompt compared with each other). Extra keyword arguments go to the estimator
    (``epsilon``, ``norm_adv_by_std_in_grpo``, ...) or, for fields of verl's ``AlgoConfig``
    (``gamma``, ``lam``, ...), into the config object some estimators read.
    """
    import numpy as np
    import torch
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_adv_estimator_fn

    if len(scores) != len(group_ids):
        raise ValueError(f"{len(scores)} scores but {len(group_ids)} group ids")
    if estimator not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; verl's registry has: "
            f"{', '.join(sorted(ADV_ESTIMATOR_REGISTRY))}"
        )
    if estimator in _UNSUPPORTED:
        raise ValueError(
            f"advantage estimator {estimator!r} {_UNSUPPORTED[estimator]}; it cannot run on one score per rollout"
        )
    if not scores:
        return []

    fn = get_adv_estimator_fn(estimator)
    params = inspect.signature(fn).parameters
    algo_fields = set(AlgoConfig.__dataclass_fields__)
    config_kw = {k: v for k, v in kw.items() if k in algo_fields and k not in params}
    fn_kw = {k: v for k, v in kw.items() if k not in config_kw}
    unknown = [
        k
        for k in fn_kw
        if k not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    ]
    if unknown:
        raise TypeError(f"estimator {estimator!r} takes no argument(s) {unknown}")

    n = len(scores)
    rewards = torch.tensor([float(s) for s in scores], dtype=torch.float32).unsqueeze(-1)  # (n, 1)
    mask = torch.ones((n, 1), dtype=torch.float32)
    call: dict[str, Any] = {"token_level_rewards": rewards, "response_mask": mask}
    if "index" in params:
        call["index"] = np.array([str(g) for g in group_ids], dtype=object)
    if "config" in params:
        call["config"] = AlgoConfig(adv_estimator=estimator, **config_kw)
    call.update(fn_kw)
    advantages, _returns = fn(**call)
    return [float(a) for a in advantages[:, -1].tolist()]
