"""Retire sessions too stale to train, in SQL, before the trainer forms a batch.

The trainer claims the oldest finished sessions first (:mod:`trainwire.store.claims`). When a backlog built up,
it used to claim, load and skip batch after batch of sessions served more than ``--max-staleness`` versions ago
while fresh ones waited behind them. One ``UPDATE`` now marks every finished open session that has a trainable,
answered policy call served by a version older than the bound ``skipped`` (reason :data:`STALE_REASON`); the
claim then only sees sessions within the bound, oldest first: those are the next to cross it, and with an
off-policy correction (``trainwire train --off-policy``) they train as well as fresh ones.

A call without a policy version counts as version 0 (the base model), as in :mod:`trainwire.rl.transitions`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table, and_, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.db import write_tx
from trainwire.store.models import Call, Reward, Session

__all__ = ["STALE_REASON", "retire_stale"]

STALE_REASON = "stale: served by a policy version older than --max-staleness allows"

# Tables (SQLAlchemy types __table__ as its FromClause base).
S: Table = Session.__table__  # type: ignore[assignment]
C: Table = Call.__table__  # type: ignore[assignment]
R: Table = Reward.__table__  # type: ignore[assignment]


async def retire_stale(engine: AsyncEngine, *, oldest_fresh: int, train_agents: Sequence[str] = ()) -> int:
    """Finished (final reward recorded), unclaimed sessions with a trainable call of ``train_agents`` (empty: any)
    answered by a policy version below ``oldest_fresh`` become ``skipped``. Returns how many."""
    if oldest_fresh <= 0:
        return 0
    stale_call = [
        C.c.session_id == S.c.id,
        C.c.trainable == True,  # noqa: E712
        C.c.status_code == 200,
        func.coalesce(C.c.policy_version, 0) < oldest_fresh,
    ]
    if train_agents:
        stale_call.append(C.c.agent_name.in_(list(train_agents)))
    finished = exists(select(R.c.id).where(R.c.session_id == S.c.id, R.c.final == True))  # noqa: E712
    stmt = (
        update(S)
        .where(S.c.status == "open", finished, exists(select(C.c.id).where(and_(*stale_call))))
        .values(status="skipped", skip_reason=STALE_REASON)
    )
    async with write_tx(engine) as conn:
        return (await conn.execute(stmt)).rowcount
