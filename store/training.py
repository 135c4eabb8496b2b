"""What the trainer records about its optimizer steps (``train_steps``), read back by ``/train/steps`` and the
dashboard. Policy versions it publishes are recorded by :mod:`trainwire.store.policy`."""

from __future__ import annotations

import math
from collections.abc import Mapping

from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.models import TrainStep

__all__ = ["record_train_step"]


async def record_train_step(
    engine: AsyncEngine,
    *,
    step: int,
    policy_version: int,
    n_sessions: int,
    n_samples: int,
    metrics: Mapping[str, object],
) -> None:
    """Store one step's row. Only finite numbers of ``metrics`` are kept (JSON has no NaN; a metric that is
    not a number has no curve to draw)."""
    kept = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    async with engine.begin() as conn:
        # A step number can repeat after a crash between its row and its checkpoint: the newer row wins.
        await conn.execute(delete(TrainStep).where(TrainStep.step == step))
        await conn.execute(
            insert(TrainStep).values(
                step=step, policy_version=policy_version, n_sessions=n_sessions, n_samples=n_samples, metrics=kept
            )
        )
