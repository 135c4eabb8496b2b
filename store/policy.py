"""Policy versions: the trainer records what it published, the proxy reads it back.

On Postgres the trainer NOTIFYs `CHANNEL` in the same transaction, so proxies switch on the next request;
on SQLite (one machine) the proxy polls. `watch_versions` hides which of the two happens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.models import PolicyVersion, UpstreamVersion, utcnow

CHANNEL = "trainwire_policy"
# Postgres: re-read this often anyway, in case a notification was missed (e.g. while reconnecting).
SAFETY_REFRESH_S = 30.0
RECONNECT_S = 1.0

log = logging.getLogger("trainwire.store.policy")

# What store functions take for the database (the proxy need not import SQLAlchemy to name it).
Engine = AsyncEngine


@dataclass(frozen=True, slots=True)
class UpstreamServing:
    """What one upstream serves now: the policy version and the model name it is served under, and since when
    (a version published to it again after a restart is a new entry, though its number and name are the same)."""

    version: int
    served_model: str
    since: datetime | None = None


async def upstream_versions(engine: AsyncEngine) -> dict[str, UpstreamServing]:
    """Upstream URL -> what it serves, for every upstream the trainer has published to."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    UpstreamVersion.upstream,
                    UpstreamVersion.version,
                    UpstreamVersion.served_model,
                    UpstreamVersion.updated_at,
                )
            )
        ).all()
    return {r.upstream: UpstreamServing(r.version, r.served_model, r.updated_at) for r in rows}


async def watch_versions(
    engine: AsyncEngine, on_change: Callable[[], Awaitable[None]], poll_s: float, *, safety_s: float = SAFETY_REFRESH_S
) -> None:
    """Await `on_change()` whenever the published versions may have changed; runs until cancelled.

    Postgres: LISTEN on `CHANNEL` over a dedicated connection (reconnecting after a failure), on_change on
    every notification, right after (re)connecting, and every `safety_s` seconds. SQLite: every `poll_s`
    seconds. A failing on_change is logged and the watch goes on."""
    if engine.dialect.name == "postgresql":
        await _listen(engine, on_change, safety_s)
    else:
        await _poll(on_change, poll_s)


async def _guarded(on_change: Callable[[], Awaitable[None]]) -> None:
    try:
        await on_change()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("policy refresh failed")


async def _poll(on_change: Callable[[], Awaitable[None]], poll_s: float) -> None:
    while True:
        await asyncio.sleep(poll_s)
        await _guarded(on_change)


async def _listen(engine: AsyncEngine, on_change: Callable[[], Awaitable[None]], safety_s: float) -> None:
    import asyncpg  # type: ignore[import-untyped]  # (no stubs)

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    pending: set[asyncio.Task] = set()  # notification refreshes in flight (kept referenced until done)

    def notified(*_) -> None:
        task = asyncio.get_running_loop().create_task(_guarded(on_change))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(url)
                await conn.add_listener(CHANNEL, notified)
                await _guarded(on_change)
                while not conn.is_closed():
                    await asyncio.sleep(safety_s)
                    await _guarded(on_change)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("policy LISTEN connection failed; reconnecting")
                await asyncio.sleep(RECONNECT_S)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
    finally:
        for task in pending:
            task.cancel()


async def latest_version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        value = (
            await conn.execute(select(PolicyVersion.version).order_by(PolicyVersion.version.desc()).limit(1))
        ).scalar()
    return int(value or 0)


async def record_publish(
    engine: AsyncEngine,
    *,
    version: int,
    kind: str,
    served_model: str,
    path: str,
    train_step: int | None,
    reached: list[str],
    failed: list[str],
) -> None:
    """Store the new version and what each upstream now serves, then notify proxies, atomically."""
    status = "published" if not failed else "partial"
    async with engine.begin() as conn:
        await conn.execute(
            insert(PolicyVersion).values(
                version=version,
                kind=kind,
                served_model=served_model,
                path=path,
                train_step=train_step,
                status=status,
                created_at=utcnow(),
            )
        )
        for url in reached:
            await conn.execute(delete(UpstreamVersion).where(UpstreamVersion.upstream == url))
            await conn.execute(
                insert(UpstreamVersion).values(
                    upstream=url, version=version, served_model=served_model, updated_at=utcnow()
                )
            )
        if engine.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": str(version)}
            )
