"""Which model name to send upstream for the policy, and which version that is, per upstream."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncEngine
from trainwire.store.policy import CHANNEL, upstream_versions

log = logging.getLogger("trainwire.policy")


class PolicyState:
    def __init__(self, engine: AsyncEngine, base_model: str | None, poll_s: float) -> None:
        self.engine = engine
        self.base_model = base_model
        self.poll_s = poll_s
        self.by_upstream: dict[str, tuple[int, str]] = {}
        # upstream -> version it was found not to serve (a restarted vLLM forgets runtime-loaded adapters)
        self.missing: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    def resolve(self, upstream: str) -> tuple[str | None, int]:
        """(model name to send, policy version) for this upstream."""
        entry = self.by_upstream.get(upstream)
        if entry is None or self.missing.get(upstream) == entry[0]:
            return self.base_model, 0
        return entry[1], entry[0]

    def mark_missing(self, upstream: str) -> None:
        entry = self.by_upstream.get(upstream)
        if entry is not None:
            log.warning("%s no longer serves %r (policy v%d; restarted?); serving the base model there until "
                        "the trainer publishes again", upstream, entry[1], entry[0])
            self.missing[upstream] = entry[0]

    async def refresh(self) -> None:
        new = await upstream_versions(self.engine)
        if new != self.by_upstream:
            log.info("policy versions now %s", {u: v for u, (v, _) in new.items()})
            self.by_upstream = new
            self.changed.set()
            self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        runner = self._listen if self.engine.dialect.name == "postgresql" else self._poll
        self._task = asyncio.create_task(runner(), name="trainwire-policy-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("policy refresh failed")

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection; also refresh every 30 s in case a notification was missed
        while reconnecting."""
        import asyncpg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(url)
                await conn.add_listener(CHANNEL, lambda *_: asyncio.ensure_future(self.refresh()))
                await self.refresh()
                while not conn.is_closed():
                    await asyncio.sleep(30)
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("policy LISTEN connection failed; reconnecting")
                await asyncio.sleep(1)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
