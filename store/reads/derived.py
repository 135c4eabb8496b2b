"""What the read queries derive from several tables: a session's status and whether a reward is orphaned.

A session's status is the trainer's `claimed` / `trained` / `skipped` when it set one, else `finished` when a final
reward row exists (a value, or a close without one), else `open`. A reward is orphaned when no call of its session
was recorded."""

from __future__ import annotations

from sqlalchemy import and_, case, exists

from trainwire.store.models import Reward, Session

S, R = Session.__table__, Reward.__table__

FINAL_EXISTS = exists().where(R.c.session_id == S.c.id, R.c.final.is_(True))
STATUS = case((S.c.status != "open", S.c.status), (FINAL_EXISTS, "finished"), else_="open")
ORPHANED = ~exists().where(S.c.id == R.c.session_id)


def status_filter(status: str):
    if status == "open":
        return and_(S.c.status == "open", ~FINAL_EXISTS)
    if status == "finished":
        return and_(S.c.status == "open", FINAL_EXISTS)
    return S.c.status == status
