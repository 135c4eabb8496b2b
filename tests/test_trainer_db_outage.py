"""The trainer's store calls while Postgres is away (rl/db_wait.py): a call made while the cluster is stopped waits
for it, with one line when training pauses and one when it resumes, and returns what the store says once it is
back; an error that is not the database being away is raised at once; a stop signal ends the wait. Real Postgres,
stopped and started with pg_ctl; the store calls are the trainer's own (claims, the policy version)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy import text

from tests.support.faults import start_pg, stop_pg
from tests.support.pgcluster import PgCluster
from trainwire.rl.db_wait import DbWait
from trainwire.rl.stopping import StopRequested
from trainwire.store import claims
from trainwire.store.db import make_engine
from trainwire.store.migrate import upgrade_head
from trainwire.store.policy import latest_version


@pytest.fixture
def own_pg():
    with PgCluster() as pg:
        url = pg.create_database("outage")
        upgrade_head(url)
        yield pg, url


def test_a_store_call_waits_out_an_outage_with_one_line_each_way(own_pg):
    pg, url = own_pg
    said: list[str] = []
    wait = DbWait(said.append, lambda: False, max_backoff_s=0.5)

    async def run():
        engine = make_engine(url)
        try:
            assert await wait("reading the policy version", lambda: latest_version(engine)) == 0
            stop_pg(pg)
            threading.Timer(4.0, start_pg, args=(pg,)).start()
            t0 = time.monotonic()
            batch = await wait(
                "claiming a batch",
                lambda: claims.claim_batch(engine, worker_id="w", batch_size=4, settle_s=0),
            )
            waited = time.monotonic() - t0
            with pytest.raises(Exception) as refused:  # not the database being away: raised at once
                await wait("a bad statement", lambda: _select_missing_table(engine))
            return batch, waited, refused.value
        finally:
            await engine.dispose()

    batch, waited, refused = asyncio.run(run())
    assert batch == [] and waited >= 3.0
    assert len(said) == 2, said
    assert said[0].startswith("the database is away (") and "training paused: claiming a batch waits for it" in said[0]
    assert said[1].startswith("the database is back after") and said[1].endswith("training resumes")
    assert "no_such_table" in str(refused)


async def _select_missing_table(engine):
    async with engine.connect() as conn:
        await conn.execute(text("SELECT * FROM no_such_table"))


def test_a_stop_signal_ends_the_wait(own_pg):
    pg, url = own_pg
    stop = threading.Event()
    wait = DbWait(lambda _: None, stop.is_set, max_backoff_s=0.2)
    stop_pg(pg)
    threading.Timer(1.0, stop.set).start()

    async def run():
        engine = make_engine(url)
        try:
            await wait("claiming a batch", lambda: latest_version(engine))
        finally:
            await engine.dispose()

    with pytest.raises(StopRequested):
        asyncio.run(run())
