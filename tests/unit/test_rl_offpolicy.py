"""--off-policy's plain parts (rl/offpolicy.py, the trainer's console line): which modes need the proximal pass,
which log-probs a sample gets as proximal, and what a step says about staleness and the importance weights. The
losses themselves are checked against a hand computation on the real engine (tests/test_engine.py)."""

from __future__ import annotations

import pytest

from trainwire.rl.offpolicy import needs_proximal, with_proximal
from trainwire.rl.samples import Sample
from trainwire.rl.worker import _offpolicy_line


def test_modes():
    assert [needs_proximal(m) for m in ("drop", "tis", "decoupled")] == [False, True, True]
    with pytest.raises(ValueError, match="drop, tis, decoupled"):
        needs_proximal("ppo")


def test_on_policy_samples_keep_their_recorded_logprobs_as_proximal():
    a = Sample([1], [5, 6, 7], [1, 0, 1], [-1.0, None, -2.0], advantage=1.0)
    b = Sample([1], [8], [1], [-3.0], advantage=-1.0, weight=0.5)
    out = with_proximal([a, b], [[-1.1, -9.0, -2.2], [-3.3]], [True, False])
    assert out[0].proximal_logprobs == [-1.0, None, -2.0] and out[1].proximal_logprobs == [-3.3]
    assert (out[1].weight, out[1].old_logprobs) == (0.5, [-3.0])  # nothing else changes
    assert a.proximal_logprobs is None  # the inputs are left as they were
    with pytest.raises(ValueError, match="proximal_logprobs"):
        Sample([1], [5], [1], [-1.0], advantage=0.0, proximal_logprobs=[-1.0, -2.0]).validate()


def test_the_console_line():
    metrics = {"sessions/trained": 30.0, "sessions/dropped_stale": 2.0}
    assert _offpolicy_line(metrics, {2: 4, 0: 12, 1: 14}) == "trained 30 dropped 2 | staleness 0:12 1:14 2:4 | "
    metrics.update({"offpolicy/is_mean": 0.9812, "offpolicy/is_max": 2.0, "offpolicy/truncated_share": 0.0123})
    assert _offpolicy_line(metrics, {}).endswith("staleness - | IS mean 0.981 max 2.00 truncated 1.2% | ")
