"""Calls stored as deltas stay readable, or say they are not, whatever runs beside the reader: a reader racing
`trainwire compact-calls` loads every base its rows reach (store/delta_reads.py), and no delta is stored
against, or read wrongly from, a call whose body `trainwire prune` dropped (store/delta_cache.py's `DeltaCache`
expiry, `delta_expand.expand`'s checks)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from tests.support import dbread
from tests.unit.test_call_deltas import rec
from trainwire.store import delta_reads
from trainwire.store.call_deltas import encode, remember
from trainwire.store.db import make_engine
from trainwire.store.delta_cache import MAX_BASE_AGE_S
from trainwire.store.delta_reads import DELTA_COLS, full_rows
from trainwire.store.models import Call, Session
from trainwire.store.retention import prune
from trainwire.store.write_sql import write_batch
from trainwire.store.writer import BatchWriter

C = Call.__table__
_LOAD = [C.c.id, C.c.session_id, C.c.kind, C.c.request, C.c.prompt_token_ids, C.c.completion_token_ids, *DELTA_COLS]
M1 = [{"role": "user", "content": "one"}]
M2 = [*M1, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
M3 = [*M2, {"role": "assistant", "content": "four"}, {"role": "user", "content": "five"}]


def _chain():
    a = rec("a", [1, 2], [3], M1)
    b = rec("b", [1, 2, 3, 4], [5], M2)
    d = rec("d", [1, 2, 3, 4, 5, 6], [7], M3)
    for i, r in enumerate((a, b, d)):
        r.seq = i
    return a, b, d


class RacingConn:
    """A connection that runs `between` (on another connection) after its `after`-th statement: what a
    concurrent transaction committing between a reader's queries looks like."""

    def __init__(self, conn, after: int, between) -> None:
        self.conn, self.after, self.between, self.n = conn, after, between, 0

    async def execute(self, stmt, *args, **kw):
        result = await self.conn.execute(stmt, *args, **kw)
        self.n += 1
        if self.n == self.after:
            await self.between()
        return result


def test_a_reader_racing_compaction_still_loads_every_base(db_url):
    """A and B whole, D a delta of B (written while compaction's UPDATE of B was in flight, so the UPDATE did
    not see it). The reader's graph query sees B whole; compaction's rewrite of B into a delta of A commits
    before the reader loads B: the reader must go back for A."""
    a, b, d = _chain()

    async def go():
        engine = make_engine(db_url)
        try:
            async with engine.begin() as conn:
                await write_batch(conn, [a, b, encode([remember(b)], d)])
            row_b = encode([remember(a)], b)
            assert row_b.base_call_id == "a"

            async def compact_b():
                async with engine.begin() as other:
                    await other.execute(
                        update(C)
                        .where(C.c.id == "b")
                        .values(
                            base_call_id="a",
                            prompt_prefix_len=row_b.prompt_prefix_len,
                            messages_prefix_len=row_b.messages_prefix_len,
                            prompt_token_ids=row_b.prompt_token_ids,
                            request=row_b.request,
                        )
                    )

            async with engine.connect() as conn:
                rows = [r._mapping for r in (await conn.execute(select(*_LOAD).where(C.c.id == "d"))).all()]
                racing = RacingConn(conn, 2, compact_b)  # 1: the bases' sessions, 2: the graph, 3: the rows
                (full,) = await full_rows(racing, rows, tokens=True)
                assert racing.n > 3  # it went back for A
            return full
        finally:
            await engine.dispose()

    full = asyncio.run(go())
    assert full["prompt_token_ids"] == d.prompt_token_ids and full["request"] == d.request
    assert {r["id"]: r["base_call_id"] for r in dbread.raw_calls(db_url)} == {"a": None, "b": "a", "d": "b"}


def test_loading_bases_ends_when_a_base_is_really_missing(sqlite_url):
    from trainwire.store.call_deltas import MissingBase

    a, b, _ = _chain()

    async def go():
        engine = make_engine(sqlite_url)
        try:
            async with engine.begin() as conn:
                await write_batch(conn, [encode([remember(a)], b)])  # A never written
            async with engine.connect() as conn:
                rows = [r._mapping for r in (await conn.execute(select(*_LOAD))).all()]
                racing = RacingConn(conn, 0, None)
                with pytest.raises(MissingBase):
                    await full_rows(racing, rows, tokens=True)
                assert racing.n <= 3 * delta_reads.LOAD_ROUNDS
        finally:
            await engine.dispose()

    asyncio.run(go())


