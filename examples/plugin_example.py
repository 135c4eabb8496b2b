"""A trainwire plugin: a policy loss, an advantage estimator and an automatic-reward rule of one's own.

    trainwire serve --plugin examples/plugin_example.py --air-empty-answer -1 ...
    trainwire train --plugin examples/plugin_example.py --policy-loss truncated_pg --adv-estimator group_sign ...
    torchrun --nproc-per-node 2 -m trainwire.cli train --plugin examples/plugin_example.py ...   (every rank)

`--plugin` takes a module name on the Python path or a `.py` file, and may be repeated. trainwire imports it
before it reads its registries (on every torchrun rank, in every `serve --workers N` process), so whatever it
registers is there by name: verl's `register_policy_loss` / `register_adv_est` for the trainer
(`--policy-loss`, `--adv-estimator`), trainwire's `@rule` for the proxy (its flag `--air-<name>` and variable
`TRAINWIRE_AIR_<NAME>` come with it). `loading_for(...)` keeps each side's imports to that side: the proxy never
imports verl or torch for the trainer's half.
"""

from __future__ import annotations

from trainwire.plugins import loading_for

if loading_for("train"):
    import numpy as np
    import torch
    from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss

    @register_policy_loss("truncated_pg")
    def truncated_pg(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Policy gradient with the importance ratio truncated at 2 (no lower clip): -A * min(ratio, 2)."""
        ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
        losses = -advantages * torch.clamp(ratio, max=2.0)
        if rollout_is_weights is not None:
            losses = losses * rollout_is_weights
        batch_info = getattr(config, "global_batch_info", None) or {}
        loss = agg_loss(loss_mat=losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
        truncated = ((ratio > 2.0).float() * response_mask).sum() / response_mask.sum().clamp(min=1)
        return loss, {"actor/ratio_truncated_frac": truncated.detach().item()}

    @register_adv_est("group_sign")
    def group_sign(
        token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray, config=None, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """+1 for a rollout scoring above its group's mean, -1 below, 0 at it (a rollout alone: its score's sign)."""
        scores = token_level_rewards.sum(dim=-1)
        groups: dict[object, list[int]] = {}
        for i, key in enumerate(index):
            groups.setdefault(key, []).append(i)
        advantages = torch.zeros_like(scores)
        for members in groups.values():
            group = scores[members]
            baseline = group.mean() if len(members) > 1 else torch.tensor(0.0)
            advantages[members] = torch.sign(group - baseline)
        advantages = advantages.unsqueeze(-1) * response_mask
        return advantages, advantages


if loading_for("serve"):
    from trainwire.proxy.air_rules import Finding, message, rule

    @rule("empty_answer", default=None, help="Reward for a chat answer with neither text nor tool calls, or 'off'")
    def empty_answer(air, rec) -> list[Finding]:
        """The model answered, completely, with nothing: no text and no tool call."""
        if rec.kind != "chat" or rec.status_code != 200 or rec.aborted:
            return []
        answer = message(rec)
        if (answer.get("content") or "").strip() or answer.get("tool_calls"):
            return []
        return [Finding(key="", call_id=rec.id, metadata={"finish_reason": rec.finish_reason})]
