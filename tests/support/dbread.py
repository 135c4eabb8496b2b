"""Read the store back in tests (plain SQL through the same engine code the product uses)."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from trainwire.store.db import make_engine
from trainwire.store.models import Call, Reward, Session


async def _fetch(url: str, stmt):
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(stmt)).mappings().all()
    finally:
        await engine.dispose()


def rows(url: str, table) -> list[dict]:
    """Every row of a table, as stored."""
    return [dict(r) for r in asyncio.run(_fetch(url, select(table)))]


def raw_calls(url: str, session_id: str | None = None) -> list[dict]:
    """The rows as stored: a call stored as a delta (store/call_deltas.py) holds only what it adds."""
    stmt = select(Call.__table__).order_by(Call.started_at, Call.seq)
    if session_id:
        stmt = stmt.where(Call.session_id == session_id)
    return [dict(r) for r in asyncio.run(_fetch(url, stmt))]


def calls(url: str, session_id: str | None = None) -> list[dict]:
    """The rows as every reader sees them: `request` and `prompt_token_ids` full, also for deltas (whose delta
    columns still say how they are stored)."""
    from trainwire.store.delta_reads import full_rows

    async def fetch():
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                stmt = select(Call.__table__).order_by(Call.started_at, Call.seq)
                if session_id:
                    stmt = stmt.where(Call.session_id == session_id)
                return await full_rows(conn, (await conn.execute(stmt)).mappings().all(), tokens=True)
        finally:
            await engine.dispose()

    return asyncio.run(fetch())


def sessions(url: str) -> list[dict]:
    return [dict(r) for r in asyncio.run(_fetch(url, select(Session.__table__)))]


def rewards(url: str) -> list[dict]:
    return [dict(r) for r in asyncio.run(_fetch(url, select(Reward.__table__).order_by(Reward.id)))]


def wait_calls(url: str, n: int, session_id: str | None = None, timeout: float = 10.0) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        rows = calls(url, session_id)
        if len(rows) >= n or time.time() > deadline:
            return rows
        time.sleep(0.05)


def insert_calls(url: str, rows: list[dict]) -> None:
    """Write call records the way the proxy's write path does (sessions upserted too). Rows are dicts of
    CallRecord fields; the ones left out take CallRecord's defaults."""
    from trainwire.records import CallRecord
    from trainwire.store.write_sql import write_batch

    async def write():
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                await write_batch(conn, [CallRecord(**row) for row in rows])
        finally:
            await engine.dispose()

    asyncio.run(write())
