from __future__ import annotations

import asyncio
import uuid

import pytest

from store.migrate import upgrade_head
from tests.pgcluster import PgCluster
from tests.proxyproc import ProxyProcess
from tests.scripted_upstream import ScriptedUpstream


@pytest.fixture(scope="session")
def pg():
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg) -> str:
    url = pg.create_database("t_" + uuid.uuid4().hex[:12])
    upgrade_head(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/trainwire.db"
    upgrade_head(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")


@pytest.fixture
def upstream():
    up = ScriptedUpstream().start()
    yield up
    up.stop()


@pytest.fixture
def start_proxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        p = ProxyProcess(list(args), env=env, log_path=tmp_path / f"proxy-{len(started)}.log")
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def proxy(start_proxy, upstream, db_url, tmp_path):
    p = start_proxy("--upstream", upstream.url, "--database-url", db_url, "--spool-dir", str(tmp_path / "spool"))
    yield p
    p.stop()  # before the upstream goes away, so neither waits on the other's open connections


def run(coro):
    return asyncio.run(coro)
