"""Calls stored as what they add to their session (store/call_deltas.py): hand-built cases, and a property test
over sessions with extensions, branches, compactions, tool turns and interleaved agents, where every call rebuilt
from the stored rows equals the call as it was recorded, read all at once or one at a time."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainwire.records import CallRecord, as_row
from trainwire.store.call_deltas import MissingBase, encode, encode_call, remember
from trainwire.store.delta_expand import Stored, expand

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def rec(cid: str, prompt, completion, messages, kind="chat", **kw) -> CallRecord:
    key = "input" if kind == "responses" else "messages"
    request = {"model": "policy", key: messages, "tools": [{"type": "function", "function": {"name": "f"}}]}
    return CallRecord(
        id=cid,
        session_id="s",
        seq=0,
        kind=kind,
        path="/v1/chat/completions",
        status_code=200,
        started_at=NOW,
        finished_at=NOW,
        request=request,
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        logprobs=[-0.5] * len(completion or []),
        **kw,
    )


def stored(record: CallRecord) -> Stored:
    """A stored row as a database hands it back: through JSON, keys sorted (as Postgres jsonb reorders them)."""
    row = orjson.loads(orjson.dumps(as_row(record), option=orjson.OPT_SORT_KEYS))
    return Stored.of(row)


def test_an_extension_stores_only_the_new_tokens_and_messages():
    m1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    a = rec("a", [1, 2, 3], [4, 5], m1)
    m2 = [*m1, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"}]
    b = rec("b", [1, 2, 3, 4, 5, 6, 7], [8], m2)
    sb = encode([remember(a)], b)
    assert (sb.base_call_id, sb.prompt_prefix_len, sb.messages_prefix_len) == ("a", 5, 2)
    assert sb.prompt_token_ids == [6, 7] and sb.request["messages"] == m2[2:]
    assert sb.request["tools"] == b.request["tools"] and sb.completion_token_ids == [8]
    assert b.prompt_token_ids == [1, 2, 3, 4, 5, 6, 7] and b.request["messages"] == m2  # the record is untouched
    full = expand({"a": stored(a), "b": stored(sb)}, ["b"])["b"]
    assert full.prompt_token_ids == b.prompt_token_ids and full.request == b.request


def test_nothing_shared_is_stored_whole():
    a = rec("a", [1, 2], [3], [{"role": "user", "content": "x"}])
    b = rec("b", [9, 9], [3], [{"role": "user", "content": "y"}])
    assert encode([remember(a)], b) is b
    assert encode([], b) is b


def test_a_branch_shares_the_common_prefix():
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "first try"}]
    a = rec("a", [1, 2, 3, 4], [5, 6], msgs)
    b = rec("b", [1, 2, 3, 7, 8], [9], [msgs[0], {"role": "assistant", "content": "second try"}])
    sb = encode([remember(a)], b)
    assert (sb.prompt_prefix_len, sb.prompt_token_ids, sb.messages_prefix_len) == (3, [7, 8], 1)
    full = expand({"a": stored(a), "b": stored(sb)}, ["b"])["b"]
    assert full.prompt_token_ids == b.prompt_token_ids and full.request == b.request


def test_messages_are_compared_as_json_values_not_python_equality():
    a = rec("a", None, None, [{"role": "user", "content": "x", "flag": True}])
    b = rec("b", None, None, [{"role": "user", "content": "x", "flag": 1}, {"role": "user", "content": "y"}])
    assert encode([remember(a)], b) is b  # True == 1 in Python, not in JSON
    c = rec("c", None, None, [{"flag": True, "content": "x", "role": "user"}, {"role": "user", "content": "y"}])
    assert encode([remember(a)], c).messages_prefix_len == 1  # key order does not matter


def test_a_different_kind_shares_tokens_but_not_messages():
    a = rec("a", [1, 2], [3], [{"role": "user", "content": "x"}], kind="chat")
    b = rec("b", [1, 2, 3, 4], [5], [{"role": "user", "content": "x"}], kind="responses")
    sb = encode([remember(a)], b)
    assert (sb.prompt_prefix_len, sb.messages_prefix_len) == (3, None)
    full = expand({"a": stored(a), "b": stored(sb)}, ["b"])["b"]
    assert full.prompt_token_ids == [1, 2, 3, 4] and full.request == b.request


def test_the_best_of_several_bases_is_used():
    a = rec("a", [1, 2], [3], [{"role": "user", "content": "x"}], agent_name="one")
    other = rec("o", [7, 7, 7], [7], [{"role": "user", "content": "z"}], agent_name="two")
    b = rec("b", [1, 2, 3, 4], [5], [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    assert encode([remember(other), remember(a)], b).base_call_id == "a"


def test_a_missing_base_is_an_error_not_a_wrong_answer():
    a = rec("a", [1, 2], [3], [{"role": "user", "content": "x"}])
    b = encode([remember(a)], rec("b", [1, 2, 3, 4], [5], [{"role": "user", "content": "x"}]))
    with pytest.raises(MissingBase):
        expand({"b": stored(b)}, ["b"])


def test_token_ids_are_compared_whole_not_by_digits():
    a = rec("a", [12, 34], [5], [])
    b = rec("b", [12, 345, 6], [7], [])
    sb = encode([remember(a)], b)
    assert (sb.prompt_prefix_len, sb.prompt_token_ids) == (1, [345, 6])
    c = rec("c", [12, 34, 5, 6], [7], [])
    assert encode([remember(a)], c).prompt_prefix_len == 3
    d = rec("d", [1, 2**70], [3], [])  # no token ids a database holds: nothing to compare
    assert encode([remember(d)], rec("e", [1, 2**70, 4], [5], [])).prompt_prefix_len is None


def test_an_extension_is_found_without_comparing_message_by_message():
    m = [{"role": "user", "content": str(i)} for i in range(50)]
    a = rec("a", [1], [2], m)
    b = rec("b", [1, 2, 3], [4], [*m, {"role": "user", "content": "new"}])
    row, mine = encode_call([remember(a)], b)
    assert row.messages_prefix_len == 50 and row.request["messages"] == [{"role": "user", "content": "new"}]
    assert mine == remember(b)


# --- the property ------------------------------------------------------------------------------------------


class Sim:
    """One session's calls as a recording agent would make them: several agents, each with its own
    conversation, extending it turn by turn, with tool turns, branches (a retried turn), compactions (the
    context replaced by a summary) and re-renders (the same messages, other tokens)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.convs: dict[str, tuple[list[int], list[dict]]] = {}
        self.n = 0

    def tokens(self, k: int) -> list[int]:
        return [self.rng.randrange(8) for _ in range(k)]  # a tiny vocabulary: accidental common prefixes

    def call(self, op: str, agent: str, kind: str) -> CallRecord:
        rng = self.rng
        prompt, messages = self.convs.get(agent, ([], []))
        if op == "extend" or not prompt:
            new = [{"role": "user", "content": f"turn {self.n}", "n": rng.choice([1, 1.0, True])}]
            if rng.random() < 0.4:
                new = [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": f"t{self.n}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": f"t{self.n}", "content": "ok"},
                ]
            prompt, messages = prompt + self.tokens(rng.randrange(0, 4)), messages + new
        elif op == "branch":
            cut = rng.randrange(len(prompt) + 1)
            prompt, messages = (
                prompt[:cut] + self.tokens(rng.randrange(1, 4)),
                messages[: rng.randrange(len(messages) + 1)] + [{"role": "user", "content": f"retry {self.n}"}],
            )
        elif op == "compact":
            prompt, messages = (
                prompt[: rng.randrange(3)] + self.tokens(3),
                messages[:1] + [{"role": "user", "content": f"summary {self.n}"}],
            )
        elif op == "rerender":
            prompt = self.tokens(len(prompt))
        completion = self.tokens(rng.randrange(0, 4))
        self.n += 1
        record = rec(
            f"c{self.n}",
            list(prompt),
            completion if rng.random() > 0.1 else None,
            [dict(m) for m in messages],
            kind=kind,
            agent_name=agent,
        )
        if rng.random() < 0.1:
            record.prompt_token_ids = None  # a failed call: no tokens
        # The next turn sees this one's completion, as a chat template renders it.
        self.convs[agent] = (
            prompt + (completion or []),
            messages + [{"role": "assistant", "content": f"answer {self.n}"}],
        )
        return record


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["extend", "extend", "extend", "branch", "compact", "rerender"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["chat", "messages", "responses"]),
        ),
        min_size=1,
        max_size=40,
    ),
    committed_only=st.floats(0, 1),
)
def test_every_call_rebuilt_from_the_stored_rows_equals_the_recorded_one(seed, ops, committed_only):
    rng = random.Random(seed)
    sim = Sim(rng)
    records = [sim.call(op, agent, kind) for op, agent, kind in ops]
    # The writer's cache: a few recent calls of the session (some never enter it: another worker wrote them,
    # or their batch was not committed yet when the next one was encoded).
    cache: list = []
    rows: dict[str, Stored] = {}
    n_deltas = 0
    for r in records:
        written, mine = encode_call(cache[-3:], r)
        assert mine == remember(r)  # what the writer keeps, built from its base's, is what the call holds
        n_deltas += written is not r
        rows[r.id] = stored(written)
        if rng.random() > committed_only * 0.5:
            cache.append(mine)
    expected = {r.id: stored(r) for r in records}
    every = expand(rows, rng.sample(list(rows), len(rows)))
    for r in records:
        want = expected[r.id]
        assert every[r.id].prompt_token_ids == want.prompt_token_ids
        assert every[r.id].request == want.request
        # One call alone (GET /calls/{id}): only the rows of its chain.
        chain, at = {}, r.id
        while at is not None:
            chain[at] = rows[at]
            at = rows[at].base_call_id
        one = expand(chain, [r.id])[r.id]
        assert one.prompt_token_ids == want.prompt_token_ids and one.request == want.request
        assert expand(chain, [r.id], tokens=False)[r.id].prompt_token_ids == rows[r.id].prompt_token_ids
    if len(records) > 3 and all(op == "extend" for op, _, _ in ops) and committed_only == 0:
        assert n_deltas >= len(records) - len({a for _, a, _ in ops}) - 2


