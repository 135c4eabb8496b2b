"""Which model name to send upstream for the policy, and which version that is, per upstream. The store says
what each upstream serves and when that may have changed (`trainwire.store.policy`); this keeps it in memory
for every request."""

from __future__ import annotations

import asyncio
import logging

from trainwire.store.policy import Engine, UpstreamServing, upstream_versions, watch_versions

log = logging.getLogger("trainwire.policy")


class PolicyState:
    def __init__(self, engine: Engine, base_model: str | None, poll_s: float) -> None:
        self.engine = engine
        self.base_model = base_model
        self.poll_s = poll_s
        self.by_upstream: dict[str, UpstreamServing] = {}
        # upstream -> the entry it was found not to serve (a restarted vLLM forgets runtime-loaded adapters);
        # the trainer publishing to it again writes a new entry (store/serving.py), which it serves
        self.missing: dict[str, UpstreamServing] = {}
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    def resolve(self, upstream: str) -> tuple[str | None, int]:
        """(model name to send, policy version) for this upstream."""
        entry = self.by_upstream.get(upstream)
        if entry is None or self.missing.get(upstream) == entry:
            return self.base_model, 0
        return entry.served_model, entry.version

    def mark_missing(self, upstream: str) -> None:
        entry = self.by_upstream.get(upstream)
        if entry is not None:
            log.warning(
                "%s no longer serves %r (policy v%d; restarted?); serving the base model there, stamped v0, "
                "until the trainer publishes to it again",
                upstream,
                entry.served_model,
                entry.version,
            )
            self.missing[upstream] = entry

    async def refresh(self) -> None:
        new = await upstream_versions(self.engine)
        if new != self.by_upstream:
            log.info("policy versions now %s", {u: s.version for u, s in new.items()})
            self.by_upstream = new
            self.changed.set()
            self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(
            watch_versions(self.engine, self.refresh, self.poll_s), name="trainwire-policy-watch"
        )

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
