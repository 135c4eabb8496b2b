"""Engine and session factory for Postgres (asyncpg) or SQLite (aiosqlite)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    if is_sqlite(url):
        # The proxy and the trainer share one SQLite file: WAL lets readers run beside the writer and the
        # busy timeout turns lock contention into a short wait instead of an error.
        engine = create_async_engine(url, connect_args={"timeout": 30}, json_serializer=_dumps)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, json_serializer=dumps_pg
    )


def _dumps(value) -> str:
    # Request and response bodies are the bulk of every batch; orjson is several times faster than json.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# Postgres rejects the NUL character in text and jsonb ("unsupported Unicode escape sequence"), and a tiny or
# broken model does sample byte 0. An unescaped backslash run followed by u0000 is the JSON escape of NUL.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def dumps_pg(value) -> str:
    text = _dumps(value)
    return _JSON_NUL.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def redact(url: str) -> str:
    """A database URL fit for logs and messages: the password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def ping(engine: AsyncEngine) -> None:
    """Raise if the database cannot answer a trivial query now."""
    from sqlalchemy import text

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


@asynccontextmanager
async def write_tx(engine: AsyncEngine, lock_id: int | None = None) -> AsyncIterator[AsyncConnection]:
    """A transaction that writes. On SQLite it takes the write lock at BEGIN (``BEGIN IMMEDIATE``): the reads
    inside it see the latest committed state and no other writer slips in before its UPDATEs; contention waits on
    the busy timeout instead of failing with 'database is locked' at upgrade time. That lock also serializes runs
    of a maintenance command; on Postgres ``lock_id`` takes the transaction-scoped advisory lock for that."""
    if engine.dialect.name == "sqlite":
        async with engine.connect() as conn:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()
    else:
        async with engine.begin() as conn:
            if lock_id is not None:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_id})
            yield conn
