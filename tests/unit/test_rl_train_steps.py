"""The trainer's step rows (store/training.py) on an SQLite file: a repeated step number (a crash between the
row and the checkpoint) keeps only the newer row, and only finite numeric metrics are stored."""

from __future__ import annotations

from sqlalchemy import select

from trainwire.store.db import make_engine
from trainwire.store.models import TrainStep
from trainwire.store.training import record_train_step


async def test_step_rows_newer_wins_and_only_finite_numbers_are_kept(sqlite_url):
    engine = make_engine(sqlite_url)
    try:
        await record_train_step(
            engine,
            step=1,
            policy_version=1,
            n_sessions=4,
            n_samples=8,
            metrics={"loss": 0.5, "grad_norm": float("nan")},
        )
        await record_train_step(engine, step=2, policy_version=2, n_sessions=2, n_samples=2, metrics={"loss": 0.4})
        # step 1 again, after a restart from the checkpoint before it
        await record_train_step(
            engine,
            step=1,
            policy_version=3,
            n_sessions=3,
            n_samples=6,
            metrics={"loss": 0.25, "staleness/mean": float("inf"), "note": "text", "batch/sessions": 3},
        )
        async with engine.connect() as conn:
            rows = (await conn.execute(select(TrainStep.__table__).order_by(TrainStep.step))).all()
    finally:
        await engine.dispose()
    assert [(r.step, r.policy_version, r.n_sessions, r.n_samples) for r in rows] == [(1, 3, 3, 6), (2, 2, 2, 2)]
    assert rows[0].metrics == {"loss": 0.25, "batch/sessions": 3}
    assert rows[1].metrics == {"loss": 0.4}
