"""`GET /stats`: counts of sessions, calls and rewards, and the final reward by policy version, in one read."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.call_shapes import call_api
from trainwire.store.models import Call, Reward, Session
from trainwire.store.read_models import CallCounts, RewardCounts, SourceRewards, Stats, VersionRewards
from trainwire.store.reads.derived import ORPHANED, STATUS
from trainwire.store.reads.trainability import FAILED, UNTRAINED, count_of

S, C, R = Session.__table__, Call.__table__, Reward.__table__


async def stats(engine: AsyncEngine) -> Stats:
    """Counts of sessions by status, calls (trainable, failed, trainable but not to be trained, by API), rewards
    by source, orphaned rewards, final reward by version."""
    async with engine.connect() as conn:
        by_status: dict[str, int] = dict((await conn.execute(select(STATUS, func.count()).group_by(STATUS))).all())
        kinds = (
            await conn.execute(
                select(
                    C.c.kind,
                    C.c.route,
                    func.count(),
                    count_of(C.c.trainable.is_(True)),
                    count_of(FAILED),
                    count_of(UNTRAINED),
                )
                .select_from(C.outerjoin(S, S.c.id == C.c.session_id))
                .group_by(C.c.kind, C.c.route)
            )
        ).all()
        by_source = (
            await conn.execute(
                select(R.c.source, R.c.final, func.count(), func.avg(R.c.value), func.count(R.c.value))
                .group_by(R.c.source, R.c.final)
                .order_by(R.c.source, R.c.final)
            )
        ).all()
        n_orphaned, n_orphaned_sessions = (
            await conn.execute(select(func.count(), func.count(R.c.session_id.distinct())).where(ORPHANED))
        ).one()
        # A session's policy version is the newest one that served any of its calls.
        version = (
            select(func.max(C.c.policy_version))
            .where(C.c.session_id == R.c.session_id)
            .scalar_subquery()
            .label("policy_version")
        )
        finals = (select(version, R.c.value).where(R.c.final.is_(True), ~ORPHANED)).subquery()
        by_version = (
            await conn.execute(
                select(finals.c.policy_version, func.count(), func.count(finals.c.value), func.avg(finals.c.value))
                .group_by(finals.c.policy_version)
                .order_by(finals.c.policy_version)
            )
        ).all()
    n_calls = n_trainable = n_failed = n_untrained = 0
    by_api: dict[str, int] = {}
    for kind, route, n, trainable, failed, untrained in kinds:
        n_calls, n_trainable, n_failed, n_untrained = (
            n_calls + n,
            n_trainable + int(trainable),
            n_failed + int(failed),
            n_untrained + int(untrained),
        )
        api = call_api(kind, route)
        by_api[api] = by_api.get(api, 0) + int(n)
    sessions = {k: int(by_status.get(k, 0)) for k in ("open", "finished", "claimed", "trained", "skipped")}
    sessions.update({k: int(v) for k, v in by_status.items() if k not in sessions})
    sessions["total"] = sum(sessions.values())
    totals = {"total": 0, "final": 0, "intermediate": 0, "finished_without_reward": 0}
    sources: dict[str, dict[str, Any]] = {}
    for source, final, n, mean, n_valued in by_source:
        kind = "final" if final else "intermediate"
        totals["total"] += n
        totals[kind] += n
        if final:
            totals["finished_without_reward"] += n - n_valued
        entry = sources.setdefault(
            source, {"final": 0, "intermediate": 0, "mean_final": None, "mean_intermediate": None}
        )
        entry[kind] = int(n)
        entry[f"mean_{kind}"] = float(mean) if mean is not None else None
    return Stats(
        sessions=sessions,
        calls=CallCounts(
            total=int(n_calls),
            trainable=n_trainable,
            failed=n_failed,
            untrainable=n_untrained,
            by_api=dict(sorted(by_api.items())),
        ),
        rewards=RewardCounts(
            **{k: int(v) for k, v in totals.items()},
            orphaned=int(n_orphaned),
            orphaned_sessions=int(n_orphaned_sessions),
            by_source={k: SourceRewards(**v) for k, v in sources.items()},
        ),
        orphaned_rewards=int(n_orphaned),
        reward_by_policy_version=[
            VersionRewards(
                policy_version=v,
                sessions=int(n),
                rewarded=int(n_valued),
                mean=float(mean) if mean is not None else None,
            )
            for v, n, n_valued, mean in by_version
        ],
    )
