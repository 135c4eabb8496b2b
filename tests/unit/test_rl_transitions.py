"""Samples from claimed sessions (rl/transitions.py) against hand-built expectations: transition and
trajectory mode, masking of non-model tokens, chain breaks, skipped calls, staleness, weights, groups.
Plain Python: no torch, no database."""

from __future__ import annotations

import math

import pytest

from trainwire.rl.credit import call_returns
from trainwire.rl.samples import Sample
from trainwire.rl.transitions import build_samples
from trainwire.store.episodes import ClaimedCall, ClaimedSession

_n = 0


def call(prompt, completion, logprobs=None, *, version=0, status=200, reward=0.0, aborted=False, agent="a", cid=None):
    global _n
    _n += 1
    if logprobs is None and completion is not None:
        logprobs = [-0.1 * (i + 1) for i in range(len(completion))]
    return ClaimedCall(
        id=cid or f"c{_n}",
        seq=_n,
        agent_name=agent,
        policy_version=version,
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        logprobs=logprobs,
        finish_reason="stop",
        reward=reward,
        aborted=aborted,
        status_code=status,
    )


def session(calls, *, final=1.0, task="T", sid="s1"):
    return ClaimedSession(id=sid, task_id=task, final_reward=final, calls=list(calls))


def check_valid(result):
    for s in result.samples:
        s.validate()
    n = len(result.samples)
    assert len(result.scores) == len(result.group_ids) == len(result.session_ids) == len(result.call_ids) == n


def test_transition_mode_one_sample_per_call():
    c1 = call([1, 2, 3], [4, 5], [-0.5, -0.25], reward=0.5)
    c2 = call([1, 2, 3, 4, 5, 6], [7], [-1.0])
    res = build_samples([session([c1, c2], final=1.0)], mode="transition")
    check_valid(res)
    a, b = res.samples
    assert (a.prompt_ids, a.response_ids, a.response_mask, a.old_logprobs) == ([1, 2, 3], [4, 5], [1, 1], [-0.5, -0.25])
    assert (b.prompt_ids, b.response_ids, b.response_mask, b.old_logprobs) == ([1, 2, 3, 4, 5, 6], [7], [1], [-1.0])
    assert a.weight == b.weight == 0.5 and a.advantage == b.advantage == 0.0
    # gamma 1: G1 = 1, G0 = 0.5 + 1
    assert res.scores == pytest.approx([1.5, 1.0])
    assert res.group_ids == ["task:T", "task:T"]
    assert res.call_ids == [(c1.id,), (c2.id,)]
    assert res.counters["merged"] == 0 and res.counters["samples"] == 2


