"""Calls stored as deltas stay readable, or say they are not, whatever runs beside the reader: a reader racing
`trainwire compact-calls` loads every base its rows reach (store/delta_reads.py), and no delta is stored
against, or read wrongly from, a call whose body `trainwire prune` dropped (store/writer.py's `DeltaCache`
expiry, `call_deltas.expand`'s checks)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, update

from tests.support import dbread
from tests.unit.test_call_deltas import rec
from trainwire.store import delta_reads
from trainwire.store.call_deltas import encode, remember
from trainwire.store.db import make_engine
from trainwire.store.delta_reads import DELTA_COLS, full_rows
from trainwire.store.models import Call
from trainwire.store.write_sql import write_batch

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
                    await other.execute(update(C).where(C.c.id == "b").values(
                        base_call_id="a", prompt_prefix_len=row_b.prompt_prefix_len,
                        messages_prefix_len=row_b.messages_prefix_len, prompt_token_ids=row_b.prompt_token_ids,
                        request=row_b.request))

            async with engine.connect() as conn:
                rows = [r._mapping for r in (await conn.execute(select(*_LOAD).where(C.c.id == "d"))).all()]
                racing = RacingConn(conn, 2, compact_b)   # 1: the bases' sessions, 2: the graph, 3: the rows
                (full,) = await full_rows(racing, rows, tokens=True)
                assert racing.n > 3   # it went back for A
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
                await write_batch(conn, [encode([remember(a)], b)])   # A never written
            async with engine.connect() as conn:
                rows = [r._mapping for r in (await conn.execute(select(*_LOAD))).all()]
                racing = RacingConn(conn, 0, None)
                with pytest.raises(MissingBase):
                    await full_rows(racing, rows, tokens=True)
                assert racing.n <= 3 * delta_reads.LOAD_ROUNDS
        finally:
            await engine.dispose()

    asyncio.run(go())
