"""Policy versions: the trainer records what it published, the proxy reads it back.

On Postgres the trainer NOTIFYs `CHANNEL` in the same transaction, so proxies switch on the next request;
on SQLite (one machine) the proxy polls."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from trainwire.store.models import PolicyVersion, UpstreamVersion, utcnow

CHANNEL = "trainwire_policy"


async def upstream_versions(engine: AsyncEngine) -> dict[str, tuple[int, str]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(UpstreamVersion.upstream, UpstreamVersion.version,
                                          UpstreamVersion.served_model))).all()
    return {r.upstream: (r.version, r.served_model) for r in rows}


async def latest_version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        value = (await conn.execute(select(PolicyVersion.version).order_by(PolicyVersion.version.desc())
                                    .limit(1))).scalar()
    return int(value or 0)


async def record_publish(engine: AsyncEngine, *, version: int, kind: str, served_model: str, path: str,
                         train_step: int | None, reached: list[str], failed: list[str]) -> None:
    """Store the new version and what each upstream now serves, then notify proxies, atomically."""
    status = "published" if not failed else "partial"
    async with engine.begin() as conn:
        await conn.execute(PolicyVersion.__table__.insert().values(
            version=version, kind=kind, served_model=served_model, path=path, train_step=train_step,
            status=status, created_at=utcnow()))
        for url in reached:
            await conn.execute(UpstreamVersion.__table__.delete().where(UpstreamVersion.upstream == url))
            await conn.execute(UpstreamVersion.__table__.insert().values(
                upstream=url, version=version, served_model=served_model, updated_at=utcnow()))
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                               {"channel": CHANNEL, "payload": str(version)})


async def retire_version(engine: AsyncEngine, version: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(PolicyVersion.__table__.update().where(PolicyVersion.version == version)
                           .values(status="retired"))
