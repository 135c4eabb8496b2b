"""Rewards as the user posts them: stored exactly once, or refused with nothing stored.

- Exactly once: an idempotency key is unique in the database. A post whose key is already stored gets the
  stored reward back (`duplicate`); concurrent posts with one key race on the unique index and the loser
  reads the winner back. The same key with a different body is refused.
- One final reward per session (unique partial index). The final reward (or a close without one, `value`
  null) is what makes a session *finished*; it is copied onto `sessions.finished_at` / `final_reward` when the
  session row exists (and by the write path once it appears, see `store.writer.adopt_final_rewards`).
- A reward whose session has no row is kept and counts as *orphaned* until the session appears. The trainer
  claims sessions, never bare rewards, so an orphaned reward is never trained on.
- Once the trainer has claimed a session, rewards can no longer change what it trains on: refused (409).

Automatic rewards (AIR) do not come through here: they are queued on the batched writer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, and_, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.records import text_problem
from trainwire.store.models import Call, Reward, Session, utcnow

# Tables (SQLAlchemy types __table__ as its FromClause base).
R: Table = Reward.__table__  # type: ignore[assignment]
S: Table = Session.__table__  # type: ignore[assignment]
C: Table = Call.__table__  # type: ignore[assignment]

# Sessions in these states are the trainer's: their rewards are frozen.
TRAINER_STATES = ("claimed", "trained", "skipped")


class RewardError(Exception):
    """A refused reward: `status` is the HTTP status, `message` says exactly what is wrong."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass(slots=True)
class NewReward:
    session_id: str
    value: float | None
    final: bool
    call_id: str | None = None
    source: str = "user"
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None

    def same_as(self, row) -> bool:
        """Does a stored reward record exactly this request (for idempotent replays)?"""
        m = row._mapping
        return (
            m["session_id"] == self.session_id
            and m["call_id"] == self.call_id
            and bool(m["final"]) == self.final
            and _same_value(m["value"], self.value)
            and m["source"] == self.source
            and (m["metadata"] or None) == (self.metadata or None)
        )


@dataclass(slots=True)
class Stored:
    reward: dict[str, Any]
    duplicate: bool
    orphaned: bool


