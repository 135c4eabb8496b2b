"""Sessions: the list (filters, keyset pages) and one session with its calls in order (`get_session`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.records import text_problem
from trainwire.store.delta_reads import full_rows
from trainwire.store.models import Call, Reward, Session
from trainwire.store.read_models import (
    CallSummary,
    FinalReward,
    OrphanedSession,
    Page,
    RewardOut,
    SessionDetail,
    SessionSummary,
)
from trainwire.store.reads.calls import CALL_COLS, TOKEN_COLS, call_fields, rewards_where, token_fields
from trainwire.store.reads.cursors import BadQuery, encode_cursor, paged, time_id_cursor
from trainwire.store.reads.derived import STATUS, status_filter
from trainwire.store.reads.trainability import FAILED, PRUNED_REASON, UNTRAINED, count_of
from trainwire.store.rewards import aware

S, C, R = Session.__table__, Call.__table__, Reward.__table__

_SESSION_COLS = [
    S.c.id,
    S.c.task_id,
    S.c.status.label("raw_status"),
    STATUS.label("status"),
    S.c.n_calls,
    S.c.first_call_at,
    S.c.last_call_at,
    S.c.claimed_by,
    S.c.claimed_at,
    S.c.train_step,
    S.c.skip_reason,
    S.c.pruned_at,
]

# `has=` filters of the session list: sessions with at least one such call.
HAS = {"failed": FAILED, "untrainable": UNTRAINED}


def _session_select():
    fr = R.alias("fr")
    return select(
        *_SESSION_COLS,
        fr.c.id.label("fr_id"),
        fr.c.value.label("fr_value"),
        fr.c.source.label("fr_source"),
        fr.c.created_at.label("fr_created_at"),
    ).select_from(S.outerjoin(fr, and_(fr.c.session_id == S.c.id, fr.c.final.is_(True))))


def _session_fields(m) -> dict[str, Any]:
    final = None
    if m["fr_id"] is not None:
        final = FinalReward(id=m["fr_id"], value=m["fr_value"], source=m["fr_source"], created_at=m["fr_created_at"])
    return {
        "id": m["id"],
        "task_id": m["task_id"],
        "status": m["status"],
        "n_calls": m["n_calls"],
        "first_call_at": m["first_call_at"],
        "last_call_at": m["last_call_at"],
        "finished_at": final.created_at if final else None,
        "final_reward": final.value if final else None,
        "final": final,
        "claimed_by": m["claimed_by"],
        "claimed_at": m["claimed_at"],
        "train_step": m["train_step"],
        "skip_reason": m["skip_reason"],
        "pruned_at": m["pruned_at"],
    }


async def _agents_of(conn, session_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {sid: [] for sid in session_ids}
    if not session_ids:
        return out
    rows = (
        await conn.execute(
            select(C.c.session_id, C.c.agent_name)
            .where(C.c.session_id.in_(session_ids), C.c.agent_name.is_not(None))
            .distinct()
            .order_by(C.c.session_id, C.c.agent_name)
        )
    ).all()
    for sid, agent in rows:
        out[sid].append(agent)
    return out


async def _problems_of(conn, session_ids: list[str]) -> dict[str, tuple[int, int]]:
    """(failed calls, trainable calls that will not be trained) of each session: one aggregate for a page."""
    out = dict.fromkeys(session_ids, (0, 0))
    if not session_ids:
        return out
    rows = (
        await conn.execute(
            select(C.c.session_id, count_of(FAILED), count_of(UNTRAINED))
            .select_from(C.join(S, S.c.id == C.c.session_id))
            .where(C.c.session_id.in_(session_ids))
            .group_by(C.c.session_id)
        )
    ).all()
    for sid, failed, untrained in rows:
        out[sid] = (int(failed), int(untrained))
    return out


async def list_sessions(
    engine: AsyncEngine,
    *,
    status: str | None = None,
    task: str | None = None,
    agent: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    has: Sequence[str] = (),
    limit: int = 50,
    cursor: str | None = None,
    offset: int | None = None,
) -> Page[SessionSummary]:
    """Sessions active in [since, until), newest (by first call) first; `has` keeps the sessions with at least
    one call of each kind named (`HAS`: failed, untrainable). Raises `BadQuery` for a bad cursor or an unknown
    `has`. Text filters are checked at the API's boundary (proxy/plumbing.py: `admin`), not again here."""
    q = _session_select()
    if status:
        q = q.where(status_filter(status))
    if task:
        q = q.where(S.c.task_id == task)
    if agent:
        q = q.where(exists().where(C.c.session_id == S.c.id, C.c.agent_name == agent))
    for name in dict.fromkeys(has):
        if name not in HAS:
            raise BadQuery(f"has must be one of {', '.join(HAS)}; got {name[:40]!r}", "has")
        q = q.where(exists().where(C.c.session_id == S.c.id, HAS[name]))
    if since:
        q = q.where(S.c.last_call_at >= since)
    if until:
        q = q.where(S.c.first_call_at < until)
    if cursor:
        t, sid = time_id_cursor(cursor)
        q = q.where(or_(S.c.first_call_at < t, and_(S.c.first_call_at == t, S.c.id < sid)))
    q = paged(q.order_by(S.c.first_call_at.desc(), S.c.id.desc()), limit, offset, cursor)
    async with engine.connect() as conn:
        rows = [r._mapping for r in (await conn.execute(q)).all()]
        more = len(rows) > limit
        rows = rows[:limit]
        ids = [r["id"] for r in rows]
        agents = await _agents_of(conn, ids)
        problems = await _problems_of(conn, ids)
    data = [
        SessionSummary(
            **_session_fields(r),
            agents=agents[r["id"]],
            n_failed=problems[r["id"]][0],
            n_untrainable=problems[r["id"]][1],
        )
        for r in rows
    ]
    nxt = encode_cursor(aware(rows[-1]["first_call_at"]), rows[-1]["id"]) if more and rows else None
    return Page[SessionSummary].of(data, nxt)


