"""Calls stored as deltas, through the real write path into Postgres and SQLite: the same sessions written by a
writer with `call_deltas` and by one without, into two stores; every reader (session and call reads with and
without tokens, lists with their token counts and `has=` filters, stats, export pages, the trainer's claim and the
trajectory samples built from it, the tool-call producer lookup) returns the same from both, while the first store's
raw rows are mostly deltas."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import pytest

from tests.support import dbread
from tests.unit.test_call_deltas import NOW, Sim
from trainwire.records import CallRecord
from trainwire.rl.transitions import build_samples
from trainwire.store.claims import claim_batch
from trainwire.store.db import make_engine
from trainwire.store.delta_cache import DeltaCache
from trainwire.store.export import _filters, pages
from trainwire.store.migrate import upgrade_head
from trainwire.store.reads.calls import find_tool_call_producers, get_call
from trainwire.store.reads.sessions import get_session, list_sessions
from trainwire.store.reads.stats import stats
from trainwire.store.rewards import NewReward, store_reward
from trainwire.store.writer import BatchWriter


@pytest.fixture(params=["postgres", "sqlite"])
def two_urls(request, tmp_path) -> tuple[str, str]:
    if request.param == "postgres":
        pg = request.getfixturevalue("pg")
        urls = [pg.create_database("t_" + uuid.uuid4().hex[:12]) for _ in range(2)]
    else:
        urls = [f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("deltas", "whole")]
    for url in urls:
        upgrade_head(url)
    return urls[0], urls[1]


def sessions(seed: int) -> list[CallRecord]:
    """Three sessions' calls, interleaved: several agents each, tool turns, branches, compactions, failures."""
    rng = random.Random(seed)
    out = []
    sims = {f"s{i}": Sim(random.Random(seed * 10 + i)) for i in range(3)}
    ops = ["extend"] * 6 + ["branch", "compact", "rerender"]
    for n in range(60):
        sid = rng.choice(list(sims))
        r = sims[sid].call(rng.choice(ops), rng.choice(["a", "a", "b"]), rng.choice(["chat", "chat", "messages"]))
        r.id, r.session_id, r.seq = f"{sid}-{r.id}", sid, n
        r.started_at = r.finished_at = NOW + timedelta(seconds=n)
        r.task_id = "task"
        tc = f"tc-{r.id}"
        r.response = {
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "ok",
                        "tool_calls": [{"id": tc, "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                }
            ]
        }
        if r.prompt_token_ids is None:
            r.status_code = 500
        out.append(r)
    return out


async def write(url: str, records: list[CallRecord], deltas: bool, rng: random.Random) -> BatchWriter:
    engine = make_engine(url)
    # The sessions are dated in the past (NOW, 2026-01-01): a cache that never expires, or every call would be
    # whole (the expiry itself: tests/test_call_deltas_safety.py).
    writer = BatchWriter(engine, interval_ms=2, call_deltas=deltas, delta_cache=DeltaCache(max_age_s=None))
    await writer.start()
    try:
        for r in records:
            writer.submit(r)
            if rng.random() < 0.8:  # most calls wait for their answer; some share a batch with the next
                assert await writer.flush_session(r.session_id)
        await writer.stop()
    finally:
        await engine.dispose()
    return writer


async def everything(url: str, records: list[CallRecord]) -> dict:
    engine = make_engine(url)
    try:
        out: dict = {}
        for sid in sorted({r.session_id for r in records}):
            for tokens in (False, True):
                out[f"session {sid} {tokens}"] = (await get_session(engine, sid, tokens=tokens)).model_dump()
        for r in records:
            for tokens in (False, True):
                out[f"call {r.id} {tokens}"] = (await get_call(engine, r.id, tokens=tokens)).model_dump()
            out[f"producers {r.id}"] = await find_tool_call_producers(
                engine,
                session_id=r.session_id,
                exclude_call_id="none",
                started_before=NOW + timedelta(days=1),
                tool_call_id=f"tc-{r.id}",
            )
        for has in ([], ["failed"], ["untrainable"]):
            out[f"list {has}"] = (await list_sessions(engine, has=has)).model_dump()
        out["stats"] = (await stats(engine)).model_dump()
        out["export"] = [
            row async for page in pages(engine, _filters(None, None, None, None, True), page_size=7) for row in page
        ]
        for sid in {r.session_id for r in records}:
            await store_reward(engine, NewReward(session_id=sid, value=1.0, final=True))
        claimed = await claim_batch(engine, worker_id="w", batch_size=10)
        out["claim"] = sorted(([c.id, c.calls] for c in claimed), key=lambda x: x[0])
        # Trajectory samples: merged by the calls' stored structure from one store, by comparing prefixes from the
        # other; the same either way.
        built = build_samples(sorted(claimed, key=lambda c: c.id), mode="trajectory")
        out["trajectory"] = (built.samples, built.call_ids, built.counters)
        return out
    finally:
        await engine.dispose()


@pytest.mark.parametrize("seed", [1, 2])
def test_readers_see_the_same_calls_whether_stored_as_deltas_or_whole(two_urls, seed):
    deltas_url, whole_url = two_urls
    records = sessions(seed)
    w1 = asyncio.run(write(deltas_url, records, True, random.Random(seed)))
    w2 = asyncio.run(write(whole_url, records, False, random.Random(seed)))
    assert w1.written_total == w2.written_total == len(records)
    assert w1.delta_total >= len(records) // 3 and w2.delta_total == 0

    raw = dbread.raw_calls(deltas_url)
    assert sum(1 for r in raw if r["base_call_id"] is not None) == w1.delta_total
    assert all(r["base_call_id"] is None for r in dbread.raw_calls(whole_url))
    stored_tokens = sum(len(r["prompt_token_ids"] or []) for r in raw)
    assert stored_tokens < 0.8 * sum(len(r.prompt_token_ids or []) for r in records)

    # What the suite's other tests read: the full values, as stored whole.
    full = dbread.calls(deltas_url)
    delta_cols = ("base_call_id", "prompt_prefix_len", "messages_prefix_len")
    assert [{k: v for k, v in r.items() if k not in delta_cols} for r in full] == [
        {k: v for k, v in r.items() if k not in delta_cols} for r in dbread.calls(whole_url)
    ]
    by_id = {r.id: r for r in records}
    for r in full:
        assert r["prompt_token_ids"] == by_id[r["id"]].prompt_token_ids

    a, b = asyncio.run(everything(deltas_url, records)), asyncio.run(everything(whole_url, records))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert any(c.prompt_token_ids for _, calls in a["claim"] for c in calls)
    # The claim carries how the calls are stored (equality leaves it out): the trainer merges trajectories by it.
    assert any(c.prompt_prefix_len is not None and c.base_call_id for _, calls in a["claim"] for c in calls)
    assert all(c.base_call_id is None for _, calls in b["claim"] for c in calls)
    assert a["trajectory"][2]["merged"] > 0


def test_a_batch_refused_as_data_is_written_whole_and_no_delta_points_at_a_refused_row(pg_url, tmp_path):
    """A batch with a row Postgres refuses (finish_reason longer than varchar(32)) is written row by row from
    the whole records: the call that would have been a delta is stored whole, the refused call is set aside
    whole, and a later call extending the refused one is stored whole too (its base is not in the store)."""
    from trainwire.store.journal import Journal, read_records, rejected_files

    sim, other = Sim(random.Random(1)), Sim(random.Random(2))
    c1, c2, c3 = (sim.call("extend", "a", "chat") for _ in range(3))
    b1, b2 = (other.call("extend", "a", "chat") for _ in range(2))
    for i, r in enumerate([c1, c2, c3]):
        r.id, r.session_id, r.seq, r.prompt_token_ids = f"c{i + 1}", "good", i, r.prompt_token_ids or [1]
    for i, r in enumerate([b1, b2]):
        r.id, r.session_id, r.seq, r.prompt_token_ids = f"b{i + 1}", "bad", i, r.prompt_token_ids or [1]
    b1.finish_reason = "x" * 40

    async def go():
        engine = make_engine(pg_url)
        writer = BatchWriter(
            engine, interval_ms=20, journal=Journal(tmp_path / "journal"), delta_cache=DeltaCache(max_age_s=None)
        )
        await writer.start()
        try:
            writer.submit(c1)
            assert await writer.flush_session("good")
            writer.submit(c2)
            writer.submit(b1)  # the same batch as c2
            assert await writer.flush_session("good") and await writer.flush_session("bad")
            writer.submit(c3)
            writer.submit(b2)
            assert await writer.flush_session("good") and await writer.flush_session("bad")
            await writer.stop()
        finally:
            await engine.dispose()
        return writer

    writer = asyncio.run(go())
    assert writer.rejected_total == 1
    raw = {r["id"]: r for r in dbread.raw_calls(pg_url)}
    assert set(raw) == {"c1", "c2", "c3", "b2"}
    assert raw["c2"]["base_call_id"] is None and raw["b2"]["base_call_id"] is None
    assert raw["c3"]["base_call_id"] == "c2" and raw["c3"]["prompt_prefix_len"]
    full = {r["id"]: r for r in dbread.calls(pg_url)}
    for r in (c1, c2, c3, b2):
        assert full[r.id]["prompt_token_ids"] == r.prompt_token_ids and full[r.id]["request"] == r.request
    (path,) = rejected_files(tmp_path / "journal")
    (kept,), _ = read_records(path, rejected=True)
    assert kept.id == "b1" and kept.base_call_id is None and kept.request == b1.request
