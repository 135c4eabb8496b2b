"""Rewards: the list, newest first, with whether each is orphaned (no call of its session was recorded)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.models import Reward
from trainwire.store.read_models import Page, RewardListItem
from trainwire.store.reads.cursors import encode_cursor, int_cursor, paged
from trainwire.store.reads.derived import ORPHANED
from trainwire.store.rewards import reward_dict

R = Reward.__table__


async def list_rewards(
    engine: AsyncEngine,
    *,
    session_id: str | None = None,
    source: str | None = None,
    final: bool | None = None,
    orphaned: bool | None = None,
    limit: int = 50,
    cursor: str | None = None,
    offset: int | None = None,
) -> Page[RewardListItem]:
    """Rewards, newest (highest id) first. Raises `BadQuery` for a bad cursor. Text filters are checked at
    the API's boundary (proxy/plumbing.py: `admin`), not again here."""
    q = select(R, ORPHANED.label("orphaned"))
    if session_id:
        q = q.where(R.c.session_id == session_id)
    if source:
        q = q.where(R.c.source == source)
    if final is not None:
        q = q.where(R.c.final.is_(final))
    if orphaned is not None:
        q = q.where(ORPHANED if orphaned else ~ORPHANED)
    if cursor:
        q = q.where(R.c.id < int_cursor(cursor))
    q = paged(q.order_by(R.c.id.desc()), limit, offset, cursor)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    data = [RewardListItem(**reward_dict(r), orphaned=bool(r._mapping["orphaned"])) for r in rows]
    return Page[RewardListItem].of(data, encode_cursor(rows[-1].id) if more and rows else None)
