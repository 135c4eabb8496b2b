"""The write path's one interface to the database: `write_batch` writes calls (with their sessions) and
automatic rewards in the caller's transaction, in the dialect's own SQL (store/write_postgres.py,
store/write_sqlite.py). Both are idempotent: a call id or a reward's idempotency key that is already stored is
skipped, so a retried batch or a replayed spool file cannot write anything twice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import ModuleType

from trainwire.records import CallRecord, RewardRecord


@dataclass(slots=True)
class SessionRow:
    """What one batch adds to a session row: its calls, first and last call times, and task."""

    id: str
    task_id: str | None
    n_calls: int
    first_call_at: datetime
    last_call_at: datetime


def session_rows(calls: Sequence[CallRecord]) -> list[SessionRow]:
    """One upsert row per session a batch touches, in id order, so concurrent writers (several workers or
    replicas) lock session rows in the same order and cannot deadlock."""
    rows: dict[str, SessionRow] = {}
    for c in calls:
        row = rows.get(c.session_id)
        if row is None:
            rows[c.session_id] = SessionRow(c.session_id, c.task_id, 1, c.started_at, c.started_at)
        else:
            row.n_calls += 1
            row.first_call_at = min(row.first_call_at, c.started_at)
            row.last_call_at = max(row.last_call_at, c.started_at)
            row.task_id = row.task_id or c.task_id
    return sorted(rows.values(), key=lambda r: r.id)


def dialect(name: str) -> ModuleType:
    """The module with `write_calls(conn, calls)` and `write_rewards(conn, rewards)` for a database dialect."""
    from trainwire.store import write_postgres, write_sqlite

    found = {"postgresql": write_postgres, "sqlite": write_sqlite}.get(name)
    if found is None:
        raise ValueError(f"no write path for database dialect {name!r} (Postgres and SQLite are supported)")
    return found


async def write_batch(
    conn, calls: Sequence[CallRecord], rewards: Sequence[RewardRecord] = (), *, dedupe: bool = False
) -> None:
    """Calls first, then automatic rewards: a rule's reward is queued just before its call, so both normally
    land in one transaction (rewards have no foreign key either way).

    With `dedupe` (a replayed journal, a retried batch whose commit may have gone through) rows already stored
    are left out first, so a session's call count is not raised twice for one call."""
    sql = dialect(conn.dialect.name)
    if dedupe:
        calls, rewards = await _unstored(conn, calls, rewards)
    if calls:
        await sql.write_calls(conn, calls)
    if rewards:
        await sql.write_rewards(conn, rewards)


async def _unstored(conn, calls: Sequence[CallRecord], rewards: Sequence[RewardRecord]):
    from sqlalchemy import select

    from trainwire.store.models import Call, Reward

    if calls:
        ids = [c.id for c in calls]
        stored = set((await conn.execute(select(Call.__table__.c.id).where(Call.__table__.c.id.in_(ids)))).scalars())
        calls = [c for c in calls if c.id not in stored]
    if rewards:
        keys = [r.idempotency_key for r in rewards]
        col = Reward.__table__.c.idempotency_key
        stored = set((await conn.execute(select(col).where(col.in_(keys)))).scalars())
        rewards = [r for r in rewards if r.idempotency_key not in stored]
    return calls, rewards
