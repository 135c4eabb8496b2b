"""The trainer's store calls, retried while the database is away, like the proxy's writes: an error whose SQLSTATE
class says "unreachable, restarting, shutting down" (store/db_errors.is_transient) is retried with backoff for as
long as it lasts; training pauses with one line and resumes with one. An error that says the statement or the data
is wrong is raised at once. A stop signal ends the wait (the step's claims are given back as on any stop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from trainwire.rl.stopping import StopRequested
from trainwire.store.db_errors import is_transient

log = logging.getLogger("trainwire.train")

T = TypeVar("T")


class DbWait:
    def __init__(self, say: Callable[[str], None], stop_requested: Callable[[], bool], max_backoff_s: float = 10.0):
        self.say = say
        self.stop_requested = stop_requested
        self.max_backoff_s = max_backoff_s
        self.paused_since: float | None = None
        self.pauses = 0

    async def __call__(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        delay = 0.25
        while True:
            try:
                out = await fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self.paused_since is None:
                    self.paused_since = time.monotonic()
                    self.pauses += 1
                    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    self.say(f"the database is away ({first}); training paused: {what} waits for it")
                log.debug("%s: database still away: %s", what, exc)
                if self.stop_requested():
                    raise StopRequested() from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            if self.paused_since is not None:
                self.say(f"the database is back after {time.monotonic() - self.paused_since:.0f}s; training resumes")
                self.paused_since = None
            return out
