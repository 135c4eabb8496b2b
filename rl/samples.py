"""The unit of training data: one trajectory, as token ids with per-token masks and behaviour log-probs.

Plain Python (no torch, no verl), so building samples from the store (:mod:`trainwire.rl.transitions`) does not
load the training stack; :mod:`trainwire.rl.engine` turns lists of them into verl's tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["Sample"]


@dataclass
class Sample:
    """One trajectory to train on.

    ``response_ids`` are the tokens after the prompt; ``response_mask[i]`` is 1 for tokens the
    model generated (trained on) and 0 for tokens it did not (tool output inside a merged
    multi-turn trajectory). ``old_logprobs[i]`` is the behaviour log-prob vLLM recorded for
    ``response_ids[i]`` (ignored where the mask is 0; ``None`` allowed there). ``advantage`` is
    broadcast over the response tokens; ``weight`` multiplies this sample's policy loss.
    ``proximal_logprobs``, when set, are the trainer's own log-probs of the response before the update (the
    proximal policy of off-policy correction, :mod:`trainwire.rl.offpolicy`).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    old_logprobs: list[Optional[float]]
    advantage: float
    weight: float = 1.0
    proximal_logprobs: Optional[list[Optional[float]]] = None

    def validate(self) -> None:
        n = len(self.response_ids)
        if not self.prompt_ids:
            raise ValueError("Sample.prompt_ids must not be empty")
        if n == 0:
            raise ValueError("Sample.response_ids must not be empty")
        if len(self.response_mask) != n or len(self.old_logprobs) != n:
            raise ValueError(
                f"response_ids ({n}), response_mask ({len(self.response_mask)}) and old_logprobs "
                f"({len(self.old_logprobs)}) must have the same length"
            )
        if self.proximal_logprobs is not None and len(self.proximal_logprobs) != n:
            raise ValueError(f"proximal_logprobs ({len(self.proximal_logprobs)}) must have {n} entries")
        if not math.isfinite(self.advantage):
            raise ValueError(f"advantage must be finite, got {self.advantage}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {self.weight}")
        for m, lp in zip(self.response_mask, self.old_logprobs):
            if m and (lp is None or not math.isfinite(lp)):
                raise ValueError("old_logprobs must be finite where response_mask is 1")
