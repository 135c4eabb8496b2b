"""LightningRL credit assignment (rl/credit.py) against hand-computed returns. Plain Python."""

from __future__ import annotations

import random

import pytest

from trainwire.rl.credit import call_returns


def approx(values):
    return pytest.approx(values, abs=1e-12)


def test_final_reward_goes_to_every_call():
    assert call_returns([0, 0, 0], 1.0) == approx([1.0, 1.0, 1.0])


def test_gamma_one_adds_own_and_later_intermediates():
    # G2 = 0 + 1 = 1; G1 = -0.5 + G2 = 0.5; G0 = 0 + G1 = 0.5
    assert call_returns([0.0, -0.5, 0.0], 1.0) == approx([0.5, 0.5, 1.0])
    # a reward on the first call stays on the first call
    assert call_returns([0.3, 0.0], 1.0) == approx([1.3, 1.0])


def test_discount_hand_computed():
    # gamma = 0.5, r = [0.2, 0, -0.4], R = 1
    # G2 = -0.4 + 1 = 0.6; G1 = 0 + 0.5 * 0.6 = 0.3; G0 = 0.2 + 0.5 * 0.3 = 0.35
    assert call_returns([0.2, 0.0, -0.4], 1.0, gamma=0.5) == approx([0.35, 0.3, 0.6])
    # gamma = 0.9, four calls, final only: R * 0.9^(T-t)
    assert call_returns([0, 0, 0, 0], 2.0, gamma=0.9) == approx([2 * 0.729, 2 * 0.81, 2 * 0.9, 2.0])


def test_gamma_zero_keeps_rewards_on_their_call():
    assert call_returns([0.1, 0.2, 0.3], 1.0, gamma=0.0) == approx([0.1, 0.2, 1.3])


def test_closed_without_reward_uses_default():
    assert call_returns([0, 0], None, default_reward=0.25, gamma=0.9) == approx([0.225, 0.25])
    assert call_returns([0, -1.0], None) == approx([-1.0, -1.0])
    # an explicit 0.0 final reward is a reward, not "missing"
    assert call_returns([0], 0.0, default_reward=5.0) == approx([0.0])


def test_single_call_and_empty():
    assert call_returns([0.5], -1.0, gamma=0.3) == approx([-0.5])
    assert call_returns([], 1.0) == []


def test_matches_closed_form():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        r = [rng.choice([0.0, rng.uniform(-1, 1)]) for _ in range(n)]
        final = rng.uniform(-2, 2)
        gamma = rng.choice([0.0, 1.0, rng.random()])
        want = [sum(gamma ** (j - t) * r[j] for j in range(t, n)) + gamma ** (n - 1 - t) * final for t in range(n)]
        assert call_returns(r, final, gamma=gamma) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError):
        call_returns([0], 1.0, gamma=gamma)


def test_non_finite_rewards_rejected():
    with pytest.raises(ValueError):
        call_returns([0], float("nan"))
    with pytest.raises(ValueError):
        call_returns([float("inf")], 1.0)
