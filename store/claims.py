"""Claim finished sessions for training, exactly once, across concurrent trainers and crashes.

The trainer's whole read/write access to sessions, calls and rewards: it claims a batch here, gets plain
records back (:class:`ClaimedSession`, :class:`ClaimedCall` of store/episodes.py, no ORM objects) and reports the
outcome (``mark_trained``, ``mark_skipped``, ``release``). Nothing under ``trainwire.rl`` writes SQL.

A session is *finished* when its final reward row exists (``rewards.final``; ``value`` may be NULL for a
close without a reward) and that row is at least ``settle_s`` old, so calls still in the proxy's write
queue land before the trainer reads the episode. A finished session is claimable while
``sessions.status = 'open'``; a claim moves it to ``claimed`` (``claimed_by``, ``claimed_at``), and the
trainer then marks it ``trained`` or ``skipped``, or ``release``\\ s it back to ``open`` when its step fails.
Claims of a crashed trainer go back to ``open`` with :func:`release_stale_claims`; a trainer whose steps
run longer than that timeout keeps its claims with :func:`renew`.

Exactly once:

* Postgres: the candidate rows are selected ``FOR UPDATE OF sessions SKIP LOCKED`` and set to
  ``claimed`` in the same transaction, so two trainers never lock the same row and neither waits on the
  other; the ``UPDATE ... WHERE status = 'open'`` re-checks the state under the lock.
* SQLite: no row locks; the claim runs in a ``BEGIN IMMEDIATE`` transaction (takes the database's write
  lock up front, so claimers are serialised and the read sees the latest state) and each session is set
  with a conditional ``UPDATE ... WHERE status = 'open'``; only rows whose update count is 1 are kept.

Task groups (``group_by_task`` and ``group_size > 0``): only whole groups are claimed, a group being the
finished open sessions with one ``task_id``, and only when it has at least ``group_size`` of them or its
oldest final reward is older than ``group_timeout_s``. A session without a task id is a group of its own
and is claimable at once (no other session can complete it). Groups are taken oldest first while they fit
in ``batch_size`` sessions; the first group is always taken, cut to ``max(batch_size, group_size)``
oldest sessions if it is larger. With ``group_size = 0`` nothing waits: the oldest finished sessions are
claimed, up to ``batch_size``. With ``newest_first`` (``trainwire train --claim-order newest``) all of this runs
the other way: the groups whose newest session finished last, and the newest sessions, first.

After the claim commits, the episodes are loaded (store/episodes.py): trainable calls only (``calls.trainable``),
plus, for supervised fine-tuning, the calls of the frozen routes named in ``sft_from`` (``route = 'frozen'`` and
``model_requested`` one of them; these come with their recorded request and answer, since they have no token ids of
the policy's), of the selected agents only (``train_agents``; empty = all), ordered by ``(started_at, seq)``, each
with the sum of its intermediate rewards (non-final rewards with a value), the sampling settings it was sent with
and the proxy's ``untrainable_reason`` (the trainer decides what to skip: :mod:`trainwire.rl.transitions`). A
non-final reward posted without a ``call_id`` goes to the last loaded call that had finished when the reward was posted
(else the first); rewards on calls that were not loaded (other agents, not trainable) are not part of the episode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from trainwire.store.db import write_tx
from trainwire.store.episodes import ClaimedSession, load_episodes, utc_of
from trainwire.store.models import Call, Reward, Session, utcnow
from trainwire.store.rewards import aware

log = logging.getLogger("trainwire.claim")

__all__ = [
    "claim_batch",
    "pick_groups",
    "release",
    "mark_trained",
    "mark_skipped",
    "release_stale_claims",
    "renew",
]

# Tables (SQLAlchemy types __table__ as its FromClause base).
S: Table = Session.__table__  # type: ignore[assignment]
C: Table = Call.__table__  # type: ignore[assignment]
R: Table = Reward.__table__  # type: ignore[assignment]


def _finished(settle_cutoff: datetime):
    """Finished, unclaimed sessions whose final reward is at least settle_s old."""
    return (
        select(S.c.id, S.c.task_id, R.c.created_at.label("finished_at"), R.c.value.label("final_value"))
        .select_from(S.join(R, and_(R.c.session_id == S.c.id, R.c.final == True)))  # noqa: E712
        .where(S.c.status == "open", R.c.created_at <= settle_cutoff)
    )


async def claim_batch(
    engine: AsyncEngine,
    *,
    worker_id: str,
    batch_size: int,
    train_agents: Sequence[str] = (),
    group_by_task: bool = True,
    group_size: int = 0,
    group_timeout_s: float = 60.0,
    settle_s: float = 0.0,
    sft_from: Sequence[str] = (),
    newest_first: bool = False,
) -> list[ClaimedSession]:
    """Claim up to ``batch_size`` finished sessions (whole task groups when grouping) for ``worker_id``
    and load their trainable calls (and the calls of the frozen routes in ``sft_from``). Returns [] when nothing is
    ready. ``newest_first`` takes the most recently finished sessions (groups) first instead of the oldest. See the
    module docstring."""
    if batch_size <= 0:
        return []
    now = utcnow()
    settle_cutoff = now - timedelta(seconds=max(settle_s, 0.0))
    timeout_cutoff = now - timedelta(seconds=max(group_timeout_s, 0.0))
    grouping = group_by_task and group_size > 0
    postgres = engine.dialect.name == "postgresql"

    async with write_tx(engine) as conn:
        if grouping:
            rows = await _locked_group_candidates(
                conn, settle_cutoff, timeout_cutoff, batch_size, group_size, newest_first
            )
            picked = pick_groups(rows, batch_size=batch_size, group_size=group_size, timeout_cutoff=timeout_cutoff)
        else:
            stmt = (
                _finished(settle_cutoff)
                .order_by(*_order(newest_first))
                .limit(batch_size)
                .with_for_update(of=S, skip_locked=True)
            )
            picked = list((await conn.execute(stmt)).all())
        if not picked:
            return []
        values = {"status": "claimed", "claimed_by": worker_id, "claimed_at": now}
        if postgres:
            # The rows are locked by us: the status re-check cannot fail, but costs nothing.
            stmt = (
                update(S)
                .where(S.c.id.in_([r.id for r in picked]), S.c.status == "open")
                .values(**values)
                .returning(S.c.id)
            )
            claimed = set((await conn.execute(stmt)).scalars().all())
        else:
            claimed = set()
            for r in picked:
                res = await conn.execute(update(S).where(S.c.id == r.id, S.c.status == "open").values(**values))
                if res.rowcount == 1:
                    claimed.add(r.id)
    picked = [r for r in picked if r.id in claimed]
    if not picked:
        return []
    try:
        return await load_episodes(engine, picked, train_agents, sft_from)
    except BaseException:
        # The claim committed but the episodes could not be read: give them back now instead of after
        # the stale-claim timeout.
        await release(engine, [r.id for r in picked], worker_id=worker_id)
        raise


def _order(newest_first: bool) -> tuple:
    return (R.c.created_at.desc(), S.c.id.desc()) if newest_first else (R.c.created_at, S.c.id)


async def _locked_group_candidates(
    conn: AsyncConnection,
    settle_cutoff: datetime,
    timeout_cutoff: datetime,
    batch_size: int,
    group_size: int,
    newest_first: bool = False,
) -> list:
    """Rows (id, task_id, finished_at, final_value) of the oldest eligible groups, locked where the
    database has row locks. Eligibility is decided on the aggregate first (no locks), then re-checked on
    the rows actually locked by :func:`pick_groups` (a concurrent claimer may hold part of a group)."""
    fin = _finished(settle_cutoff).subquery()
    oldest = func.min(fin.c.finished_at)
    # A group is as old as its oldest member, as new as its newest.
    head = func.max(fin.c.finished_at) if newest_first else oldest
    tasks = (
        await conn.execute(
            select(fin.c.task_id, head.label("head"))
            .where(fin.c.task_id.is_not(None))
            .group_by(fin.c.task_id)
            .having(or_(func.count() >= group_size, oldest <= timeout_cutoff))
            .order_by(head.desc() if newest_first else head, fin.c.task_id)
            .limit(batch_size)
        )
    ).all()
    loners = (
        await conn.execute(
            select(fin.c.id, fin.c.finished_at)
            .where(fin.c.task_id.is_(None))
            .order_by(*((fin.c.finished_at.desc(), fin.c.id) if newest_first else (fin.c.finished_at, fin.c.id)))
            .limit(batch_size)
        )
    ).all()
    # Oldest (or newest) groups first, at most batch_size groups (each has at least one session).
    heads = sorted(
        [(aware(t.head), 0, t.task_id) for t in tasks] + [(aware(s.finished_at), 1, s.id) for s in loners],
        reverse=newest_first,
    )[:batch_size]
    if not heads:
        return []
    task_ids = [key for _, kind, key in heads if kind == 0]
    loner_ids = [key for _, kind, key in heads if kind == 1]
    members = []
    if task_ids:
        members.append(S.c.task_id.in_(task_ids))
    if loner_ids:
        members.append(S.c.id.in_(loner_ids))
    stmt = (
        _finished(settle_cutoff)
        .where(or_(*members))
        .order_by(*_order(newest_first))
        .with_for_update(of=S, skip_locked=True)
    )
    return list((await conn.execute(stmt)).all())


def pick_groups(rows: Iterable, *, batch_size: int, group_size: int, timeout_cutoff: datetime) -> list:
    """Whole eligible groups in the order of ``rows``, while they fit in batch_size (the first one always goes in,
    cut to max(batch_size, group_size) sessions, the first of its rows).

    ``rows`` have ``id``, ``task_id`` and ``finished_at`` and come ordered by ``finished_at`` (oldest first, or newest
    first for a newest-first claim); a row without a task id is a group of its own. No I/O."""
    groups: dict[tuple[int, str], list] = {}
    for r in rows:  # ordered by finished_at: members and groups come out in that order
        key = (0, r.task_id) if r.task_id is not None else (1, r.id)
        groups.setdefault(key, []).append(r)
    picked: list = []
    for (kind, _), members in groups.items():
        first_finished = min(utc_of(m.finished_at) for m in members)
        eligible = kind == 1 or len(members) >= group_size or first_finished <= timeout_cutoff
        if not eligible:
            continue  # part of it is held by another claimer, and what is left is not a group yet
        if not picked:
            picked.extend(members[: max(batch_size, group_size)])
        elif len(picked) + len(members) <= batch_size:
            picked.extend(members)
        else:
            break  # keep the order: a later, smaller group does not overtake this one
        if len(picked) >= batch_size:
            break
    return picked


async def _set(
    engine: AsyncEngine, session_ids: Sequence[str], *, from_status: str, worker_id: str | None, values: dict
) -> int:
    ids = list(dict.fromkeys(session_ids))
    if not ids:
        return 0
    stmt = update(S).where(S.c.id.in_(ids), S.c.status == from_status)
    if worker_id is not None:
        stmt = stmt.where(S.c.claimed_by == worker_id)
    async with write_tx(engine) as conn:
        return (await conn.execute(stmt.values(**values))).rowcount


async def release(engine: AsyncEngine, session_ids: Sequence[str], *, worker_id: str | None = None) -> int:
    """Give claimed sessions back (``open``) after a failed step. With ``worker_id``, only the claims that
    are still this worker's (a claim released as stale may have been taken by another trainer since).
    Returns how many were released."""
    return await _set(
        engine,
        session_ids,
        from_status="claimed",
        worker_id=worker_id,
        values={"status": "open", "claimed_by": None, "claimed_at": None},
    )


async def mark_trained(
    engine: AsyncEngine, session_ids: Sequence[str], step: int, *, worker_id: str | None = None
) -> int:
    """Claimed sessions a step trained on become ``trained`` with their ``train_step``. Returns the count."""
    return await _set(
        engine,
        session_ids,
        from_status="claimed",
        worker_id=worker_id,
        values={"status": "trained", "train_step": step},
    )


async def mark_skipped(
    engine: AsyncEngine, session_ids: Sequence[str], reason: str, *, worker_id: str | None = None
) -> int:
    """Claimed sessions that will not be trained (stale, no token data...) become ``skipped`` with the
    reason. Returns the count."""
    return await _set(
        engine,
        session_ids,
        from_status="claimed",
        worker_id=worker_id,
        values={"status": "skipped", "skip_reason": reason},
    )


async def renew(engine: AsyncEngine, session_ids: Sequence[str], *, worker_id: str) -> int:
    """Refresh ``claimed_at`` of this worker's claims so a long step is not mistaken for a crash."""
    return await _set(engine, session_ids, from_status="claimed", worker_id=worker_id, values={"claimed_at": utcnow()})


async def release_stale_claims(engine: AsyncEngine, older_than_s: float) -> int:
    """Claims older than ``older_than_s`` (their trainer crashed) go back to ``open``. Returns the count."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    async with write_tx(engine) as conn:
        res = await conn.execute(
            update(S)
            .where(S.c.status == "claimed", S.c.claimed_at < cutoff)
            .values(status="open", claimed_by=None, claimed_at=None)
        )
        return res.rowcount
