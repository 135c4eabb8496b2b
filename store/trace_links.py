"""Which recorded calls an agent's OTLP spans belong to (`POST /v1/traces`, proxy/otlp_routes.py).

Two lookups: the sessions whose calls carried a trace id (the agent's W3C `traceparent`, `calls.trace_id`,
migration 0006), and the calls of a session before a tool ran, newest first, optionally only those whose answer
mentions a tool call id (the proxy then checks the answer really requested it: that is per API, and the store
does not parse APIs).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.episodes import utc_of
from trainwire.store.models import Call

C = Call.__table__


@dataclass(frozen=True, slots=True)
class TracedCall:
    call_id: str
    session_id: str
    kind: str
    response: Any
    started_at: datetime
    finished_at: datetime
    status_code: int
    trace_id: str | None
    parent_span_id: str | None


async def sessions_of_traces(engine: AsyncEngine, trace_ids: Collection[str]) -> dict[str, list[str]]:
    """trace id -> the sessions whose calls carried it (usually one)."""
    if not trace_ids:
        return {}
    q = select(C.c.trace_id, C.c.session_id).where(C.c.trace_id.in_(list(trace_ids))).distinct()
    out: dict[str, list[str]] = {}
    async with engine.connect() as conn:
        for trace_id, session_id in (await conn.execute(q)).all():
            out.setdefault(trace_id, []).append(session_id)
    return out


async def existing_sessions(engine: AsyncEngine, session_ids: Collection[str]) -> set[str]:
    """Those of `session_ids` that have a recorded call."""
    if not session_ids:
        return set()
    q = select(C.c.session_id).where(C.c.session_id.in_(list(session_ids))).distinct()
    async with engine.connect() as conn:
        return {row[0] for row in (await conn.execute(q)).all()}


async def calls_before(
    engine: AsyncEngine,
    session_id: str,
    *,
    before: datetime,
    mentioning: str | None = None,
    limit: int = 32,
) -> list[TracedCall]:
    """Calls of a session started at or before `before`, newest first; with `mentioning`, only those whose
    stored answer contains that text (a tool call id; a cheap prefilter, jsonb as text on Postgres)."""
    q = select(
        C.c.id,
        C.c.session_id,
        C.c.kind,
        C.c.response,
        C.c.started_at,
        C.c.finished_at,
        C.c.status_code,
        C.c.trace_id,
        C.c.parent_span_id,
    ).where(C.c.session_id == session_id, C.c.started_at <= before)
    if mentioning is not None:
        q = q.where(cast(C.c.response, Text).contains(mentioning, autoescape=True))
    q = q.order_by(C.c.started_at.desc(), C.c.seq.desc()).limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [
        TracedCall(
            call_id=r.id,
            session_id=r.session_id,
            kind=r.kind,
            response=r.response,
            started_at=utc_of(r.started_at),
            finished_at=utc_of(r.finished_at),
            status_code=r.status_code,
            trace_id=r.trace_id,
            parent_span_id=r.parent_span_id,
        )
        for r in rows
    ]
