"""Trajectory samples merged by how the store keeps calls (rl/transitions.py, ``ClaimedCall.base_call_id`` and
``prompt_prefix_len``): the same samples as comparing every call's prompt with every sample, for sessions written
through the delta encoder (extensions, branches, retries, compactions, re-renders, interleaved agents, skipped
calls, bases the writer never saw), and merging work that grows linearly with the session instead of with its
square. Counted, not timed."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.unit.test_call_deltas import Sim, stored
from trainwire.records import CallRecord
from trainwire.rl.sft import build_sft_samples
from trainwire.rl.transitions import CallTokens, build_samples, chain_calls
from trainwire.store.call_deltas import encode_call
from trainwire.store.delta_expand import expand
from trainwire.store.episodes import ClaimedCall, ClaimedSession

GREEDY = {"effective": {"temperature": 0.0}}


class RetrySim(Sim):
    """`Sim`, and retries of an agent's last call that produced the same tokens, or those and more: a sample
    as long as the base's (the later one wins) or longer, both of which a later call continues."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.last: dict[str, CallRecord] = {}

    def call(self, op: str, agent: str, kind: str) -> CallRecord:
        prev = self.last.get(agent)
        if op not in ("retry", "say_more") or prev is None or prev.prompt_token_ids is None:
            record = super().call("extend" if op in ("retry", "say_more") else op, agent, kind)
            self.last[agent] = record
            return record
        self.n += 1
        completion = list(prev.completion_token_ids or []) + (self.tokens(2) if op == "say_more" else [])
        record = dataclasses.replace(
            prev, id=f"c{self.n}", completion_token_ids=completion, logprobs=[-0.5] * len(completion)
        )
        messages = self.convs[agent][1]
        self.convs[agent] = (list(prev.prompt_token_ids) + completion, messages)
        self.last[agent] = record
        return record


def claimed_session(ops, seed: int, committed_only: float) -> ClaimedSession:
    """A session's calls as the claim returns them: recorded by `RetrySim`, stored through the delta encoder (against
    a writer's cache that misses some calls), read back with their full prompts and their structure."""
    rng = random.Random(seed)
    sim = RetrySim(rng)
    records = [sim.call(op, agent, kind) for op, agent, kind in ops]
    cache: list = []
    rows = {}
    for r in records:
        written, mine = encode_call(cache[-3:], r)
        rows[r.id] = stored(written)
        if rng.random() > committed_only * 0.5:
            cache.append(mine)
    full = expand(rows, list(rows))
    calls = []
    for k, r in enumerate(records):
        completion = r.completion_token_ids
        calls.append(
            ClaimedCall(
                id=r.id,
                seq=k,
                agent_name=r.agent_name,
                policy_version=0,
                prompt_token_ids=full[r.id].prompt_token_ids,
                completion_token_ids=completion,
                finish_reason="stop",
                reward=rng.choice([0.0, 0.5]),
                aborted=False,
                logprobs=None if completion is None else [-rng.randrange(1, 9) / 8 for _ in completion],
                status_code=200,
                sampling=GREEDY if rng.random() < 0.1 else None,  # some skipped calls are bases
                base_call_id=rows[r.id].base_call_id,
                prompt_prefix_len=rows[r.id].prompt_prefix_len,
            )
        )
    return ClaimedSession(id="s", task_id="t", final_reward=1.0, calls=calls)


def whole(sess: ClaimedSession) -> ClaimedSession:
    """The same session as if every call had been stored whole."""
    return dataclasses.replace(
        sess, calls=[dataclasses.replace(c, base_call_id=None, prompt_prefix_len=None) for c in sess.calls]
    )


def tokens_of(sess: ClaimedSession) -> list[CallTokens]:
    return [
        CallTokens(
            i,
            c.id,
            0,
            list(c.prompt_token_ids or []),
            list(c.completion_token_ids or []),
            list(c.logprobs or []),
            base=c.base_call_id,
            prefix_len=c.prompt_prefix_len,
        )
        for i, c in enumerate(sess.calls)
        if c.prompt_token_ids and c.completion_token_ids
    ]