async def get_session(
    engine: AsyncEngine, session_id: str, *, tokens: bool = False
) -> SessionDetail | OrphanedSession | None:
    """One session with its calls in order, each with its rewards and text; None if nothing is known (an id
    no stored one can equal, with NUL or a lone surrogate, included). A session with rewards but no calls
    comes back as an `OrphanedSession`."""
    if text_problem(session_id):
        return None
    cols = CALL_COLS + (TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        srow = (await conn.execute(_session_select().where(S.c.id == session_id))).first()
        rewards = await rewards_where(conn, R.c.session_id == session_id)
        if srow is None:
            if not rewards:
                return None
            final = next((r for r in rewards if r.final), None)
            return OrphanedSession(
                id=session_id,
                finished_at=final.created_at if final else None,
                final_reward=final.value if final else None,
                final=final,
                rewards=rewards,
            )
        loaded = [
            c._mapping
            for c in (
                await conn.execute(select(*cols).where(C.c.session_id == session_id).order_by(C.c.started_at, C.c.seq))
            ).all()
        ]
        calls = await full_rows(conn, loaded, tokens=tokens)
    by_call: dict[str, list[RewardOut]] = {}
    for r in rewards:
        if r.call_id:
            by_call.setdefault(r.call_id, []).append(r)
    summaries = [
        CallSummary(**call_fields(c, by_call.get(c["id"], [])), **(token_fields(c) if tokens else {})) for c in calls
    ]
    return SessionDetail(
        **_session_fields(srow._mapping),
        agents=sorted({c["agent_name"] for c in calls if c["agent_name"]}),
        n_failed=sum(1 for c in summaries if c.status_code != 200),
        n_untrainable=sum(
            1 for c in summaries if c.trainable and not c.train.trainable and c.train.reason != PRUNED_REASON
        ),
        calls=summaries,
        rewards=rewards,
    )
