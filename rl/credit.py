"""LightningRL credit assignment: one return per LLM call of an episode.

Issue 4: "the episode's final reward is given to each of its calls; intermediate rewards (posted with
``call_id``, or from AIR) are added to their call; optional discount ``gamma`` makes each call's return
the discounted sum of what follows."

The formula
-----------
For an episode with calls ``0..T`` (in call order), ``r_t`` the sum of the intermediate rewards posted on
call ``t`` and ``R`` the final reward (``default_reward`` when the episode was closed without one), the
final reward sits on the last call and each call's return is the discounted sum of what follows it,
itself included::

    G_T = r_T + R
    G_t = r_t + gamma * G_{t+1}                         (t < T)

    i.e.  G_t = sum_{j=t..T} gamma^(j-t) * r_j  +  gamma^(T-t) * R

* ``gamma = 1`` (the default, no discount): every call gets the full final reward plus its own
  intermediate rewards plus those of every later call: ``G_t = R + sum_{j>=t} r_j``. With no intermediate
  rewards this is LightningRL's identical assignment (each call gets ``R``).
* ``gamma < 1``: the final reward reaches call ``t`` as ``gamma^(T-t) * R`` and a later call's intermediate
  reward reaches it discounted by its distance; a call's own intermediate reward always counts in full.
  Use it to keep an AIR penalty (invalid tool call, truncation) mostly on the call that earned it.
* ``gamma = 0``: each call gets only its own intermediate rewards; the last call also gets ``R``.

One formula for every ``gamma`` (no special case at 1), so the return changes continuously with gamma.
Calls are the ones the trainer loaded for the episode (trainable calls of the selected agents); a reward
posted on a call that is not among them is not part of the episode's credit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["call_returns"]


def call_returns(
    intermediate: Sequence[float], final_reward: float | None, *, gamma: float = 1.0, default_reward: float = 0.0
) -> list[float]:
    """Per-call returns ``G_t`` (see the module docstring) for one episode.

    ``intermediate[t]`` is the summed intermediate reward of call ``t`` (0 when none); ``final_reward`` is
    the episode's final reward, ``None`` when it was closed without one (``default_reward`` is used then).
    """
    if not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    final = default_reward if final_reward is None else float(final_reward)
    if not math.isfinite(final):
        raise ValueError(f"final reward must be finite, got {final}")
    returns = [0.0] * len(intermediate)
    following = final  # what the last call receives on top of its own reward
    for t in range(len(intermediate) - 1, -1, -1):
        r = float(intermediate[t] or 0.0)
        if not math.isfinite(r):
            raise ValueError(f"intermediate reward of call {t} must be finite, got {r}")
        returns[t] = r + following
        following = gamma * returns[t]
    return returns
