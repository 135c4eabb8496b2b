"""The store's maintenance commands, run as a user runs them (`python -m trainwire.cli ...`) against real
Postgres and SQLite.

`compact-calls`: the same sessions written whole into two stores; one is compacted, batch by batch, stopped
and resumed; every reader (tests/test_call_deltas_store.everything: session and call reads, lists, stats,
export pages, the trainer's claim, the tool-call producer lookup) returns the same from both, while the
compacted store's raw rows are mostly deltas and hold far fewer bytes. A run that dies inside a batch loses
nothing (the batch rolls back, the next run redoes it); SIGINT stops after the batch in flight.

`prune`: only trained and skipped sessions older than the cutoff lose their bodies; the Parquet archive holds
exactly their calls, whole; their session rows say `pruned_at`; every reader still answers for them; the
other sessions read exactly as before."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import select, update

from tests.support import dbread
from tests.test_call_deltas_store import everything, sessions, write
from trainwire.cli import StopOnSignal
from trainwire.records import CallRecord
from trainwire.store import compact
from trainwire.store.compact import RUN_KEY, compact_calls, stored_bytes
from trainwire.store.db import make_engine
from trainwire.store.export import _filters, pages
from trainwire.store.migrate import upgrade_head
from trainwire.store.models import Session, StoreInfo
from trainwire.store.reads.calls import get_call
from trainwire.store.reads.sessions import get_session, list_sessions
from trainwire.store.reads.stats import stats
from trainwire.store.reads.trainability import PRUNED_REASON


@pytest.fixture(params=["postgres", "sqlite"])
def two_urls(request, tmp_path) -> tuple[str, str]:
    if request.param == "postgres":
        pg = request.getfixturevalue("pg")
        urls = [pg.create_database("t_" + uuid.uuid4().hex[:12]) for _ in range(2)]
    else:
        urls = [f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("compacted", "whole")]
    for url in urls:
        upgrade_head(url)
    return urls[0], urls[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainwire.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRAINWIRE_LOG_LEVEL": "warning"},
    )


def stored(url: str) -> int:
    return sum(stored_bytes(r["prompt_token_ids"], r["request"]) for r in dbread.raw_calls(url))


def n_deltas(url: str, session_id: str | None = None) -> int:
    return sum(1 for r in dbread.raw_calls(url, session_id) if r["base_call_id"] is not None)


def whole_twins(two_urls, seed: int) -> list[CallRecord]:
    records = sessions(seed)
    for url in two_urls:
        asyncio.run(write(url, records, False, random.Random(seed)))
    assert n_deltas(two_urls[0]) == 0
    return records


def test_compact_calls_stores_whole_rows_as_deltas_and_every_reader_sees_the_same(two_urls):
    url, twin = two_urls
    records = whole_twins(two_urls, 3)
    sids = sorted({r.session_id for r in records})
    before = stored(url)

    dry = cli("compact-calls", "--database-url", url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would be stored as deltas" in dry.stdout and n_deltas(url) == 0

    first = cli("compact-calls", "--database-url", url, "--batch-sessions", "1", "--max-sessions", "1")
    assert first.returncode == 0, first.stderr
    assert "3 sessions to look at (every session)" in first.stdout and "run it again" in first.stdout
    assert n_deltas(url, sids[0]) > 0 and n_deltas(url, sids[1]) == n_deltas(url, sids[2]) == 0

    rest = cli("compact-calls", "--database-url", url, "--batch-sessions", "1")
    assert rest.returncode == 0, rest.stderr
    assert f"resuming after session {sids[0]!r}, 2 sessions to look at" in rest.stdout
    assert "2/2 sessions" in rest.stdout and "bytes of prompt tokens and requests" in rest.stdout
    assert all(n_deltas(url, sid) > 0 for sid in sids)
    assert n_deltas(url) >= len(records) // 3
    after = stored(url)
    assert after < 0.6 * before, (before, after)

    # Complete: the next run only looks at sessions with calls since then, and these have none.
    again = cli("compact-calls", "--database-url", url)
    assert again.returncode == 0 and "0 sessions to look at" in again.stdout, again.stdout
    # --restart looks at everything again and finds nothing left to rewrite.
    redo = cli("compact-calls", "--database-url", url, "--restart")
    assert "3/3 sessions" in redo.stdout and "0 stored as deltas" in redo.stdout, redo.stdout
    assert stored(url) == after

    delta_cols = ("base_call_id", "prompt_prefix_len", "messages_prefix_len")
    assert [{k: v for k, v in r.items() if k not in delta_cols} for r in dbread.calls(url)] == [
        {k: v for k, v in r.items() if k not in delta_cols} for r in dbread.calls(twin)
    ]
    a, b = asyncio.run(everything(url, records)), asyncio.run(everything(twin, records))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


def test_compact_calls_writes_deltas_beside_the_write_paths_own(two_urls):
    """A store whose first calls were written whole (before the upgrade), the rest by a proxy with deltas (whole
    where its cache had no base): compaction rewrites whole rows, never makes a cycle with the writer's deltas,
    leaves the rows they refer to as they are, and readers see the same."""
    url, twin = two_urls
    records = sessions(4)
    asyncio.run(write(url, records[:30], False, random.Random(4)))
    asyncio.run(write(url, records[30:], True, random.Random(4)))
    asyncio.run(write(twin, records, False, random.Random(4)))
    had = n_deltas(url)
    raw = dbread.raw_calls(url)
    bases = {r["base_call_id"] for r in raw} - {None}
    report = asyncio.run(_compact(url, batch_sessions=2))
    assert report.complete and report.rewritten > 0 and n_deltas(url) == had + report.rewritten
    # A row the writer's deltas refer to stays as it was: a reader may hold those deltas already.
    after = {r["id"]: r for r in dbread.raw_calls(url)}
    assert all(after[r["id"]] == r for r in raw if r["id"] in bases)
    a, b = asyncio.run(everything(url, records)), asyncio.run(everything(twin, records))
    for key in a:
        assert a[key] == b[key], key


async def _compact(url: str, **kw) -> compact.CompactReport:
    engine = make_engine(url)
    try:
        return await compact_calls(engine, say=lambda m: None, **kw)
    finally:
        await engine.dispose()


def _run_state(url: str) -> str | None:
    async def get():
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(select(StoreInfo.value).where(StoreInfo.key == RUN_KEY))).scalar()
        finally:
            await engine.dispose()

    return asyncio.run(get())


def test_a_run_that_dies_inside_a_batch_loses_nothing_and_the_next_goes_on(two_urls, monkeypatch):
    url, twin = two_urls
    records = whole_twins(two_urls, 5)
    sids = sorted({r.session_id for r in records})
    real = compact._batch
    seen = []

    async def dies_in_the_second(conn, ids, report, dry_run):
        await real(conn, ids, report, dry_run)  # the second batch's UPDATEs run, then the process "dies"
        seen.append(ids)
        if len(seen) == 2:
            raise ConnectionResetError("killed")

    monkeypatch.setattr(compact, "_batch", dies_in_the_second)
    with pytest.raises(ConnectionResetError):
        asyncio.run(_compact(url, batch_sessions=1))
    monkeypatch.setattr(compact, "_batch", real)
    assert n_deltas(url, sids[0]) > 0 and n_deltas(url, sids[1]) == 0  # rolled back whole
    assert sids[0] in (_run_state(url) or "")

    # SIGINT (or SIGTERM) stops after the batch in flight, which commits.
    calls = []

    def interrupt_in_the_first_batch() -> bool:
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return False

    with StopOnSignal() as stop:  # the command's handler (trainwire/cli.py)
        report = asyncio.run(
            _compact(url, batch_sessions=1, should_stop=lambda: stop.requested or interrupt_in_the_first_batch())
        )
    assert report.interrupted and report.resumed_after == sids[0] and report.sessions == 1
    assert n_deltas(url, sids[1]) > 0 and n_deltas(url, sids[2]) == 0

    done = cli("compact-calls", "--database-url", url)
    assert done.returncode == 0 and f"resuming after session {sids[1]!r}, 1 sessions" in done.stdout, done.stdout
    assert _run_state(url) is None and all(n_deltas(url, sid) > 0 for sid in sids)
    a, b = asyncio.run(everything(url, records)), asyncio.run(everything(twin, records))
    for key in a:
        assert a[key] == b[key], key


def test_a_store_behind_the_schema_is_told_to_migrate_first(pg, tmp_path):
    url = pg.create_database("t_" + uuid.uuid4().hex[:12])
    behind = cli("compact-calls", "--database-url", url)
    assert behind.returncode == 2 and "trainwire migrate" in behind.stderr, behind.stderr
    assert cli("prune", "--database-url", url, "--older-than-days", "1").returncode == 2
    # SQLite makes its own schema, as `serve` does.
    fresh = cli("prune", "--database-url", f"sqlite+aiosqlite:///{tmp_path}/new.db", "--older-than-days", "1")
    assert fresh.returncode == 0 and "0 trained or skipped sessions" in fresh.stdout, fresh.stderr


# --- prune -----------------------------------------------------------------------------------------------

NOW = datetime.now(UTC)


def _prune_store(url: str) -> dict[str, str]:
    """Sessions of every kind prune must tell apart, written through the writer (with deltas); returns each
    session's role."""
    roles = {
        "old-trained-1": "trained",
        "old-trained-2": "trained",
        "old-skipped": "skipped",
        "old-open": "open",
        "old-claimed": "claimed",
        "new-trained": "trained",
    }
    records = []
    for i, sid in enumerate(roles):
        recs = sessions(10 + i)
        start = NOW - (timedelta(days=2) if sid.startswith("new") else timedelta(days=40))
        for n, r in enumerate(r for r in recs if r.session_id == "s0"):
            r.session_id, r.id = sid, f"{sid}-{n}"
            r.started_at = r.finished_at = start + timedelta(seconds=n)
            records.append(r)
    asyncio.run(write(url, records, True, random.Random(7)))

    async def statuses():
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                for sid, status in roles.items():
                    await conn.execute(update(Session).where(Session.id == sid).values(status=status))
        finally:
            await engine.dispose()

    asyncio.run(statuses())
    return roles


