"""The batched write path. Recorded calls go into an in-memory queue and are written in batches bounded
by size and time, so a response never waits for the database.

- Adding a record never blocks and never drops: backpressure is applied earlier, at request admission
  (`wait_for_room`), so a call that already reached the upstream can always be recorded, even while its
  client is disconnecting.
- A batch that fails is retried with backoff (tenacity) until it is written. At shutdown, whatever still
  cannot be written goes to a JSONL spool file that the next start writes first.
- `flush_session` lets the reward endpoint wait until a session's calls are in the database, so a reward
  posted right after the last response never races its own calls.
- Automatic rewards (AIR, `submit_reward`) have a queue of their own; they are written in the same transaction
  as the calls of the batch, after them, with the same retry and spool guarantees. Each carries a
  deterministic idempotency key, so a retried or replayed batch cannot store one twice.

This module is the queue, its backpressure and its retries; the SQL of each database is in
store/write_postgres.py and store/write_sqlite.py behind store/write_sql.write_batch, and the files on disk in
store/spool.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from trainwire.records import CallRecord, RewardRecord
from trainwire.store import spool
from trainwire.store.write_sql import write_batch

log = logging.getLogger("trainwire.writer")


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the database is unreachable or the connection broke. Not: it rejected the data."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    return not isinstance(exc, (sa_exc.StatementError, ValueError, TypeError))


class BatchWriter:
    def __init__(self, engine: AsyncEngine, *, batch_size: int = 256, interval_ms: int = 50,
                 max_queue: int = 10000, spool_dir: Path | None = None) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.interval = interval_ms / 1000
        self.max_queue = max_queue
        self.spool_dir = spool_dir
        self._queue: collections.deque[CallRecord] = collections.deque()
        self._rewards: collections.deque[RewardRecord] = collections.deque()  # AIR rewards waiting
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._written = asyncio.Condition()
        self._pending: collections.Counter[str] = collections.Counter()   # session -> queued calls
        self._inflight: collections.Counter[str] = collections.Counter()  # session -> calls being served
        self._pending_calls: dict[str, str] = {}                          # call id -> session id, while queued
        self._task: asyncio.Task | None = None
        self._writing: tuple[list[CallRecord], list[RewardRecord]] | None = None  # batch being written
        self._stopping = False
        self.written_total = 0
        self.rewards_written_total = 0
        self.failed_batches = 0
        self.rejected_total = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._replay_spool()
        self._task = asyncio.create_task(self._run(), name="trainwire-writer")

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue; spool what cannot be written within `timeout`."""
        self._stopping = True
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except BaseException:
                    pass
                log.error("database still failing at shutdown; spooling %d calls and %d rewards",
                          len(self._queue), len(self._rewards))
                if self._writing:  # the batch it was retrying left the queue already
                    self._spool(*self._writing)
                    self._writing = None
        if self._queue or self._rewards:
            self._spool(list(self._queue), list(self._rewards))
            self._queue.clear()
            self._rewards.clear()

    # --- producer side --------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    async def wait_for_room(self) -> None:
        if len(self._queue) < self.max_queue:
            return
        async with self._room:
            await self._room.wait_for(lambda: len(self._queue) < self.max_queue)

    def begin(self, session_id: str) -> None:
        self._inflight[session_id] += 1

    def submit(self, record: CallRecord) -> None:
        sid = record.session_id
        if self._inflight[sid] > 0:
            self._inflight[sid] -= 1
            if not self._inflight[sid]:
                del self._inflight[sid]
        self._pending[sid] += 1
        self._pending_calls[record.id] = sid
        self._queue.append(record)
        # Wake the writer on the first record (so it waits at most `interval`, not its 1 s idle poll) and
        # when a batch is full.
        if len(self._queue) == 1 or len(self._queue) >= self.batch_size:
            self._wake.set()

    def submit_reward(self, reward: RewardRecord) -> None:
        """Queue an automatic reward (a `rewards` row as a dict, with an idempotency key)."""
        self._rewards.append(reward)
        if len(self._rewards) == 1 or len(self._rewards) >= self.batch_size:
            self._wake.set()

    @property
    def reward_depth(self) -> int:
        return len(self._rewards)

    def pending_session_of(self, call_id: str) -> str | None:
        return self._pending_calls.get(call_id)

    def knows_session(self, session_id: str) -> bool:
        return self._pending[session_id] > 0 or self._inflight[session_id] > 0

    async def flush_session(self, session_id: str, timeout: float = 10.0, *, inflight: bool = True) -> bool:
        """Wait until every call of this session that this process served or is serving is written.
        `inflight=False` waits only for calls already queued (a read must not wait for a live stream)."""
        def busy() -> bool:
            return self.knows_session(session_id) if inflight else self._pending[session_id] > 0

        if not busy():
            return True
        self._wake.set()
        async with self._written:
            try:
                await asyncio.wait_for(self._written.wait_for(lambda: not busy()), timeout)
                return True
            except asyncio.TimeoutError:
                return False

    # --- consumer side --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self._queue and not self._rewards:
                if self._stopping:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
            # Let a batch fill for up to `interval` unless it is already full or we are draining.
            deadline = time.monotonic() + self.interval
            while len(self._queue) < self.batch_size and not self._stopping and time.monotonic() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            # Automatic rewards ride in the same transaction, after the calls: a rule's reward is queued just
            # before its call, so both normally land in one batch (rewards have no foreign key either way).
            rewards = [self._rewards.popleft() for _ in range(min(4 * self.batch_size, len(self._rewards)))]
            if not batch and not rewards:
                continue
            self._writing = (batch, rewards)
            await self._write_with_retry(batch, rewards)
            self._writing = None
            self.rewards_written_total += len(rewards)
            for rec in batch:
                sid = rec.session_id
                self._pending[sid] -= 1
                if not self._pending[sid]:
                    del self._pending[sid]
                self._pending_calls.pop(rec.id, None)
            self.written_total += len(batch)
            async with self._written:
                self._written.notify_all()
            async with self._room:
                self._room.notify_all()

    async def _write_once(self, batch: list[CallRecord], rewards: list[RewardRecord]) -> None:
        async with self.engine.begin() as conn:
            await write_batch(conn, batch, rewards)

    async def _write_with_retry(self, batch: list[CallRecord], rewards: list[RewardRecord] = ()) -> None:
        """Transient failures (database down, connection lost) are retried until they pass. A batch the
        database rejects as data (a value it cannot store) is written row by row, so one bad row cannot hold
        up the queue; rows still rejected go to a `rejected-*.jsonl` file beside the spool, with the error."""
        attempt_limit = 8 if self._stopping else 10**9
        try:
            async for attempt in AsyncRetrying(wait=wait_exponential(multiplier=0.1, max=5),
                                               stop=stop_after_attempt(attempt_limit),
                                               retry=retry_if_exception(_transient), reraise=True):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.failed_batches += 1
                        exc = attempt.retry_state.outcome.exception() if attempt.retry_state.outcome else None
                        log.warning("retrying a batch of %d calls (attempt %d): %s", len(batch),
                                    attempt.retry_state.attempt_number, exc)
                    await self._write_once(batch, list(rewards))
        except Exception as exc:
            if _transient(exc):
                log.exception("could not write %d calls and %d rewards; spooling them to disk", len(batch),
                              len(rewards))
                self._spool(batch, list(rewards))
                return
            log.error("the database rejected a batch (%s); writing its rows one by one", exc)
            rejected: list[tuple[CallRecord | RewardRecord, str]] = []
            singles: list[tuple[list[CallRecord], list[RewardRecord]]] = [([c], []) for c in batch]
            singles += [([], [r]) for r in rewards]
            for calls, rews in singles:
                try:
                    await self._write_once(calls, rews)
                except Exception as row_exc:
                    if _transient(row_exc):
                        self._spool(calls, rews)
                    else:
                        rejected.extend((row, repr(row_exc)) for row in [*calls, *rews])
            self._reject(rejected)

    def _reject(self, rows: list[tuple[CallRecord | RewardRecord, str]]) -> None:
        if not rows:
            return
        self.rejected_total += len(rows)
        if not self.spool_dir:
            log.error("no spool dir: %d rejected rows lost", len(rows))
            return
        path = spool.write_rejected(self.spool_dir, rows)
        log.error("the database rejected %d rows; kept in %s with the error", len(rows), path)

    # --- spool ----------------------------------------------------------------------------------
    def _spool(self, batch: list[CallRecord], rewards: list[RewardRecord] = ()) -> None:
        if not batch and not rewards:
            return
        if not self.spool_dir:
            log.error("no spool dir: %d calls and %d rewards lost", len(batch), len(rewards))
            return
        path = spool.write(self.spool_dir, batch, rewards)
        log.error("spooled %d calls and %d rewards to %s; they are written at the next start", len(batch),
                  len(rewards), path)

    async def _replay_spool(self) -> None:
        if not self.spool_dir:
            return
        for path in spool.claim(self.spool_dir):
            calls, rewards = spool.read(path)
            if calls or rewards:
                async with self.engine.begin() as conn:
                    await write_batch(conn, calls, rewards)
            path.unlink()
            log.info("replayed %d spooled calls and %d rewards from %s", len(calls), len(rewards), path)
