"""Claiming finished sessions (store/claims.py) on Postgres and SQLite: exactly once under concurrent
claimers, settle time, agent filter, task groups (complete or timed out), release / mark / stale claims."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, update

from trainwire.store import claims
from trainwire.store.db import make_engine
from trainwire.store.models import Call, Reward, Session, utcnow

S, C, R = Session.__table__, Call.__table__, Reward.__table__


@pytest.fixture
async def db(db_url):
    engine = make_engine(db_url)
    yield engine
    await engine.dispose()


async def add_session(
    engine,
    sid,
    *,
    task=None,
    final=1.0,
    closed=True,
    finished_ago=30.0,
    n_calls=1,
    agents=None,
    trainable=None,
    intermediate=(),
):
    """A session with ``n_calls`` calls (one second apart, starting a minute before it finished) and,
    when ``closed``, a final reward row ``finished_ago`` seconds old (``final=None``: closed without one).
    ``intermediate``: (call index or None, value, seconds after that call finished)."""
    now = utcnow()
    end = now - timedelta(seconds=finished_ago)
    start = end - timedelta(seconds=60)
    async with engine.begin() as conn:
        await conn.execute(
            insert(S).values(
                id=sid,
                task_id=task,
                n_calls=n_calls,
                first_call_at=start,
                last_call_at=start + timedelta(seconds=n_calls),
            )
        )
        rows = []
        for i in range(n_calls):
            at = start + timedelta(seconds=i)
            rows.append(
                dict(
                    id=f"{sid}-c{i}",
                    session_id=sid,
                    seq=i,
                    task_id=task,
                    agent_name=(agents or ["a"] * n_calls)[i],
                    trainable=(trainable or [True] * n_calls)[i],
                    kind="chat",
                    path="/v1/chat/completions",
                    policy_version=0,
                    prompt_token_ids=[1, 2, i],
                    completion_token_ids=[3, i],
                    logprobs=[-0.5, -0.25],
                    finish_reason="stop",
                    status_code=200,
                    started_at=at,
                    finished_at=at + timedelta(seconds=0.5),
                )
            )
        if rows:
            await conn.execute(insert(C), rows)
        for idx, value, after in intermediate:
            call_at = start + timedelta(seconds=(idx or 0) + 0.5 + after)
            await conn.execute(
                insert(R).values(
                    session_id=sid,
                    call_id=None if idx is None else f"{sid}-c{idx}",
                    value=value,
                    final=False,
                    source="rule",
                    created_at=call_at,
                )
            )
        if closed:
            await conn.execute(insert(R).values(session_id=sid, value=final, final=True, created_at=end))


async def statuses(engine):
    async with engine.connect() as conn:
        rows = (await conn.execute(select(S.c.id, S.c.status, S.c.claimed_by, S.c.train_step, S.c.skip_reason))).all()
    return {r.id: r for r in rows}


async def claim(engine, worker="w1", **kw):
    kw.setdefault("batch_size", 100)
    kw.setdefault("settle_s", 0.0)
    kw.setdefault("group_by_task", False)
    return await claims.claim_batch(engine, worker_id=worker, **kw)


async def test_claim_loads_trainable_calls_in_order_with_rewards(db):
    await add_session(
        db,
        "s1",
        final=0.7,
        n_calls=4,
        agents=["a", "a", "b", "a"],
        trainable=[True, False, True, True],
        intermediate=[
            (0, 0.25, 0.1),
            (0, 0.5, 0.2),
            (3, -1.0, 0.1),
            (1, 9.0, 0.1),
            (None, -0.125, 2.1),  # posted 2.1 s after call 0: call 2 had finished
            (2, None, 0.1),
        ],
    )  # a reward row without a value counts for nothing
    # a later-seq call with the same started_at as call 3: ordering falls back to seq
    async with db.begin() as conn:
        at = (await conn.execute(select(C.c.started_at).where(C.c.id == "s1-c3"))).scalar()
        await conn.execute(
            insert(C).values(
                id="s1-c4",
                session_id="s1",
                seq=4,
                agent_name="a",
                trainable=True,
                kind="chat",
                path="/v1/chat/completions",
                status_code=500,
                started_at=at,
                finished_at=at,
                error="boom",
            )
        )
        await conn.execute(update(C).where(C.c.id == "s1-c3").values(seq=5))
    (s,) = await claim(db)
    assert (s.id, s.task_id, s.final_reward) == ("s1", None, pytest.approx(0.7))
    assert [c.id for c in s.calls] == ["s1-c0", "s1-c2", "s1-c4", "s1-c3"]  # not c1 (not trainable)
    rewards = {c.id: c.reward for c in s.calls}
    assert rewards == {
        "s1-c0": pytest.approx(0.75),
        "s1-c2": pytest.approx(-0.125),
        "s1-c4": 0.0,
        "s1-c3": pytest.approx(-1.0),
    }
    c0 = s.calls[0]
    assert (c0.prompt_token_ids, c0.completion_token_ids, c0.logprobs) == ([1, 2, 0], [3, 0], [-0.5, -0.25])
    assert (c0.status_code, c0.aborted, c0.policy_version, c0.agent_name) == (200, False, 0, "a")
    assert s.calls[2].status_code == 500 and s.calls[2].prompt_token_ids is None
    st = (await statuses(db))["s1"]
    assert (st.status, st.claimed_by) == ("claimed", "w1")
    assert await claim(db) == []  # exactly once


async def test_claim_loads_sampling_and_untrainable_reason(db):
    """The trainer decides from these what not to train on (rl/transitions.py); rows from before migration 0002
    have neither."""
    await add_session(db, "s1", n_calls=3)
    effective = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
    }
    sampled = {"requested": {"temperature": 0.7}, "effective": effective, "enforced": ["temperature"]}
    async with db.begin() as conn:
        await conn.execute(update(C).where(C.c.id == "s1-c0").values(sampling=sampled))
        await conn.execute(
            update(C)
            .where(C.c.id == "s1-c1")
            .values(
                sampling={"requested": {"top_p": 0.5}, "effective": {**effective, "top_p": 0.5}},
                untrainable_reason="sampling: top_p 0.5 differs from the training value 1.0",
            )
        )
    (s,) = await claim(db)
    c0, c1, c2 = s.calls
    assert (c0.sampling, c0.untrainable_reason) == (sampled, None)
    assert c1.sampling["effective"]["top_p"] == 0.5 and c1.untrainable_reason.startswith("sampling: top_p")
    assert (c2.sampling, c2.untrainable_reason) == (None, None)


async def test_agent_filter(db):
    await add_session(db, "s1", n_calls=3, agents=["planner", "coder", "planner"], intermediate=[(1, -0.5, 0.1)])
    (s,) = await claim(db, train_agents=["planner"])
    assert [c.id for c in s.calls] == ["s1-c0", "s1-c2"]
    assert [c.reward for c in s.calls] == [0.0, 0.0]  # the coder's reward is not the planner's


async def test_only_finished_and_settled_sessions(db):
    await add_session(db, "running", closed=False)
    await add_session(db, "fresh", finished_ago=0.5)
    await add_session(db, "settled", finished_ago=10.0)
    await add_session(db, "no_reward", final=None, finished_ago=10.0)
    got = await claim(db, settle_s=5.0)
    assert sorted(s.id for s in got) == ["no_reward", "settled"]
    assert {s.id: s.final_reward for s in got} == {"no_reward": None, "settled": 1.0}
    assert [s.id for s in await claim(db, settle_s=0.1)] == ["fresh"]
    assert await claim(db, settle_s=0.0) == []
    assert (await statuses(db))["running"].status == "open"


async def test_batch_size_takes_oldest_first(db):
    for i in range(5):
        await add_session(db, f"s{i}", finished_ago=100.0 - i)
    assert [s.id for s in await claim(db, batch_size=2)] == ["s0", "s1"]
    assert [s.id for s in await claim(db, batch_size=2)] == ["s2", "s3"]
    assert [s.id for s in await claim(db, batch_size=2)] == ["s4"]
    assert await claim(db, batch_size=0) == []


async def test_newest_first_takes_the_freshest_sessions_and_groups(db):
    """--claim-order newest: the most recently finished sessions, and groups by their newest member; a group is
    still timed out by its oldest member."""
    for i in range(3):
        await add_session(db, f"s{i}", finished_ago=100.0 - i)
    assert [s.id for s in await claim(db, batch_size=2, newest_first=True)] == ["s2", "s1"]
    assert [s.id for s in await claim(db, batch_size=2, newest_first=True)] == ["s0"]
    for t, age in (("t1", 100.0), ("t2", 90.0), ("t3", 80.0)):
        for i in range(2):
            await add_session(db, f"{t}-{i}", task=t, finished_ago=age - i)
    await add_session(db, "late0", task="late", finished_ago=120.0)
    await add_session(db, "late1", task="late", finished_ago=5.0)  # 2 of 3, timed out by late0
    kw = dict(group_by_task=True, group_size=3, group_timeout_s=110.0, batch_size=5, newest_first=True)
    assert [s.id for s in await claim(db, **kw)] == ["late1", "late0"]  # the t groups are 2 of 3, not timed out
    kw.update(group_size=2, group_timeout_s=600.0)
    assert [s.id for s in await claim(db, **kw)] == ["t3-1", "t3-0", "t2-1", "t2-0"]
    assert [s.id for s in await claim(db, **kw)] == ["t1-1", "t1-0"]


async def test_session_without_trainable_calls_is_claimed_empty(db):
    await add_session(db, "eval", n_calls=2, trainable=[False, False])
    (s,) = await claim(db)
    assert s.calls == []


async def test_release_mark_trained_and_skipped(db):
    for sid in ("a", "b", "c"):
        await add_session(db, sid)
    got = await claim(db, worker="w1")
    assert len(got) == 3
    assert await claims.release(db, ["a"], worker_id="someone-else") == 0
    assert await claims.release(db, ["a"]) == 1
    assert (await statuses(db))["a"].status == "open" and (await statuses(db))["a"].claimed_by is None
    assert [s.id for s in await claim(db, worker="w2")] == ["a"]
    assert await claims.mark_trained(db, ["b", "c"], 7, worker_id="w1") == 2
    assert await claims.mark_skipped(db, ["a"], "stale", worker_id="w2") == 1
    st = await statuses(db)
    assert (st["b"].status, st["b"].train_step, st["c"].status) == ("trained", 7, "trained")
    assert (st["a"].status, st["a"].skip_reason) == ("skipped", "stale")
    # finished states are final: not claimable, not releasable, not re-marked
    assert await claim(db) == []
    assert await claims.release(db, ["a", "b", "c"]) == 0
    assert await claims.mark_trained(db, ["a"], 8) == 0
    assert await claims.release(db, []) == 0


async def test_stale_claims_of_a_crashed_trainer_are_released(db):
    await add_session(db, "a")
    await add_session(db, "b")
    await claim(db, worker="crashed")
    assert await claims.release_stale_claims(db, older_than_s=600) == 0
    async with db.begin() as conn:
        await conn.execute(update(S).where(S.c.id == "a").values(claimed_at=utcnow() - timedelta(seconds=601)))
    assert await claims.release_stale_claims(db, older_than_s=600) == 1
    assert [s.id for s in await claim(db, worker="w2")] == ["a"]
    # renew keeps a long step's claims alive
    async with db.begin() as conn:
        await conn.execute(update(S).where(S.c.id == "b").values(claimed_at=utcnow() - timedelta(seconds=601)))
    assert await claims.renew(db, ["b"], worker_id="crashed") == 1
    assert await claims.release_stale_claims(db, older_than_s=600) == 0


async def test_groups_complete_or_timed_out(db):
    for i in range(3):
        await add_session(db, f"full{i}", task="full", finished_ago=50.0 - i)
    for i in range(2):
        await add_session(db, f"young{i}", task="young", finished_ago=20.0 - i)
    await add_session(db, "old0", task="old", finished_ago=120.0)
    await add_session(db, "old1", task="old", finished_ago=5.0)
    await add_session(db, "young-unsettled", task="young", finished_ago=0.0)  # does not count yet
    await add_session(db, "loner", task=None, finished_ago=10.0)
    kw = dict(group_by_task=True, group_size=3, group_timeout_s=60.0, settle_s=3.0)
    got = await claim(db, **kw)
    # oldest group first: old (120 s, timed out), full (complete), loner (own group); not young (2 of 3)
    assert [s.id for s in got] == ["old0", "old1", "full0", "full1", "full2", "loner"]
    assert await claim(db, **kw) == []
    await add_session(db, "young3", task="young", finished_ago=10.0)
    got = await claim(db, **{**kw, "settle_s": 0.0})
    assert [s.id for s in got] == ["young0", "young1", "young3", "young-unsettled"]


async def test_groups_fit_the_batch_whole(db):
    for t, age in (("t1", 100.0), ("t2", 90.0), ("t3", 80.0)):
        for i in range(2):
            await add_session(db, f"{t}-{i}", task=t, finished_ago=age - i)
    kw = dict(group_by_task=True, group_size=2, group_timeout_s=600.0, batch_size=5)
    assert [s.id for s in await claim(db, **kw)] == ["t1-0", "t1-1", "t2-0", "t2-1"]  # t3 would not fit
    assert [s.id for s in await claim(db, **kw)] == ["t3-0", "t3-1"]


async def test_first_group_larger_than_batch_is_cut(db):
    for i in range(5):
        await add_session(db, f"big{i}", task="big", finished_ago=100.0 - i)
    kw = dict(group_by_task=True, group_size=2, group_timeout_s=600.0, batch_size=3)
    assert [s.id for s in await claim(db, **kw)] == ["big0", "big1", "big2"]
    assert [s.id for s in await claim(db, **kw)] == ["big3", "big4"]


async def test_grouping_off_claims_regardless_of_tasks(db):
    await add_session(db, "a", task="t")
    assert [s.id for s in await claim(db, group_by_task=False, group_size=8)] == ["a"]
    await add_session(db, "b", task="t")
    assert [s.id for s in await claim(db, group_by_task=True, group_size=0)] == ["b"]


async def _claim_loop(url, worker, got, *, done, **kw):
    engine = make_engine(url)
    try:
        idle = 0
        while idle < 3 and not done():
            batch = await claim(engine, worker=worker, **kw)
            got.extend(s.id for s in batch)
            idle = 0 if batch else idle + 1
            await asyncio.sleep(0)
    finally:
        await engine.dispose()


async def test_two_concurrent_claimers_claim_each_session_exactly_once(db, db_url):
    n = 50
    for i in range(n):
        await add_session(db, f"s{i:02d}", finished_ago=10.0 + i % 7)
    got1, got2 = [], []
    await asyncio.gather(
        _claim_loop(db_url, "w1", got1, done=lambda: False, batch_size=3),
        _claim_loop(db_url, "w2", got2, done=lambda: False, batch_size=3),
    )
    assert len(got1) + len(got2) == n  # none twice
    assert sorted(got1 + got2) == [f"s{i:02d}" for i in range(n)]  # none lost
    st = await statuses(db)
    assert {sid for sid, r in st.items() if r.claimed_by == "w1"} == set(got1)
    assert {sid for sid, r in st.items() if r.claimed_by == "w2"} == set(got2)
    assert all(r.status == "claimed" for r in st.values())
    assert got1 and got2, "both claimers should have taken part"


async def test_two_concurrent_claimers_take_whole_groups(db, db_url):
    for t in range(10):
        for i in range(5):
            await add_session(db, f"t{t}-{i}", task=f"t{t}", finished_ago=10.0 + t)
    got1, got2 = [], []

    def done():
        return len(got1) + len(got2) >= 50

    kw = dict(group_by_task=True, group_size=5, group_timeout_s=600.0, batch_size=5)
    await asyncio.gather(
        _claim_loop(db_url, "w1", got1, done=done, **kw), _claim_loop(db_url, "w2", got2, done=done, **kw)
    )
    # a group both claimers dropped in a lock race (each locked only part of it) is still there, whole
    got1 += [s.id for s in await claim(db, worker="w1", **{**kw, "batch_size": 50})]
    assert len(got1) + len(got2) == 50 and len(set(got1 + got2)) == 50
    for got in (got1, got2):
        tasks = {sid.split("-")[0] for sid in got}
        assert len(got) == 5 * len(tasks)  # whole groups only


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_postgres_skips_rows_locked_by_another_transaction(db):
    for sid in ("a", "b"):
        await add_session(db, sid, finished_ago=20.0 if sid == "a" else 10.0)
    async with db.connect() as holder:
        await holder.execute(select(S.c.id).where(S.c.id == "a").with_for_update())
        got = await asyncio.wait_for(claim(db, worker="w"), timeout=10)  # does not wait for the lock
        assert [s.id for s in got] == ["b"]
        await holder.rollback()
    assert [s.id for s in await claim(db, worker="w")] == ["a"]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_postgres_never_claims_part_of_a_group_another_claimer_holds(db):
    for i in range(4):
        await add_session(db, f"g{i}", task="g", finished_ago=20.0 - i)
    await add_session(db, "loner", finished_ago=5.0)
    kw = dict(group_by_task=True, group_size=4, group_timeout_s=600.0)
    async with db.connect() as holder:
        await holder.execute(select(S.c.id).where(S.c.id.in_(["g0", "g1"])).with_for_update())
        # the two unlocked members are no complete group: only the loner is claimed
        assert [s.id for s in await asyncio.wait_for(claim(db, **kw), timeout=10)] == ["loner"]
        await holder.rollback()
    assert [s.id for s in await claim(db, **kw)] == ["g0", "g1", "g2", "g3"]


async def test_stale_sessions_are_retired_in_sql_before_a_claim(db):
    """store/staleness.py: finished open sessions with a trainable answered call older than the bound become
    skipped in one statement; fresh, unfinished, untrainable-only and already claimed sessions are left alone."""
    from trainwire.store.staleness import STALE_REASON, retire_stale

    for sid in ("old", "fresh", "claimed-old", "other-agent-old"):
        await add_session(db, sid, agents=["b"] if sid == "other-agent-old" else None)
    await add_session(db, "open-old", closed=False)
    await add_session(db, "untrainable-old", trainable=[False])
    async with db.begin() as conn:
        await conn.execute(update(C).where(C.c.session_id == "fresh").values(policy_version=5))
        await conn.execute(update(C).where(C.c.session_id == "old").values(policy_version=None))  # = version 0
        await conn.execute(update(S).where(S.c.id == "claimed-old").values(status="claimed", claimed_by="w"))
    assert await retire_stale(db, oldest_fresh=0) == 0  # nothing is older than the base model
    assert await retire_stale(db, oldest_fresh=3, train_agents=["a"]) == 1
    st = await statuses(db)
    assert st["old"].status == "skipped" and st["old"].skip_reason == STALE_REASON
    assert {sid: st[sid].status for sid in st if sid != "old"} == {
        "fresh": "open",
        "claimed-old": "claimed",
        "other-agent-old": "open",
        "open-old": "open",
        "untrainable-old": "open",
    }
    assert await retire_stale(db, oldest_fresh=3) == 1  # without a filter other agents' calls count
    assert sorted(s.id for s in await claim(db)) == ["fresh", "untrainable-old"]