# --- the writer's cache of committed calls -----------------------------------------------------------------


def test_the_cache_keeps_what_later_calls_can_branch_from():
    from trainwire.store.delta_cache import DeltaCache

    cache = DeltaCache(per_session=3, max_age_s=None)
    m = [{"role": "user", "content": "x"}]
    a = remember(rec("a", [1, 2], [3], m))
    b = remember(rec("b", [1, 2, 3, 4], [5], [*m, {"role": "user", "content": "y"}]))  # extends a
    c = remember(rec("c", [1, 2, 9], [5], [*m, {"role": "user", "content": "z"}]))  # a retry of b's turn
    cache.add("s", a)
    cache.add("s", b)
    assert [x.id for x in cache.bases("s")] == ["b"]  # b serves every later call at least as well as a
    cache.add("s", c)
    assert [x.id for x in cache.bases("s")] == ["b", "c"]
    for i in range(5):
        cache.add("s", remember(rec(f"o{i}", [7, i], [7], [{"role": "user", "content": str(i)}])))
    assert [x.id for x in cache.bases("s")] == ["o2", "o3", "o4"]
    assert cache.bytes == sum(DeltaCache._size(x) for x in cache.bases("s"))


def test_the_cache_evicts_the_least_recently_written_sessions():
    from trainwire.store.delta_cache import DeltaCache

    cache = DeltaCache(max_sessions=2, max_age_s=None)
    for sid in ("s1", "s2", "s1", "s3"):
        cache.add(sid, remember(rec(f"{sid}-c", [1], [2], [])))
    assert len(cache) == 2 and cache.bases("s2") == [] and cache.bases("s1") and cache.bases("s3")
    small = DeltaCache(max_age_s=None, max_bytes=DeltaCache._size(remember(rec("x", [1] * 100, [2], []))) + 1)
    small.add("s1", remember(rec("x", [1] * 100, [2], [])))
    small.add("s2", remember(rec("y", [1] * 100, [2], [])))
    assert len(small) == 1 and small.bases("s2")