def same_result(a, b) -> None:
    assert a.samples == b.samples
    assert (a.scores, a.group_ids, a.session_ids, a.call_ids, a.versions) == (
        b.scores,
        b.group_ids,
        b.session_ids,
        b.call_ids,
        b.versions,
    )
    assert a.counters == b.counters and a.skip_reasons == b.skip_reasons


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["extend", "extend", "extend", "branch", "compact", "rerender", "retry", "say_more"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["chat", "messages", "responses"]),
        ),
        min_size=1,
        max_size=40,
    ),
    committed_only=st.floats(0, 1),
)
# A retry with the same tokens: the next call is stored against the first of the two, the later one's sample wins.
@example(seed=5, ops=[("extend", "a", "chat"), ("retry", "a", "chat"), ("extend", "a", "chat")], committed_only=0.0)
def test_merging_by_structure_gives_the_samples_of_comparing_prefixes(seed, ops, committed_only):
    sess = claimed_session(ops, seed, committed_only)
    flat = whole(sess)
    same_result(build_samples([sess], mode="trajectory"), build_samples([flat], mode="trajectory"))
    same_result(build_samples([sess], mode="transition"), build_samples([flat], mode="transition"))
    same_result(build_sft_samples([sess], mode="trajectory"), build_sft_samples([flat], mode="trajectory"))
    # Every call, skipped or not, in chains: the same chains both ways, and a call merged by its structure never
    # costs a comparison of the prefix it shares.
    work: dict[str, int] = {}
    a, b = chain_calls(tokens_of(sess), "trajectory", {}, work), chain_calls(tokens_of(flat), "trajectory", {})
    assert [(c.prompt, c.response, c.mask, c.logprobs, c.calls) for c in a] == [
        (c.prompt, c.response, c.mask, c.logprobs, c.calls) for c in b
    ]


def test_the_structure_is_used_where_the_store_kept_it():
    """Over a few recorded sessions (a vocabulary of 8 tokens, so accidental rivals abound, and calls without
    tokens whose successors have no base to merge on): more merges go by structure than by comparison."""
    totals: dict[str, int] = {}
    rng = random.Random(7)
    for seed in range(30):
        ops = [(rng.choice(["extend"] * 5 + ["branch", "compact"]), rng.choice("ab"), "chat") for _ in range(20)]
        sess = claimed_session(ops, seed, 0.0)
        work: dict[str, int] = {}
        chain_calls(tokens_of(sess), "trajectory", {}, work)
        for k, v in work.items():
            totals[k] = totals.get(k, 0) + v
    assert totals["by_structure"] > totals.get("by_comparison", 0) > 0


# --- hand-built cases the structure alone would get wrong ----------------------------------------------------


def ct(cid, prompt, completion, base=None, prefix_len=None, recorded=True):
    return CallTokens(
        0, cid, 0, prompt, completion, [-0.5] * len(completion), base=base, prefix_len=prefix_len, recorded=recorded
    )


def test_a_later_sample_with_the_same_sequence_wins_as_in_the_comparison():
    # a and its retry a2 made the same tokens; c is stored against a, but a2's sample is the later of two equal ones
    a, a2 = ct("a", [1, 2], [3]), ct("a2", [1, 2], [3])
    c = ct("c", [1, 2, 3, 4], [5], base="a", prefix_len=3)
    chains = chain_calls([a, a2, c], "trajectory", {})
    assert [x.calls for x in chains] == [["a"], ["a2", "c"]]
    assert [x.calls for x in chain_calls([a, a2, dataclasses.replace(c, base=None)], "trajectory", {})] == [
        ["a"],
        ["a2", "c"],
    ]


