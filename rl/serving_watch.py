"""The trainer keeps the current version served: a vLLM that restarted (a crash, an OOM kill, a rolling update)
comes back serving the base model, without the adapter or the weights the trainer published into it.

Every `--serving-check-s` seconds, also while no batch is ready (an idle trainer is exactly when nothing else
would notice), the trainer asks each upstream whether it serves the current version (rl/publish.Publisher.serves:
the adapter in `/v1/models`, or the weight version in `/weight_info`). One that does not is first recorded as
serving the base model, version 0, so the proxies stamp its calls with what serves them; then the current version
is published to it again from the export it was published from, and recorded as served once it is loaded.
Calls the proxy served from the base model meanwhile carry version 0 and their base-model logprobs: the trainer
trains them as such, or skips their sessions as stale (`--max-staleness`), with the reason counted.

The proxy notices on its own too (a LoRA upstream answers 404 for the adapter: the call is served by the base
model and stamped v0), but it never publishes: with no trainer running, the base model serves, honestly stamped,
until a trainer starts (which checks at once)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from trainwire.store.db_errors import is_transient
from trainwire.store.serving import published, set_serving

log = logging.getLogger("trainwire.serving")


class ServingWatch:
    def __init__(self, pub, db, *, every_s: float, vllm_root: Path, base_model: str, say: Callable[[str], None]):
        self.pub, self.db = pub, db
        self.every_s = every_s
        self.vllm_root = vllm_root
        self.base_model = base_model
        self.say = say
        self._next = 0.0
        self.republished = 0

    async def check(self, version: int) -> None:
        """Never raises: a database or upstream away now is asked again at the next check."""
        if version <= 0 or self.every_s <= 0 or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        try:
            await self._check(version)
        except Exception as exc:
            if not is_transient(exc):
                log.exception("checking what the upstreams serve failed")
            else:
                log.warning("checking what the upstreams serve: the database is away (%s)", exc)

    async def _check(self, version: int) -> None:
        lost = [url for url in self.pub.upstreams if await self.pub.serves(url, version) is False]
        if not lost:
            return
        record = await published(self.db, version)
        if record is None:
            return  # the store has no such version (another store, a version being recorded): nothing to load
        t0 = time.perf_counter()
        for url in lost:
            await set_serving(self.db, url, 0, self.base_model)
            self.say(f"{url} no longer serves v{version} (restarted?): its calls are stamped v0 (the base model)")
        result = await self.pub.publish(version, str(self.vllm_root / Path(record.path).name), only=lost)
        for url in result.reached:
            await set_serving(self.db, url, version, record.served_model)
            self.republished += 1
            self.say(f"v{version} published again to {url} in {time.perf_counter() - t0:.1f}s; served again")
        for url, why in result.failed.items():
            self.say(f"WARNING: could not publish v{version} again to {url} ({why}); trying again in {self.every_s:g}s")