def test_the_cache_offers_no_call_older_than_its_age_limit():
    """No delta against a call that prune may have pruned: a cached call is a base only while it started less
    than `max_age_s` ago (by its own start, so also a call replayed from the journal long after)."""
    from trainwire.store.delta_cache import DeltaCache

    cache = DeltaCache(max_age_s=3600)
    t = NOW.timestamp()
    cache.add("s", remember(rec("a", [1, 2], [3], [])))
    assert [x.id for x in cache.bases("s", now=t + 3599)] == ["a"]
    assert cache.bases("s", now=t + 3601) == [] and len(cache) == 0 and cache.bytes == 0
    cache.add("s", remember(rec("b", [1, 2], [3], [])))
    assert cache.bases("s") == []  # by default against the clock: NOW is long past


def test_a_base_without_its_body_is_an_error_not_a_shorter_prompt():
    """A delta whose base holds fewer tokens or messages than it shares (a body `trainwire prune` dropped):
    `expand` raises instead of returning the delta's tail as if it were the whole prompt or message list."""
    m = [{"role": "user", "content": "x"}]
    a = rec("a", [1, 2], [3], m)
    b = encode([remember(a)], rec("b", [1, 2, 3, 4], [5], [*m, {"role": "user", "content": "y"}]))
    assert (b.prompt_prefix_len, b.messages_prefix_len) == (3, 1)
    pruned = Stored(id="a", kind="chat")  # what prune leaves: every body column null
    with pytest.raises(MissingBase, match="3 tokens"):
        expand({"a": pruned, "b": stored(b)}, ["b"])
    with pytest.raises(MissingBase, match="1 messages"):
        expand({"a": pruned, "b": stored(b)}, ["b"], tokens=False)
    short = stored(a)
    short.completion_token_ids = []  # a base holding 2 of the 3 tokens shared
    with pytest.raises(MissingBase):
        expand({"a": short, "b": stored(b)}, ["b"], request=False)
    full = expand({"a": stored(a), "b": stored(b)}, ["b"])["b"]
    assert full.prompt_token_ids == [1, 2, 3, 4]