def test_trajectory_merges_and_masks_non_model_tokens():
    # call 1: [1 2 3] -> [4 5]; the agent appends a tool result [6 7]; call 2: [1..7] -> [8];
    # then a user turn [9]; call 3: [1..9] -> [10 11]
    c1 = call([1, 2, 3], [4, 5], [-0.1, -0.2])
    c2 = call([1, 2, 3, 4, 5, 6, 7], [8], [-0.3])
    c3 = call([1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [-0.4, -0.5], reward=-0.5)
    res = build_samples([session([c1, c2, c3], final=2.0)], mode="trajectory", gamma=0.5)
    check_valid(res)
    (s,) = res.samples
    assert s.prompt_ids == [1, 2, 3]
    assert s.response_ids == [4, 5, 6, 7, 8, 9, 10, 11]
    assert s.response_mask == [1, 1, 0, 0, 1, 0, 1, 1]
    assert s.old_logprobs == [-0.1, -0.2, 0.0, 0.0, -0.3, 0.0, -0.4, -0.5]
    assert s.weight == 1.0
    assert res.counters["merged"] == 2 and res.counters["chain_breaks"] == 0
    # score = return of the first call: G2 = -0.5 + 2 = 1.5; G1 = 0.5 * 1.5 = 0.75; G0 = 0.5 * 0.75
    assert res.scores == pytest.approx([0.375])
    assert res.call_ids == [(c1.id, c2.id, c3.id)]


def test_trajectory_prompt_equal_to_previous_sequence_has_no_masked_tokens():
    c1 = call([1, 2], [3], [-0.1])
    c2 = call([1, 2, 3], [4, 5], [-0.2, -0.3])
    (s,) = build_samples([session([c1, c2])], mode="trajectory").samples
    assert s.response_ids == [3, 4, 5] and s.response_mask == [1, 1, 1] and s.old_logprobs == [-0.1, -0.2, -0.3]


def test_trajectory_chain_break_starts_new_sample():
    # call 2's prompt re-renders call 1's completion differently ([4 5] -> [4 99]): no token-for-token prefix.
    c1 = call([1, 2, 3], [4, 5], [-0.1, -0.2])
    c2 = call([1, 2, 3, 4, 99, 6], [7], [-0.3], reward=0.25)
    c3 = call([1, 2, 3, 4, 99, 6, 7, 8], [9], [-0.4])
    res = build_samples([session([c1, c2, c3], final=1.0)], mode="trajectory")
    check_valid(res)
    a, b = res.samples
    assert (a.prompt_ids, a.response_ids, a.response_mask) == ([1, 2, 3], [4, 5], [1, 1])
    assert (b.prompt_ids, b.response_ids, b.response_mask) == ([1, 2, 3, 4, 99, 6], [7, 8, 9], [1, 0, 1])
    assert b.old_logprobs == [-0.3, 0.0, -0.4]
    assert a.weight == b.weight == 0.5
    assert res.counters["chain_breaks"] == 1 and res.counters["merged"] == 1
    # gamma 1: G = [1.25, 1.25, 1.0]; samples start at calls 0 and 1
    assert res.scores == pytest.approx([1.25, 1.25])
    assert res.call_ids == [(c1.id,), (c2.id, c3.id)]


def test_trajectory_prompt_shorter_than_previous_sequence_breaks():
    c1 = call([1, 2, 3], [4, 5])
    c2 = call([1, 2, 3, 4], [5])  # a prefix of call 1's sequence, not an extension of it
    assert len(build_samples([session([c1, c2])], mode="trajectory").samples) == 2


def test_trajectory_interleaved_agents_each_extend_their_own_chain():
    a1 = call([10, 11], [12], agent="planner")
    b1 = call([20, 21], [22], agent="coder")
    a2 = call([10, 11, 12, 13], [14], agent="planner")
    b2 = call([20, 21, 22, 23], [24], agent="coder")
    res = build_samples([session([a1, b1, a2, b2])], mode="trajectory")
    check_valid(res)
    assert [s.response_ids for s in res.samples] == [[12, 13, 14], [22, 23, 24]]
    assert [s.response_mask for s in res.samples] == [[1, 0, 1], [1, 0, 1]]
    assert res.call_ids == [(a1.id, a2.id), (b1.id, b2.id)]
    assert res.counters["merged"] == 2


def test_calls_without_token_data_are_skipped_and_counted_but_keep_their_credit():
    ok1 = call([1, 2], [3], [-0.1])
    err = call([1, 2, 3, 4], None, None, status=500, reward=-0.5)
    aborted_empty = call([1, 2, 3, 4], [], [], aborted=True)
    no_logprobs = call([1, 2, 3, 4], [5], None)
    no_logprobs = ClaimedCall(**{**no_logprobs.__dict__, "logprobs": None})
    short_logprobs = call([1, 2, 3, 4], [5, 6], [-0.1])
    nan_logprob = call([1, 2, 3, 4], [5], [float("nan")])
    aborted_partial = call([1, 2, 3, 4], [5, 6], [-0.6, -0.7], aborted=True)
    calls = [ok1, err, aborted_empty, no_logprobs, short_logprobs, nan_logprob, aborted_partial]
    res = build_samples([session(calls, final=1.0)], mode="transition")
    check_valid(res)
    assert res.counters["skipped_no_tokens"] == 3 and res.skipped_no_tokens == 3
    assert res.counters["skipped_bad_logprobs"] == 2
    assert [s.response_ids for s in res.samples] == [[3], [5, 6]]
    # the error's -0.5 still follows call 0: G = [0.5, 0.5, 1, 1, 1, 1, 1]
    assert res.scores == pytest.approx([0.5, 1.0])
    assert res.call_ids == [(ok1.id,), (aborted_partial.id,)]


def test_trajectory_merges_across_a_skipped_call():
    c1 = call([1, 2], [3], [-0.1])
    err = call([1, 2, 3, 4], None, None, status=502)
    c3 = call([1, 2, 3, 4], [5], [-0.2])
    (s,) = build_samples([session([c1, err, c3])], mode="trajectory").samples
    assert s.response_ids == [3, 4, 5] and s.response_mask == [1, 0, 1]


def test_session_without_usable_calls_is_skipped():
    empty = session([], sid="empty")
    broken = session([call([1], None, None, status=500)], sid="broken")
    fine = session([call([1], [2])], sid="fine")
    res = build_samples([empty, broken, fine])
    assert res.skipped_sessions == ["empty", "broken"]
    assert res.counters["skipped_empty"] == 2 and res.session_ids == ["fine"]


def test_staleness_drops_whole_sessions_and_counts():
    fresh = session([call([1], [2], version=6), call([1, 2, 3], [4], version=7)], sid="fresh")  # 6 >= 10 - 4
    stale = session([call([1], [2], version=5), call([1, 2, 3], [4], version=9)], sid="stale")  # 5 < 6
    unknown = session([call([1], [2], version=None)], sid="unknown")  # None counts as the base model (0)
    stale_but_unused = session(
        [call([1], None, None, version=1, status=500), call([1], [2], version=8)], sid="stale_unused"
    )  # the stale call would not be trained on
    res = build_samples([fresh, stale, unknown, stale_but_unused], current_version=10, max_staleness=4)
    check_valid(res)
    assert res.skipped_stale == 2 and res.counters["skipped_stale"] == 2
    assert res.skipped_sessions == ["stale", "unknown"]
    assert res.session_ids == ["fresh", "fresh", "stale_unused"]
    # staleness over the trained calls: 10-6, 10-7, 10-8
    assert res.staleness_mean == pytest.approx(3.0) and res.staleness_max == 4
    # trained sessions by the age of their oldest trained call: fresh 10-6, stale_unused 10-8
    assert res.staleness_hist == {4: 1, 2: 1}
    # disabled
    res = build_samples([fresh, stale, unknown], current_version=10, max_staleness=None)
    assert res.skipped_stale == 0 and len(res.samples) == 5


def test_episode_weights_sum_to_one_per_episode():
    short = session([call([1], [2])], sid="short")
    long = session([call([i], [i + 100]) for i in range(1, 5)], sid="long")
    res = build_samples([short, long], mode="transition")
    assert [s.weight for s in res.samples] == [1.0, 0.25, 0.25, 0.25, 0.25]
    per_episode = {}
    for sid, s in zip(res.session_ids, res.samples):
        per_episode[sid] = per_episode.get(sid, 0.0) + s.weight
    assert per_episode == {"short": pytest.approx(1.0), "long": pytest.approx(1.0)}


def test_group_ids():
    a = session([call([1], [2])], sid="a", task="t1")
    b = session([call([1], [2])], sid="b", task=None)
    assert build_samples([a, b], group_by_task=True).group_ids == ["task:t1", "session:b"]
    assert build_samples([a, b], group_by_task=False).group_ids == ["batch", "batch"]


def test_final_reward_default_and_gamma_in_scores():
    c = [call([1], [2]), call([1, 2, 3], [4], reward=0.5)]
    res = build_samples([session(c, final=None)], default_reward=-1.0, gamma=0.5)
    # G1 = 0.5 - 1 = -0.5; G0 = 0.5 * -0.5
    assert res.scores == pytest.approx([-0.25, -0.5])
    assert res.scores == pytest.approx(call_returns([0, 0.5], None, gamma=0.5, default_reward=-1.0))


def test_recorded_token_ids_are_used_verbatim():
    # Ids no tokenizer would produce from text round trips (out-of-vocab, repeated specials, 0): they come
    # through unchanged, and the samples own their lists (mutating one does not touch the recorded call).
    prompt = [151643, 0, 0, 2**31 - 1, 7]
    completion = [151645, 151645, 3]
    c = call(prompt, completion, [-0.01, -0.02, -0.03])
    for mode in ("transition", "trajectory"):
        (s,) = build_samples([session([c])], mode=mode).samples
        assert s.prompt_ids == prompt and s.response_ids == completion
        assert s.old_logprobs == [-0.01, -0.02, -0.03]
        s.prompt_ids.append(1)
        s.response_ids.append(1)
        assert c.prompt_token_ids == [151643, 0, 0, 2**31 - 1, 7] and c.completion_token_ids == [151645, 151645, 3]


def test_bad_mode():
    with pytest.raises(ValueError):
        build_samples([], mode="episodes")


def test_empty_batch():
    res = build_samples([])
    assert res.samples == [] and math.isnan(res.staleness_mean) and res.counters["sessions"] == 0


def test_built_samples_are_valid_engine_samples():
    res = build_samples([session([call([1, 2], [3, 4], [-0.5, -0.25])])])
    (s,) = res.samples
    assert type(s) is Sample
    s.validate()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("prompt_ids", [], "prompt_ids"),
        ("response_ids", [], "response_ids"),
        ("response_mask", [1], "same length"),
        ("old_logprobs", [-0.1], "same length"),
        ("advantage", float("nan"), "advantage"),
        ("weight", -1.0, "weight"),
        ("weight", float("inf"), "weight"),
        ("old_logprobs", [None, -0.2], "finite where response_mask is 1"),
        ("old_logprobs", [-0.1, float("-inf")], "finite where response_mask is 1"),
    ],
)
def test_sample_validate_rejects(field, value, match):
    good = dict(
        prompt_ids=[1], response_ids=[2, 3], response_mask=[1, 1], old_logprobs=[-0.1, -0.2], advantage=0.5, weight=1.0
    )
    Sample(**good).validate()
    with pytest.raises(ValueError, match=match):
        Sample(**{**good, field: value}).validate()


def test_sample_logprob_may_be_missing_where_not_trained():
    Sample([1], [2, 3], [1, 0], [-0.1, None], advantage=0.0, weight=0.0).validate()
