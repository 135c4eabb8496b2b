"""Admission control (``trainwire serve --max-backlog N``): hold agents back while the trainer is behind.

The backlog is the number of sessions rewarded but not yet claimed by a trainer
(:func:`trainwire.store.backlog.rewarded_backlog`). While it is at ``N`` or above, the first call of a new
session gets a 429 with ``Retry-After`` in its API's own error format (the OpenAI and Anthropic SDKs retry it by
themselves); calls of sessions already started are always served, so no episode is cut in half, and evaluation
calls (``X-Trainwire-Train: false``) are never refused: they add nothing to train.

The count is read in the background every :data:`REFRESH_S` seconds and cached, so a request never waits on it;
a session this process has not served yet is looked up in the store only while the backlog is full (its first call
may have gone to another ``--workers`` process). When the count cannot be read (the database is away), the last
one stands. ``N = 0`` (the default) turns it all off: production traffic is never refused unless asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from trainwire.proxy.errors import ApiError
from trainwire.store.backlog import rewarded_backlog, session_started

log = logging.getLogger("trainwire.proxy")

REFRESH_S = 1.0
RETRY_AFTER_S = 2

__all__ = ["Admission", "REFRESH_S", "RETRY_AFTER_S"]


class Admission:
    def __init__(self, engine: Any, max_backlog: int, refresh_s: float = REFRESH_S) -> None:
        self.engine = engine
        self.max_backlog = max_backlog
        self.refresh_s = refresh_s
        self.backlog: int | None = None  # None until the first read
        self.refused = 0  # 429s this process answered
        self._task: asyncio.Task | None = None

    @property
    def on(self) -> bool:
        return self.max_backlog > 0

    async def start(self) -> None:
        if self.on:
            await self.refresh()
            self._task = asyncio.create_task(self._refresh_forever(), name="trainwire-backlog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        try:
            self.backlog = await rewarded_backlog(self.engine)
        except Exception as exc:  # the database is away: keep the last count, the write path copes on its own
            log.debug("backlog not read: %r", exc)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    @property
    def full(self) -> bool:
        return self.on and self.backlog is not None and self.backlog >= self.max_backlog

    async def check(self, session_id: str, *, seen: bool, trainable: bool) -> None:
        """Raise a 429 for the first call of a new trainable session while the backlog is full. ``seen``: this
        process has served a call of the session already."""
        if not self.full or seen or not trainable:
            return
        if await session_started(self.engine, session_id):
            return
        self.refused += 1
        raise ApiError(
            429,
            f"the trainer is behind: {self.backlog} rewarded sessions wait to be trained (--max-backlog "
            f"{self.max_backlog}); new sessions start again once it catches up, retry after {RETRY_AFTER_S}s",
            code="backlog_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
