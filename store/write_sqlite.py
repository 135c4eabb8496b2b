"""The write path's statements on SQLite (the embedded default): SQLAlchemy Core inserts and upserts."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table, and_, exists, func, select, update
from sqlalchemy.dialects.sqlite import insert

from trainwire.records import CallRecord, RewardRecord, as_row
from trainwire.store.models import Call, Reward, Session
from trainwire.store.write_sql import session_rows

S: Table = Session.__table__  # type: ignore[assignment]  # SQLAlchemy types it as its FromClause base
R: Table = Reward.__table__  # type: ignore[assignment]
CALLS: Table = Call.__table__  # type: ignore[assignment]


async def write_calls(conn, calls: Sequence[CallRecord]) -> None:
    """Insert calls (skipping ids already stored), upsert their sessions, adopt early final rewards."""
    await conn.execute(insert(CALLS).on_conflict_do_nothing(index_elements=["id"]), [as_row(c) for c in calls])
    stmt = insert(S)
    stmt = stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "n_calls": S.c.n_calls + stmt.excluded.n_calls,
            "last_call_at": func.max(S.c.last_call_at, stmt.excluded.last_call_at),
            "first_call_at": func.min(S.c.first_call_at, stmt.excluded.first_call_at),
            "task_id": func.coalesce(S.c.task_id, stmt.excluded.task_id),
        },
    )
    rows = session_rows(calls)
    await conn.execute(
        stmt,
        [
            {
                "id": r.id,
                "task_id": r.task_id,
                "n_calls": r.n_calls,
                "first_call_at": r.first_call_at,
                "last_call_at": r.last_call_at,
            }
            for r in rows
        ],
    )
    await adopt_final_rewards(conn, [r.id for r in rows])


async def adopt_final_rewards(conn, session_ids: list[str]) -> None:
    """A final reward can arrive before its session's first call is written (another proxy worker's queue):
    copy it onto the session row once the row exists, so `finished_at`/`final_reward` agree with the rewards
    table. Sessions that already have `finished_at`, or no final reward, are untouched (the common case)."""
    final = and_(R.c.session_id == S.c.id, R.c.final.is_(True))
    await conn.execute(
        update(S)
        .where(S.c.id.in_(session_ids), S.c.finished_at.is_(None), exists().where(final))
        .values(
            finished_at=select(R.c.created_at).where(final).scalar_subquery(),
            final_reward=select(R.c.value).where(final).scalar_subquery(),
        )
    )


async def write_rewards(conn, rewards: Sequence[RewardRecord]) -> None:
    """Insert automatic rewards; one whose idempotency key is already stored is skipped."""
    await conn.execute(
        insert(R).on_conflict_do_nothing(index_elements=["idempotency_key"]), [as_row(r) for r in rewards]
    )
