"""The proxy's admission control reads two things from the store (``trainwire serve --max-backlog``).

* :func:`rewarded_backlog`: sessions rewarded (their final reward is recorded, ``sessions.finished_at``) but not
  yet claimed by a trainer (``status = 'open'``): the work agents did that no step has taken up. One count over
  the ``ix_sessions_claimable`` index; the proxy caches it and refreshes it in the background, never per request.
* :func:`session_started`: whether a session already has a row, for a call of a session this proxy process has
  not seen (another worker served its first call). Only asked while the backlog is full.
"""

from __future__ import annotations

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.models import Session

__all__ = ["rewarded_backlog", "session_started"]

S: Table = Session.__table__  # type: ignore[assignment]


async def rewarded_backlog(engine: AsyncEngine) -> int:
    """Sessions with a final reward that no trainer has claimed yet."""
    stmt = select(func.count()).select_from(S).where(S.c.status == "open", S.c.finished_at.is_not(None))
    async with engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def session_started(engine: AsyncEngine, session_id: str) -> bool:
    """Whether the store holds the session (its first call was written)."""
    async with engine.connect() as conn:
        return (await conn.execute(select(S.c.id).where(S.c.id == session_id))).first() is not None
