"""What one upstream serves, corrected after the fact: a vLLM that restarted serves the base model (version 0)
until the trainer publishes the current version to it again (rl/serving_watch.py). Each change is one
transaction that NOTIFYs proxies like a publish (store/policy.py), so they stamp calls with what serves them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.models import PolicyVersion, UpstreamVersion, utcnow
from trainwire.store.policy import CHANNEL


@dataclass(frozen=True, slots=True)
class Published:
    """A version the trainer published: what to load again into an upstream that lost it."""

    version: int
    kind: str
    served_model: str
    path: str


async def published(engine: AsyncEngine, version: int) -> Published | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(PolicyVersion.version, PolicyVersion.kind, PolicyVersion.served_model, PolicyVersion.path).where(
                    PolicyVersion.version == version
                )
            )
        ).first()
    return Published(row.version, row.kind, row.served_model, row.path) if row else None


async def set_serving(engine: AsyncEngine, upstream: str, version: int, served_model: str) -> None:
    """Record that `upstream` now serves `version` under `served_model` (0 and the base model's name: it lost
    what was published to it), and tell the proxies."""
    async with engine.begin() as conn:
        await conn.execute(delete(UpstreamVersion).where(UpstreamVersion.upstream == upstream))
        await conn.execute(
            insert(UpstreamVersion).values(
                upstream=upstream, version=version, served_model=served_model, updated_at=utcnow()
            )
        )
        if engine.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": str(version)}
            )
