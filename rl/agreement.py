"""Train-inference agreement: how far the trainer's log-probs of sampled tokens are from the ones vLLM recorded.

For samples served by the newest published version, the trainer's weights are the ones vLLM sampled with, so
before the update the two log-probs of every sampled token (``response_mask`` 1) should agree to numerical
noise. The trainer measures it on every step where such samples exist, with one forward pass over only those
samples (:meth:`Collective.train_step <trainwire.rl.collective.Collective.train_step>`), and reports
(``d = old - new``, old = vLLM's recorded log-prob, new = the trainer's):

* ``agreement/mean_abs_dlogp``: mean ``|d|`` over the tokens;
* ``agreement/max_abs_dlogp``: the largest ``|d|``;
* ``agreement/ppo_kl``: mean ``d``, the k1 estimate of KL(vLLM's policy || the trainer's), what verl's
  ``actor/ppo_kl`` is on the first mini-batch;
* ``agreement/kl_k3``: mean ``exp(-d) - 1 + d``, the k3 estimate of the same KL (never negative, lower variance);
* ``agreement/tokens``, ``agreement/samples``: what was measured.

A large mean |d| usually means weights that were published but are not what vLLM serves, a ``--temperature``
other than the proxy's, or vLLM without ``--logprobs-mode processed_logprobs`` (``--agreement-warn``).

A grossly wrong one (``--agreement-max``, default 0.5 nats) means the two sides are not the same model at all: a
PPO ratio of ``exp(d)`` is then noise, and training on it would only damage the policy. The step is refused
before the optimizer runs (:func:`refusal`), the batch's claims are given back and the trainer stops with one line
naming the usual causes. Measured here: a real model converted with only ``lm_head.weight`` for its tied embeddings
was served by vLLM with untrained embeddings while the trainer tied them, a mean of 3.19 nats (max 21).

Plain Python: the per-token numbers are a handful of floats per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from trainwire.rl.samples import Sample

__all__ = ["SUM_KEYS", "AgreementExceeded", "agreement_metrics", "agreement_sums", "refusal"]

# Summed over data-parallel ranks; "max" is reduced with max.
SUM_KEYS = ("abs", "diff", "k3", "tokens", "samples")


def agreement_sums(samples: Sequence[Sample], new_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """The sums the metrics are made of (so ranks can add theirs up): ``abs``, ``diff``, ``k3``, ``tokens``,
    ``samples`` and ``max``."""
    out = dict.fromkeys((*SUM_KEYS, "max"), 0.0)
    for sample, new in zip(samples, new_logprobs):
        for mask, old, lp in zip(sample.response_mask, sample.old_logprobs, new):
            if not mask or old is None:
                continue
            d = float(old) - float(lp)
            out["abs"] += abs(d)
            out["diff"] += d
            out["k3"] += math.exp(min(-d, 700.0)) - 1.0 + d
            out["max"] = max(out["max"], abs(d))
            out["tokens"] += 1
        out["samples"] += 1
    return out


def agreement_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The ``agreement/*`` metrics of :func:`agreement_sums`' (possibly rank-summed) output; {} for no tokens."""
    n = sums.get("tokens", 0.0)
    if not n:
        return {}
    return {
        "agreement/mean_abs_dlogp": sums["abs"] / n,
        "agreement/max_abs_dlogp": sums["max"],
        "agreement/ppo_kl": sums["diff"] / n,
        "agreement/kl_k3": sums["k3"] / n,
        "agreement/tokens": float(n),
        "agreement/samples": float(sums["samples"]),
    }


class AgreementExceeded(RuntimeError):
    """The step was refused: the trainer and vLLM disagree by more than ``--agreement-max`` (the message says so
    in one line)."""


LIKELY_CAUSES = (
    "tied embeddings saved as lm_head.weight only (vLLM then serves untrained embeddings; save "
    "model.embed_tokens.weight), a config field the trainer's and vLLM's transformers read differently (RoPE "
    "parameters, tie_word_embeddings, norm eps), a --temperature other than the one the calls were sampled at, or "
    "vLLM without --logprobs-mode processed_logprobs"
)


def refusal(metrics: dict[str, float], bound: float | None) -> str | None:
    """The one line that refuses a step whose mean |delta log p| is above ``bound`` (None: no bound, or no
    agreement measured; 0 or less: never refused)."""
    mean = metrics.get("agreement/mean_abs_dlogp")
    if bound is None or bound <= 0 or mean is None or not mean > bound:
        return None
    return (
        f"refused the step: the trainer's log-probs of {metrics['agreement/tokens']:.0f} sampled tokens differ "
        f"from vLLM's by {mean:.3f} nats on average (max {metrics['agreement/max_abs_dlogp']:.2f}), above "
        f"--agreement-max {bound:g}; the two are not the same model. Likely: {LIKELY_CAUSES}"
    )
