"""A claimed session as the trainer gets it: an episode (`ClaimedSession`) of its calls (`ClaimedCall`), with their
full prompt token ids (calls stored as deltas read whole), their intermediate rewards, and how the store keeps
each call. store/claims.py claims the sessions, then loads them here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.delta_reads import DELTA_COLS, full_rows
from trainwire.store.models import Call, Reward
from trainwire.store.rewards import aware

C: Table = Call.__table__  # type: ignore[assignment]
R: Table = Reward.__table__  # type: ignore[assignment]


def utc_of(dt: datetime) -> datetime:
    """`aware` (store/rewards.py) of a column that is never NULL where it is read."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


@dataclass(frozen=True)
class ClaimedCall:
    id: str
    seq: int
    agent_name: str | None
    policy_version: int | None
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None
    logprobs: list[float] | None
    finish_reason: str | None
    reward: float  # sum of the intermediate rewards posted on this call (0.0 when none)
    aborted: bool
    status_code: int
    started_at: datetime | None = None
    # What went upstream ({"requested", "effective"[, "enforced"]}, proxy/sampling.py); None on rows recorded
    # before migration 0002.
    sampling: dict | None = None
    untrainable_reason: str | None = None  # the proxy's reason not to train on this call's tokens, or None
    route: str = "policy"  # policy | frozen (frozen calls are loaded only when selected with sft_from)
    model_requested: str | None = None
    kind: str = "chat"
    # The call's request and answer as recorded: loaded only for the frozen calls selected with sft_from, which
    # have no token ids of the policy's (the trainer renders them with the policy's chat template).
    request: dict | None = None
    response: dict | None = None
    # How the store keeps the call (store/call_deltas.py): an earlier call of the session it was stored against
    # (None: stored whole), and how many of that call's prompt + completion tokens its prompt starts with (None: no
    # tokens shared). The trainer merges trajectories by it (rl/transitions.py). Not part of equality: the same
    # call stored whole or as a delta is the same call.
    base_call_id: str | None = field(default=None, compare=False)
    prompt_prefix_len: int | None = field(default=None, compare=False)


@dataclass
class ClaimedSession:
    id: str
    task_id: str | None
    final_reward: float | None  # None: closed without a reward
    calls: list[ClaimedCall] = field(default_factory=list)
    finished_at: datetime | None = None  # when the final reward was posted


_CALL_COLUMNS = (
    C.c.id,
    C.c.session_id,
    C.c.seq,
    C.c.agent_name,
    C.c.policy_version,
    C.c.prompt_token_ids,
    C.c.completion_token_ids,
    C.c.logprobs,
    C.c.finish_reason,
    C.c.aborted,
    C.c.status_code,
    C.c.started_at,
    C.c.finished_at,
    C.c.sampling,
    C.c.untrainable_reason,
    C.c.route,
    C.c.model_requested,
    C.c.kind,
    *DELTA_COLS,
)


async def load_episodes(
    engine: AsyncEngine, picked: list, train_agents: Sequence[str], sft_from: Sequence[str] = ()
) -> list[ClaimedSession]:
    """The claimed sessions `picked` (rows with id, task_id, final_value, finished_at) as episodes: their trainable
    calls (of `train_agents` when given; plus the frozen calls of the `sft_from` routes, with request and answer)
    in order, with full prompts, and each call's intermediate rewards."""
    ids = [r.id for r in picked]
    stmts = [select(*_CALL_COLUMNS).where(C.c.session_id.in_(ids), C.c.trainable == True)]  # noqa: E712
    if sft_from:
        # Frozen calls have no token ids of the policy's: the trainer renders their request and answer.
        stmts.append(
            select(*_CALL_COLUMNS, C.c.request, C.c.response).where(
                C.c.session_id.in_(ids), C.c.route == "frozen", C.c.model_requested.in_(list(dict.fromkeys(sft_from)))
            )
        )
    if train_agents:
        stmts = [stmt.where(C.c.agent_name.in_(list(train_agents))) for stmt in stmts]
    reward_stmt = (
        select(R.c.session_id, R.c.call_id, R.c.value, R.c.created_at)
        .where(R.c.session_id.in_(ids), R.c.final == False, R.c.value.is_not(None))  # noqa: E712
        .order_by(R.c.id)
    )
    async with engine.connect() as conn:
        call_rows = []
        for i, stmt in enumerate(stmts):
            # Calls stored as deltas (store/call_deltas.py) come back with their full prompts (and requests, for
            # the frozen calls whose request is loaded).
            loaded = [row._mapping for row in (await conn.execute(stmt)).all()]
            call_rows += [SimpleNamespace(**m) for m in await full_rows(conn, loaded, tokens=True, request=i > 0)]
        reward_rows = (await conn.execute(reward_stmt)).all()
    call_rows.sort(key=lambda c: (c.session_id, utc_of(c.started_at), c.seq))

    calls_of: dict[str, list] = defaultdict(list)
    for c in call_rows:
        calls_of[c.session_id].append(c)
    by_call: dict[str, float] = defaultdict(float)
    for rw in reward_rows:
        calls = calls_of.get(rw.session_id)
        if not calls:
            continue
        if rw.call_id is not None:
            by_call[rw.call_id] += float(rw.value)  # ignored below unless the call was loaded
            continue
        at = utc_of(rw.created_at)
        target = calls[0]
        for c in calls:
            if c.finished_at is not None and utc_of(c.finished_at) <= at:
                target = c
        by_call[target.id] += float(rw.value)

    out = []
    for r in picked:
        out.append(
            ClaimedSession(
                id=r.id,
                task_id=r.task_id,
                final_reward=None if r.final_value is None else float(r.final_value),
                finished_at=aware(r.finished_at),
                calls=[
                    ClaimedCall(
                        id=c.id,
                        seq=c.seq,
                        agent_name=c.agent_name,
                        policy_version=c.policy_version,
                        prompt_token_ids=_list(c.prompt_token_ids),
                        completion_token_ids=_list(c.completion_token_ids),
                        logprobs=_list(c.logprobs),
                        finish_reason=c.finish_reason,
                        reward=by_call.get(c.id, 0.0),
                        aborted=bool(c.aborted),
                        status_code=c.status_code,
                        started_at=aware(c.started_at),
                        sampling=c.sampling,
                        untrainable_reason=c.untrainable_reason,
                        route=c.route,
                        model_requested=c.model_requested,
                        kind=c.kind,
                        request=getattr(c, "request", None),
                        response=getattr(c, "response", None),
                        base_call_id=c.base_call_id,
                        prompt_prefix_len=c.prompt_prefix_len,
                    )
                    for c in calls_of.get(r.id, [])
                ],
            )
        )
    return out


def _list(value) -> list | None:
    return None if value is None else list(value)