def test_a_longer_sample_the_prompt_continues_wins_over_the_base():
    a = ct("a", [1, 2], [3])
    longer = ct("l", [1, 2], [3, 4, 5])  # a retry of a's turn that said more
    c = ct("c", [1, 2, 3, 4, 5, 6], [7], base="a", prefix_len=3)
    assert [x.calls for x in chain_calls([a, longer, c], "trajectory", {})] == [["a"], ["l", "c"]]


def test_a_base_that_no_longer_ends_its_sample_is_compared():
    a = ct("a", [1], [2])
    b = ct("b", [1, 2, 3], [4], base="a", prefix_len=2)
    c = ct("c", [1, 2, 9], [5], base="a", prefix_len=2)  # a retry of b's turn: a is inside a sample now
    work: dict[str, int] = {}
    chains = chain_calls([a, b, c], "trajectory", {}, work)
    assert [x.calls for x in chains] == [["a", "b"], ["c"]]
    assert work["by_structure"] == 1 and "by_comparison" not in work  # c merged nowhere


def test_a_call_stored_on_a_re_rendered_call_is_compared():
    # SFT renders a teacher's call itself: its tokens are not those its stored successor starts with
    teacher = ct("t", [1, 2], [3], recorded=False)
    own = ct("o", [1, 2, 8, 9], [4], base="t", prefix_len=3)
    assert [x.calls for x in chain_calls([teacher, own], "trajectory", {})] == [["t"], ["o"]]


# --- work grows with the session, not with its square --------------------------------------------------------


def agent_session(
    n_calls: int, agents: int = 2, system: int = 200, completion: int = 20, tool: int = 30, structure: bool = True
) -> list[CallTokens]:
    """`agents` interleaved conversations of n_calls in all, each call extending its agent's previous one."""
    seqs: dict[int, list[int]] = {}
    last: dict[int, str] = {}
    out = []
    for k in range(n_calls):
        a = k % agents
        base = 10_000 * (a + 1)
        seq = seqs.get(a) or list(range(base, base + system))
        prefix = len(seq) if a in seqs else None
        prompt = seq + [base + 1000 + (k + j) % 997 for j in range(tool)] if a in seqs else seq
        done = [base + 5000 + (k + j) % 991 for j in range(completion)]
        out.append(
            CallTokens(
                k,
                f"c{k}",
                0,
                prompt,
                done,
                [-0.5] * completion,
                base=last.get(a) if structure else None,
                prefix_len=prefix if structure else None,
            )
        )
        seqs[a], last[a] = prompt + done, f"c{k}"
    return out


def merge_work(n_calls: int, structure: bool) -> dict[str, int]:
    work: dict[str, int] = {}
    counters: dict[str, int] = {}
    chains = chain_calls(agent_session(n_calls, structure=structure), "trajectory", counters, work)
    assert len(chains) == 2 and counters["merged"] == n_calls - 2
    return work


def test_merging_by_structure_is_linear_in_the_session_tokens():
    by = {n: merge_work(n, True) for n in (32, 64, 128)}
    cmp = {n: merge_work(n, False) for n in (32, 64, 128)}
    for n in by:
        assert by[n]["by_structure"] == n - 2 and by[n].get("compared_tokens", 0) == 0
        assert cmp[n]["by_comparison"] == n - 2
        # the same tokens appended either way: what each call adds
        assert by[n]["appended_tokens"] == cmp[n]["appended_tokens"] == (n - 2) * 50
    for small, big in ((32, 64), (64, 128)):
        assert by[big]["appended_tokens"] + by[big].get("compared_tokens", 0) <= 2.1 * (
            by[small]["appended_tokens"] + by[small].get("compared_tokens", 0)
        )
        # comparing prefixes: every call compares its chain's whole sequence, quadratic in the calls
        assert cmp[big]["compared_tokens"] >= 3.5 * cmp[small]["compared_tokens"]
    # 128 calls: 6,300 tokens appended, none compared; comparing prefixes compares 223,020 tokens on top
    assert cmp[128]["compared_tokens"] > 30 * by[128]["appended_tokens"]