def _same_value(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return float(a) == float(b)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; everything the store writes is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def reward_dict(row) -> dict[str, Any]:
    m = row._mapping if hasattr(row, "_mapping") else row
    return {
        "object": "reward",
        "id": m["id"],
        "session_id": m["session_id"],
        "call_id": m["call_id"],
        "final": bool(m["final"]),
        "value": None if m["value"] is None else float(m["value"]),
        "source": m["source"],
        "idempotency_key": m["idempotency_key"],
        "metadata": m["metadata"],
        "created_at": aware(m["created_at"]),
    }


async def call_session(engine: AsyncEngine, call_id: str) -> str | None:
    async with engine.connect() as conn:
        return (await conn.execute(select(C.c.session_id).where(C.c.id == call_id))).scalar()


async def session_exists(engine: AsyncEngine, session_id: str) -> bool:
    async with engine.connect() as conn:
        return (await conn.execute(select(S.c.id).where(S.c.id == session_id))).first() is not None


async def by_key(conn, key: str):
    return (await conn.execute(select(R).where(R.c.idempotency_key == key))).first()


def _replay(row, new: NewReward, orphaned: bool) -> Stored:
    if not new.same_as(row):
        raise RewardError(
            422,
            f"idempotency key {new.idempotency_key!r} was already used for a different reward "
            f"(#{row.id}: session {row.session_id!r}, call {row.call_id!r}, value {row.value!r}, "
            f"final {bool(row.final)}, source {row.source!r}); send a new key for a new reward",
            code="idempotency_key_reused",
            param="idempotency_key",
        )
    return Stored(reward_dict(row), duplicate=True, orphaned=orphaned)


def _closed(session_id: str, row) -> RewardError:
    what = f"final reward {row.value!r}" if row.value is not None else "a close without a reward (/finish)"
    created = aware(row.created_at)
    return RewardError(
        409,
        f"session {session_id!r} is already closed: it has {what} (#{row.id}, "
        f"{created.isoformat() if created else 'unknown time'}); a session takes one final "
        f"reward",
        code="session_closed",
        param="session_id",
    )


async def store_reward(engine: AsyncEngine, new: NewReward) -> Stored:
    """Store one user reward or raise `RewardError` with nothing stored. The caller has already flushed the
    session's queued calls and checked that `call_id` (if any) belongs to the session."""
    if new.idempotency_key:
        async with engine.connect() as conn:
            row = await by_key(conn, new.idempotency_key)
        if row is not None:
            return _replay(row, new, not await session_exists(engine, row.session_id))
    try:
        async with engine.begin() as conn:
            # Lock the session row: a trainer claiming it (FOR UPDATE SKIP LOCKED) waits for this reward or
            # this reward sees the claim. (SQLite serializes writers instead.)
            session = (await conn.execute(select(S.c.status).where(S.c.id == new.session_id).with_for_update())).first()
            if new.idempotency_key:
                row = await by_key(conn, new.idempotency_key)  # a concurrent post won while we waited
                if row is not None:
                    return _replay(row, new, session is None)
            if session is not None and session.status in TRAINER_STATES:
                raise RewardError(
                    409,
                    f"session {new.session_id!r} is already {session.status} by the trainer; "
                    f"a reward can no longer change what it trained on",
                    code="session_claimed",
                    param="session_id",
                )
            if new.final:
                closed = (
                    await conn.execute(select(R).where(R.c.session_id == new.session_id, R.c.final.is_(True)))
                ).first()
                if closed is not None:
                    if new.idempotency_key and closed.idempotency_key == new.idempotency_key:
                        # Without row locks (SQLite) a concurrent post with this key can commit between the
                        # key check above and this one.
                        return _replay(closed, new, session is None)
                    raise _closed(new.session_id, closed)
            now = utcnow()
            row = (
                await conn.execute(
                    R.insert()
                    .values(
                        session_id=new.session_id,
                        call_id=new.call_id,
                        value=new.value,
                        final=new.final,
                        source=new.source,
                        idempotency_key=new.idempotency_key,
                        metadata=new.metadata,
                        created_at=now,
                    )
                    .returning(*R.c)
                )
            ).first()
            if new.final and session is not None:
                await conn.execute(
                    update(S).where(S.c.id == new.session_id).values(finished_at=now, final_reward=new.value)
                )
            return Stored(reward_dict(row), duplicate=False, orphaned=session is None)
    except IntegrityError:
        # A concurrent post got there first: the same key (answer as it was answered), or another final.
        async with engine.connect() as conn:
            if new.idempotency_key:
                row = await by_key(conn, new.idempotency_key)
                if row is not None:
                    return _replay(row, new, not await session_exists(engine, row.session_id))
            if new.final:
                closed = (
                    await conn.execute(select(R).where(R.c.session_id == new.session_id, R.c.final.is_(True)))
                ).first()
                if closed is not None:
                    raise _closed(new.session_id, closed) from None
        raise


MAX_JSON_DEPTH = 64


def check_storable_json(value: Any, where: str, depth: int = 0) -> None:
    """Raise ValueError naming the place (`metadata.a[2]`) of what no database or consumer takes: NaN and
    Infinity (JSON parsers accept the literals; Postgres JSONB and every consumer do not), numbers of magnitude
    2**63 or more, the NUL character in
    a key or a string (Postgres refuses it in text and jsonb), a lone surrogate (no driver can encode it), and
    nesting deeper than MAX_JSON_DEPTH (the JSON encoders stop well before a parser does)."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} contains {value!r}; only finite numbers are allowed")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 2**63:
        # Postgres keeps JSON numbers as exact decimals: 1e30 comes back as a 31-digit integer, which no JSON
        # encoder of the read API, the export or the trainer takes.
        raise ValueError(
            f"{where} is a number of magnitude 2**63 or more ({value!r}), which does not round-trip "
            f"through the database; send it as a string"
        )
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, f"{where} (a key)")
            check_storable_json(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_storable_json(v, f"{where}[{i}]", depth + 1)


def _check_text(text: str, where: str) -> None:
    problem = text_problem(text)
    if problem:
        raise ValueError(f"{where} {problem}")


# --- admin: removing rewards -----------------------------------------------------------------------------


async def delete_rewards(
    engine: AsyncEngine, *, reward_id: int | None = None, source: str | None = None, session_id: str | None = None
) -> int:
    """Remove rewards (e.g. all of one AIR rule). Rewards of sessions the trainer has claimed stay: they are
    history. Removing a final reward reopens its session."""
    claimed = exists().where(S.c.id == R.c.session_id, S.c.status.in_(TRAINER_STATES))
    cond = [~claimed]
    if reward_id is not None:
        cond.append(R.c.id == reward_id)
    if source is not None:
        cond.append(R.c.source == source)
    if session_id is not None:
        cond.append(R.c.session_id == session_id)
    async with engine.begin() as conn:
        rows = (await conn.execute(R.delete().where(and_(*cond)).returning(R.c.session_id, R.c.final))).all()
        reopened = sorted({r.session_id for r in rows if r.final})
        if reopened:
            await conn.execute(update(S).where(S.c.id.in_(reopened)).values(finished_at=None, final_reward=None))
    return len(rows)
