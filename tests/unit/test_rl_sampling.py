"""Sampling integrity on the trainer's side (rl/transitions.py): a call the proxy marked untrainable, or whose
recorded effective sampling settings are not the ones the trainer recomputes log-probs under, is skipped and
counted, and the session's other calls are still trained; rows without a sampling record are trusted. The
trainer's table is checked against the proxy's (proxy/sampling.py), and whatever the proxy lets through as
trainable the trainer accepts. Plain Python: no torch, no database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainwire.proxy import sampling as proxy_sampling
from trainwire.rl.transitions import TRAINED_SAMPLING, build_samples, sampling_mismatch
from trainwire.store.episodes import ClaimedCall, ClaimedSession

NEUTRAL = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
_n = 0


def record(**effective) -> dict:
    return {"requested": {}, "effective": {**NEUTRAL, **effective}}


def call(prompt=(1, 2), completion=(3, 4), *, sampling=None, untrainable=None, version=0) -> ClaimedCall:
    global _n
    _n += 1
    return ClaimedCall(
        id=f"c{_n}",
        seq=_n,
        agent_name="a",
        policy_version=version,
        prompt_token_ids=list(prompt),
        completion_token_ids=list(completion),
        logprobs=[-0.5] * len(completion),
        finish_reason="stop",
        reward=0.0,
        aborted=False,
        status_code=200,
        sampling=sampling,
        untrainable_reason=untrainable,
    )


def session(calls, sid="s1") -> ClaimedSession:
    return ClaimedSession(id=sid, task_id="T", final_reward=1.0, calls=list(calls))


def test_the_trainers_table_is_the_proxys():
    for t in (1.0, 0.7, 1.3):
        assert {"temperature": t, **TRAINED_SAMPLING} == proxy_sampling.neutral(t)


def test_an_untrainable_call_is_skipped_and_the_sessions_other_calls_are_kept():
    fine, marked, also_fine = (
        call(sampling=record()),
        call(sampling=record(top_p=0.5), untrainable="sampling: top_p 0.5 differs"),
        call(sampling=record()),
    )
    res = build_samples([session([fine, marked, also_fine])])
    assert res.call_ids == [(fine.id,), (also_fine.id,)]
    assert res.counters["skipped_untrainable"] == 1 and res.counters["skipped_sampling"] == 0
    assert res.skip_reasons == {"sampling: top_p 0.5 differs": 1}
    assert [s.weight for s in res.samples] == [0.5, 0.5]  # the episode's weight is shared by what is trained
    assert res.skipped_sessions == []


def test_untrainable_wins_over_everything_else():
    # token ids that disagree with usage: tokens look fine, the proxy says no
    (c,) = [call(untrainable="completion_token_ids (3) disagree with usage.completion_tokens (4)")]
    res = build_samples([session([c])])
    assert res.samples == [] and res.counters["skipped_untrainable"] == 1
    assert res.skipped_sessions == ["s1"] and res.counters["skipped_empty"] == 1


@pytest.mark.parametrize(
    "key,value",
    [
        ("temperature", 0.7),
        ("temperature", 1.01),
        ("top_p", 0.95),
        ("top_k", 50),
        ("top_k", 1),
        ("min_p", 0.05),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.2),
        ("repetition_penalty", 1.1),
    ],
)
def test_a_setting_other_than_the_trainers_is_skipped(key, value):
    odd, fine = call(sampling=record(**{key: value})), call(sampling=record())
    res = build_samples([session([odd, fine])])
    assert res.call_ids == [(fine.id,)]
    assert res.counters["skipped_sampling"] == 1
    (reason,) = res.skip_reasons
    assert reason.startswith(key)


def test_greedy_calls_never_enter_training():
    greedy = call(sampling=record(temperature=0))
    assert sampling_mismatch(greedy.sampling, 1.0) == "greedy decoding (temperature 0)"
    res = build_samples([session([greedy])], temperature=1.0)
    assert res.samples == [] and res.counters["skipped_sampling"] == 1
    assert res.skip_reasons == {"greedy decoding (temperature 0)": 1}


def test_the_trainers_temperature_is_what_the_calls_must_have():
    at_07, at_1 = call(sampling=record(temperature=0.7)), call(sampling=record(temperature=1.0))
    res = build_samples([session([at_07, at_1])], temperature=0.7)
    assert res.call_ids == [(at_07.id,)] and res.counters["skipped_sampling"] == 1
    res = build_samples([session([at_07, at_1], sid="s2")], temperature=1.0)
    assert res.call_ids == [(at_1.id,)]


@pytest.mark.parametrize("top_k", [0, -1, 0.0])
def test_top_k_off_is_zero_or_minus_one(top_k):
    assert sampling_mismatch(record(top_k=top_k), 1.0) is None


def test_rows_without_a_sampling_record_are_trusted():
    old = call(sampling=None)
    res = build_samples([session([old])])
    assert res.call_ids == [(old.id,)] and res.counters["skipped_sampling"] == 0


@pytest.mark.parametrize(
    "recorded",
    [
        {"requested": {"temperature": 1.0}},  # no effective settings (a route the proxy left alone)
        {"effective": {k: v for k, v in NEUTRAL.items() if k != "min_p"}},  # one setting not recorded
        {"effective": {**NEUTRAL, "temperature": "1.0"}},  # not a number
        {"effective": {**NEUTRAL, "top_p": True}},  # a bool is not a number here
        {"effective": {**NEUTRAL, "temperature": float("nan")}},
        {"effective": None},
        ["not", "an", "object"],
    ],
)
def test_a_record_that_does_not_say_every_setting_is_not_trusted(recorded):
    assert sampling_mismatch(recorded, 1.0) is not None
    res = build_samples([session([call(sampling=recorded)])])
    assert res.samples == [] and res.counters["skipped_sampling"] == 1


def test_near_equal_values_are_equal():
    assert sampling_mismatch(record(temperature=1.0 + 1e-9, top_p=1 - 1e-9), 1.0) is None
    assert sampling_mismatch(record(temperature=0.7000000001), 0.7) is None


def test_in_trajectory_mode_a_skipped_calls_tokens_become_context():
    c1 = call([1, 2], [3], sampling=record())
    c2 = call([1, 2, 3, 4], [5, 6], sampling=record(top_p=0.8))  # skipped
    c3 = call([1, 2, 3, 4, 5, 6, 7], [8], sampling=record())  # continues c1 through c2's tokens
    res = build_samples([session([c1, c2, c3])], mode="trajectory")
    (s,) = res.samples
    assert s.prompt_ids == [1, 2]
    assert s.response_ids == [3, 4, 5, 6, 7, 8]
    assert s.response_mask == [1, 0, 0, 0, 0, 1]  # c2's completion is context: never trained on
    assert res.call_ids == [(c1.id, c3.id)] and res.counters["skipped_sampling"] == 1


def test_samples_know_the_versions_that_served_them():
    a1, a2 = call([1], [2], version=3), call([1, 2, 9], [4], version=3)
    b = call([7], [8], version=2)
    res = build_samples([session([a1, a2]), session([b], sid="s2")], mode="trajectory", current_version=3)
    assert res.versions == [(3, 3), (2,)]
    assert res.served_by(3) == [True, False] and res.served_by(2) == [False, True]


# What the proxy sends upstream, recorded as calls.sampling, is what the trainer checks: under `enforce` every
# trainable call is one the trainer accepts; under `record` the trainer skips exactly what the proxy marked.
_values = st.one_of(st.none(), st.floats(min_value=-2, max_value=3, allow_nan=False), st.integers(-1, 100))
_bodies = st.dictionaries(st.sampled_from(list(NEUTRAL)), _values)


@given(body=_bodies, temperature=st.sampled_from([1.0, 0.7, 1.2]))
def test_what_the_proxy_enforces_the_trainer_accepts(body, temperature):
    outcome = proxy_sampling.apply(dict(body), policy="enforce", temperature=temperature)
    assert outcome.untrainable is None
    assert sampling_mismatch(outcome.record(), temperature) is None


@given(body=_bodies, temperature=st.sampled_from([1.0, 0.7]))
def test_what_the_proxy_records_untrainable_the_trainer_refuses_too(body, temperature):
    outcome = proxy_sampling.apply(dict(body), policy="record", temperature=temperature)
    assert (outcome.untrainable is None) == (sampling_mismatch(outcome.record(), temperature) is None)