# --- no delta against a pruned call ------------------------------------------------------------------------


def _dated(records, sid: str, start: datetime):
    for i, r in enumerate(records):
        r.id, r.session_id = f"{sid}-{r.id}", sid
        r.started_at = r.finished_at = start + timedelta(seconds=i)
    return records


def test_no_call_is_stored_as_a_delta_of_a_call_prune_dropped(db_url):
    """The proxy's writer still caches a call of a session that prune then prunes (here: a call of two days
    ago, replayed from the journal, so cached just now); the session's next call must be stored whole, and so
    must one written by a proxy started later (an empty cache). A session of recent calls still gets deltas."""
    now = datetime.now(UTC)
    a, b, d = _dated(list(_chain()), "old", now - timedelta(days=2))
    b.started_at = b.finished_at = now
    d.started_at = d.finished_at = now + timedelta(seconds=1)
    fresh = _dated(list(_chain()), "recent", now)

    async def go():
        engine = make_engine(db_url)
        try:
            writer = BatchWriter(engine, interval_ms=2)
            await writer.start()
            try:
                for r in (a, *fresh):
                    writer.submit(r)
                    assert await writer.flush_session(r.session_id)
                async with engine.begin() as conn:
                    await conn.execute(update(Session).where(Session.id == "old").values(status="trained"))
                report = await prune(engine, older_than_days=1, say=lambda m: None)
                assert report.sessions == 1
                writer.submit(b)  # the cache holds `a`, whose body prune just dropped
                assert await writer.flush_session("old")
            finally:
                await writer.stop()
            later = BatchWriter(engine, interval_ms=2)  # a proxy started after the prune: nothing cached
            await later.start()
            try:
                later.submit(d)
                assert await later.flush_session("old")
            finally:
                await later.stop()
        finally:
            await engine.dispose()

    asyncio.run(go())
    raw = {r["id"]: r for r in dbread.raw_calls(db_url)}
    assert raw["old-a"]["request"] is None and raw["old-a"]["prompt_token_ids"] is None  # pruned
    assert raw["old-b"]["base_call_id"] is None and raw["old-b"]["prompt_prefix_len"] is None
    assert raw["old-d"]["base_call_id"] is None and raw["old-d"]["prompt_prefix_len"] is None
    assert raw["recent-b"]["base_call_id"] == "recent-a" and raw["recent-d"]["base_call_id"] == "recent-b"
    full = {r["id"]: r for r in dbread.calls(db_url)}
    for r in (b, d, *fresh):
        assert full[r.id]["prompt_token_ids"] == r.prompt_token_ids and full[r.id]["request"] == r.request


def test_a_batch_whose_bases_expire_while_it_waits_is_written_whole(sqlite_url):
    """A batch encoded against fresh bases, whose write only begins after they have expired (the database was
    away), is written from the whole records."""
    now = datetime.now(UTC)
    a, b, _ = _dated(list(_chain()), "s", now)

    async def go():
        engine = make_engine(sqlite_url)
        try:
            writer = BatchWriter(engine, interval_ms=2)
            await writer.start()
            writer.submit(a)
            assert await writer.flush_session("s")
            await writer.stop()
            stored, _, oldest = await writer._encode([b])
            assert stored[0].base_call_id == "s-a" and oldest == a.started_at.timestamp()
            # Now is an hour later than when the batch was encoded.
            assert await writer._write_with_retry(
                stored, [], whole=[b], oldest_base=time.time() - MAX_BASE_AGE_S - 1
            ) == {"s-b"}
        finally:
            await engine.dispose()

    asyncio.run(go())
    raw = {r["id"]: r for r in dbread.raw_calls(sqlite_url)}
    assert raw["s-b"]["base_call_id"] is None and raw["s-b"]["prompt_token_ids"] == b.prompt_token_ids


def test_prune_refuses_an_age_below_a_day(sqlite_url):
    from pydantic import ValidationError

    from trainwire.settings import PruneSettings

    with pytest.raises(ValidationError):
        PruneSettings(older_than_days=0.5)
    assert PruneSettings(older_than_days=1).older_than_days == 1

    async def go():
        engine = make_engine(sqlite_url)
        try:
            with pytest.raises(ValueError, match="at least 1"):
                await prune(engine, older_than_days=0.5, say=lambda m: None)
        finally:
            await engine.dispose()

    asyncio.run(go())
