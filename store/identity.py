"""The store's identity: a random id the database keeps (``store_info``, migration 0003).

A trainer records it beside its checkpoints (:mod:`trainwire.rl.identity`) and compares it at every start, so a
checkpoint directory left by a run against another database is never resumed silently. Databases upgraded to
0003 got their id at upgrade; one whose row is missing (deleted by hand, a copy of the schema without its data)
gets a new one here, made once even under concurrent callers: an insert that leaves an existing row alone, then
a read of whatever row is there.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Table, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable

from trainwire.store.models import StoreInfo

__all__ = ["STORE_ID", "store_id"]

STORE_ID = "store_id"
T: Table = StoreInfo.__table__  # type: ignore[assignment]  # a Table, typed as its FromClause base


async def store_id(engine: AsyncEngine) -> str:
    """This database's id (a uuid4 in hex), created if its row is missing."""
    async with engine.connect() as conn:
        found = (await conn.execute(select(T.c.value).where(T.c.key == STORE_ID))).scalar()
    if found:
        return str(found)
    row = {"key": STORE_ID, "value": uuid.uuid4().hex}
    dialect = engine.dialect.name
    stmt: Executable
    if dialect == "postgresql":
        stmt = pg_insert(T).values(row).on_conflict_do_nothing(index_elements=["key"])
    elif dialect == "sqlite":
        stmt = sqlite_insert(T).values(row).on_conflict_do_nothing(index_elements=["key"])
    else:  # pragma: no cover - the store runs on Postgres or SQLite
        stmt = insert(T).values(row)
    async with engine.begin() as conn:
        await conn.execute(stmt)
        return str((await conn.execute(select(T.c.value).where(T.c.key == STORE_ID))).scalar_one())
