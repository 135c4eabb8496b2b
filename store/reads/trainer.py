"""What the trainer did: its optimizer steps and the weights it published, newest first."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.models import PolicyVersion, TrainStep, UpstreamVersion
from trainwire.store.read_models import Page, PolicyVersionRow, TrainStepRow
from trainwire.store.reads.cursors import INT32, encode_cursor, int_cursor, paged

T, P, U = TrainStep.__table__, PolicyVersion.__table__, UpstreamVersion.__table__


def _int_keyset(table, key, limit: int, cursor: str | None, offset: int | None):
    """Rows of `table` by `key` descending (a unique Integer column): keyset after `cursor`, or `offset`. The
    cursor is checked here, before any connection is taken."""
    q = select(table)
    if cursor:
        q = q.where(key < int_cursor(cursor, INT32))
    return paged(q.order_by(key.desc()), limit, offset, cursor)


async def _page(conn, q, limit: int):
    """(rows of the page, whether there are more)."""
    rows = [r._mapping for r in (await conn.execute(q)).all()]
    return rows[:limit], len(rows) > limit


async def list_train_steps(
    engine: AsyncEngine, *, limit: int = 50, cursor: str | None = None, offset: int | None = None
) -> Page[TrainStepRow]:
    """The trainer's optimizer steps with their metrics, newest first. Raises `BadQuery` for a bad cursor."""
    q = _int_keyset(T, T.c.step, limit, cursor, offset)
    async with engine.connect() as conn:
        rows, more = await _page(conn, q, limit)
    data = [
        TrainStepRow(
            step=m["step"],
            policy_version=m["policy_version"],
            n_sessions=m["n_sessions"],
            n_samples=m["n_samples"],
            metrics=m["metrics"] or {},
            created_at=m["created_at"],
        )
        for m in rows
    ]
    return Page[TrainStepRow].of(data, encode_cursor(rows[-1]["step"]) if more and rows else None)


async def list_policy_versions(
    engine: AsyncEngine, *, limit: int = 50, cursor: str | None = None, offset: int | None = None
) -> Page[PolicyVersionRow]:
    """Published weights, newest first, each with the upstreams that serve it now (sorted). Raises
    `BadQuery` for a bad cursor."""
    q = _int_keyset(P, P.c.version, limit, cursor, offset)
    async with engine.connect() as conn:
        rows, more = await _page(conn, q, limit)
        serving = (await conn.execute(select(U.c.upstream, U.c.version).order_by(U.c.upstream))).all()
    by_version: dict[int, list[str]] = {}
    for upstream, version in serving:
        by_version.setdefault(version, []).append(upstream)
    data = [
        PolicyVersionRow(
            version=m["version"],
            kind=m["kind"],
            served_model=m["served_model"],
            path=m["path"],
            train_step=m["train_step"],
            status=m["status"],
            created_at=m["created_at"],
            serving_upstreams=by_version.get(m["version"], []),
        )
        for m in rows
    ]
    return Page[PolicyVersionRow].of(data, encode_cursor(rows[-1]["version"]) if more and rows else None)