async def _reads(url: str, sids) -> dict:
    engine = make_engine(url)
    try:
        out: dict = {}
        for sid in sids:
            for tokens in (False, True):
                detail = await get_session(engine, sid, tokens=tokens)
                out[f"session {sid} {tokens}"] = detail.model_dump() if detail else None
                for c in detail.calls if detail else []:
                    call = await get_call(engine, c.id, tokens=tokens)
                    out[f"call {c.id} {tokens}"] = call.model_dump() if call else None
        out["list"] = (await list_sessions(engine, limit=100)).model_dump()
        out["has"] = {
            has: sorted(x.id for x in (await list_sessions(engine, limit=100, has=[has])).data)
            for has in ("failed", "untrainable")
        }
        out["stats"] = (await stats(engine)).model_dump()
        out["export"] = [row async for page in pages(engine, _filters(None, None, None, None, True)) for row in page]
        return out
    finally:
        await engine.dispose()


def test_prune_drops_only_old_finished_sessions_bodies_after_archiving_them(db_url, tmp_path, start_proxy, upstream):
    pq = pytest.importorskip("pyarrow.parquet")
    roles = _prune_store(db_url)
    pruned = {"old-trained-1", "old-trained-2", "old-skipped"}
    kept = set(roles) - pruned
    full = {r["id"]: r for r in dbread.calls(db_url)}
    assert n_deltas(db_url) > 0
    kept_before = asyncio.run(_reads(db_url, sorted(kept)))
    raw_before = {r["id"]: r for r in dbread.raw_calls(db_url)}

    dry = cli("prune", "--database-url", db_url, "--older-than-days", "30", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "3/3 sessions would be pruned" in dry.stdout and not any(s["pruned_at"] for s in dbread.sessions(db_url))
    missing = cli("prune", "--database-url", db_url)
    assert missing.returncode == 2 and "--older-than-days is required" in missing.stderr

    archive = tmp_path / "archive"
    run = cli(
        "prune",
        "--database-url",
        db_url,
        "--older-than-days",
        "30",
        "--archive-dir",
        str(archive),
        "--batch-sessions",
        "2",
    )
    assert run.returncode == 0, run.stderr
    assert "3/3 sessions pruned" in run.stdout and "archived in 2 files" in run.stdout, run.stdout

    files = sorted(Path(archive).glob("trainwire-pruned-*.parquet"))
    assert len(files) == 2 and not list(Path(archive).glob(".*"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert {r["session_id"] for r in rows} == pruned
    assert sorted(r["call_id"] for r in rows) == sorted(cid for cid, c in full.items() if c["session_id"] in pruned)
    for r in rows:  # the archive holds the calls whole, also those stored as deltas
        c = full[r["call_id"]]
        assert orjson.loads(r["request"]) == c["request"] and orjson.loads(r["response"]) == c["response"]
        assert r["prompt_token_ids"] == c["prompt_token_ids"] and r["logprobs"] == c["logprobs"]

    by_id = {s["id"]: s for s in dbread.sessions(db_url)}
    assert {sid for sid, s in by_id.items() if s["pruned_at"] is not None} == pruned
    assert by_id["old-trained-1"]["status"] == "trained"  # the trainer's record of it stays
    for r in dbread.raw_calls(db_url):
        bodies = [
            r[k]
            for k in (
                "request",
                "response",
                "prompt_token_ids",
                "completion_token_ids",
                "logprobs",
                "base_call_id",
                "prompt_prefix_len",
                "messages_prefix_len",
            )
        ]
        if r["session_id"] in pruned:
            assert bodies == [None] * 8 and r["model_requested"] == full[r["id"]]["model_requested"]
        else:
            assert r == raw_before[r["id"]]

    after = asyncio.run(_reads(db_url, sorted(roles)))
    for key, value in kept_before.items():
        if key not in ("list", "stats", "export"):
            assert after[key] == value, key
    detail = after["session old-trained-1 True"]
    assert detail["calls"] and all(
        c["input"] is None and c["output"] is None and c["prompt_token_ids"] is None for c in detail["calls"]
    )
    assert {s["id"] for s in after["list"]["data"]} == set(roles)
    # The list says which sessions were pruned. Pruning drops bodies; it does not make a call failed or
    # untrainable: a pruned session's failed calls count as before, and its untrainable ones are those its kept
    # columns tell (failed, a stored reason), never the token ids prune dropped. has= agrees.
    listed = {s["id"]: s for s in after["list"]["data"]}
    listed_before = {s["id"]: s for s in kept_before["list"]["data"]}
    assert {sid for sid, s in listed.items() if s["pruned_at"] is not None} == pruned
    for sid in roles:
        assert listed[sid]["n_failed"] == listed_before[sid]["n_failed"], sid
        expected = (
            listed_before[sid]["n_untrainable"]
            if sid in kept
            else sum(
                1
                for c in full.values()
                if c["session_id"] == sid and c["trainable"] and (c["status_code"] != 200 or c["untrainable_reason"])
            )
        )
        assert listed[sid]["n_untrainable"] == expected <= listed_before[sid]["n_untrainable"], sid
        assert after[f"session {sid} False"]["n_untrainable"] == expected, sid
    assert after["has"]["failed"] == kept_before["has"]["failed"]
    assert after["has"]["untrainable"] == sorted(sid for sid, s in listed.items() if s["n_untrainable"])
    assert all(
        c["train"]["reason"] in (None, PRUNED_REASON) or c["status_code"] != 200
        for c in detail["calls"]
        if c["trainable"]
    )
    assert [r for r in after["export"] if r["session_id"] in kept] == [
        r for r in kept_before["export"] if r["session_id"] in kept
    ]
    assert not any(r["session_id"] in pruned for r in after["export"])  # they are in the archive

    # The read API says which sessions were pruned.
    proxy = start_proxy("--upstream", upstream.url, "--database-url", db_url, "--journal-dir", str(tmp_path / "j"))
    pruned_detail = httpx.get(f"{proxy.url}/sessions/old-trained-1?tokens=true").json()
    assert pruned_detail["pruned_at"] is not None and pruned_detail["status"] == "trained"
    assert all(c["input"] is None and c["prompt_token_ids"] is None for c in pruned_detail["calls"])
    assert httpx.get(f"{proxy.url}/sessions/new-trained").json()["pruned_at"] is None
    first = pruned_detail["calls"][0]["id"]
    assert httpx.get(f"{proxy.url}/calls/{first}").json()["request"] is None
    page = httpx.get(f"{proxy.url}/sessions?limit=100")
    assert page.status_code == 200
    assert {x["id"] for x in page.json()["data"] if x["pruned_at"]} == pruned
    proxy.stop()

    again = cli("prune", "--database-url", db_url, "--older-than-days", "30", "--archive-dir", str(archive))
    assert again.returncode == 0 and "0 trained or skipped sessions" in again.stdout, again.stdout
    assert len(list(Path(archive).glob("*.parquet"))) == 2
    # Compaction leaves pruned sessions alone and still compacts the others.
    comp = cli("compact-calls", "--database-url", db_url)
    assert comp.returncode == 0 and "3 sessions to look at" in comp.stdout, comp.stdout
