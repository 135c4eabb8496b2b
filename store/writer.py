"""The batched write path. Recorded calls are appended to the local journal (store/journal.py), then queued in
memory and written to the database in batches bounded by size and time, so a response never waits for the
database and nothing acknowledged is lost when the database, or the proxy itself, goes away.

- Adding a record never blocks and never drops: backpressure is applied earlier, at request admission
  (`wait_for_room`), so a call that already reached the upstream can always be recorded, even while its
  client is disconnecting.
- A batch that fails because the database is away (store/db_errors.py sorts errors by SQLSTATE) is retried with
  backoff until it is written. One the database refuses as data is written row by row, so one bad row cannot hold
  up the queue; rows still refused go to a `rejected-*.jsonl` file with their error.
- The journal keeps every record until it is in the database: at shutdown, and after a SIGKILL, what was not
  written yet stays there and the next start writes it first, idempotently.
- `flush_session` lets the reward endpoint wait until a session's calls are in the database, so a reward
  posted right after the last response never races its own calls.
- Automatic rewards (AIR, `submit_reward`) have a queue of their own; they are written in the same transaction
  as the calls of the batch, after them, with the same guarantees. Each carries a deterministic idempotency key.
- With `call_deltas` (the default), a call is written as what it adds to a call of its session that an earlier
  batch of this writer committed (store/call_deltas.py), found in a bounded LRU cache of the last few calls of
  each session (store/delta_cache.py). The encoding happens here, while the batch is built, never on a request. A
  call whose base is not in the cache (another worker's session, a restart, an evicted session) is stored whole,
  and so is every row of a batch the database refused as data (written one by one), so a delta never points at
  a row that is not there. The journal keeps whole records; replayed ones are stored whole.

This module is the queue, its backpressure and its retries; the SQL of each database is in
store/write_postgres.py and store/write_sqlite.py behind store/write_sql.write_batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential

from trainwire.records import CallRecord, RewardRecord
from trainwire.store.call_deltas import BaseCall, encode_call
from trainwire.store.db_errors import is_transient
from trainwire.store.delta_cache import DeltaCache
from trainwire.store.journal import Journal, Segment, read_records
from trainwire.store.write_sql import write_batch

log = logging.getLogger("trainwire.writer")

REPLAY_BATCH = 500
ENCODE_SLICE_S = 0.002


class BatchWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_size: int = 256,
        interval_ms: int = 50,
        max_queue: int = 10000,
        journal: Journal | None = None,
        call_deltas: bool = True,
        delta_cache: DeltaCache | None = None,
    ) -> None:
        self.engine = engine
        # Where calls are stored as deltas: the committed calls they may refer to (None: every call whole).
        self.deltas = (delta_cache if delta_cache is not None else DeltaCache()) if call_deltas else None
        self.delta_total = 0
        self.batch_size = batch_size
        self.interval = interval_ms / 1000
        self.max_queue = max_queue
        self.journal = journal
        self._queue: collections.deque[CallRecord] = collections.deque()
        self._rewards: collections.deque[RewardRecord] = collections.deque()  # AIR rewards waiting
        # The journal segment of each queued record, in queue order (None without a journal).
        self._call_segs: collections.deque[Segment | None] = collections.deque()
        self._reward_segs: collections.deque[Segment | None] = collections.deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._written = asyncio.Condition()
        self._pending: collections.Counter[str] = collections.Counter()  # session -> queued calls
        self._inflight: collections.Counter[str] = collections.Counter()  # session -> calls being served
        self._pending_calls: dict[str, str] = {}  # call id -> session id, while queued
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.database_down_since: float | None = None
        self.written_total = 0
        self.rewards_written_total = 0
        self.replayed_total = 0
        self.failed_batches = 0
        self.rejected_total = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        leftovers = self.journal.claim_leftovers() if self.journal else []
        self._task = asyncio.create_task(self._run(leftovers), name="trainwire-writer")

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue; what cannot be written within `timeout` stays in the journal for the next start."""
        self._stopping = True
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except BaseException:
                    pass
        left = self.journal.close() if self.journal else len(self._queue) + len(self._rewards)
        if left:
            where = f"kept in the journal at {self.journal.dir}" if self.journal else "LOST (no journal)"
            log.error("the database is still away at shutdown: %d records %s; the next start writes them", left, where)

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
        self._call_segs.append(self.journal.append(record) if self.journal else None)
        self._pending[sid] += 1
        self._pending_calls[record.id] = sid
        self._queue.append(record)
        # Wake the writer on the first record (so it waits at most `interval`, not its 1 s idle poll) and
        # when a batch is full.
        if len(self._queue) == 1 or len(self._queue) >= self.batch_size:
            self._wake.set()

    def submit_reward(self, reward: RewardRecord) -> None:
        """Queue an automatic reward (with its idempotency key)."""
        self._reward_segs.append(self.journal.append(reward) if self.journal else None)
        self._rewards.append(reward)
        if len(self._rewards) == 1 or len(self._rewards) >= self.batch_size:
            self._wake.set()

    @property
    def reward_depth(self) -> int:
        return len(self._rewards)

    @property
    def database_down(self) -> bool:
        return self.database_down_since is not None

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
            except TimeoutError:
                return False

    # --- consumer side --------------------------------------------------------------------------
    async def _run(self, leftovers) -> None:
        for path in leftovers:
            if not await self._replay(path):
                return  # stopping while the database is still away: the file stays for the next start
        while True:
            if self.journal:
                self.journal.sync()
            if not self._queue and not self._rewards:
                if self._stopping:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval if self.journal else 1.0)
                except TimeoutError:
                    continue
            # Let a batch fill for up to `interval` unless it is already full or we are draining.
            deadline = time.monotonic() + self.interval
            while len(self._queue) < self.batch_size and not self._stopping and time.monotonic() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
            # Rewards ride in the same transaction, after the calls: a rule's reward is queued just before its
            # call, so both normally land in one batch (rewards have no foreign key either way). The batch stays
            # at the head of the queues until it is written.
            batch = list(_head(self._queue, self.batch_size))
            rewards = list(_head(self._rewards, 4 * self.batch_size))
            if not batch and not rewards:
                continue
            stored, remembered, oldest = await self._encode(batch)
            written = await self._write_with_retry(stored, rewards, whole=batch, oldest_base=oldest)
            if written is None:
                return  # stopping while the database is away: the journal keeps them
            self._remember(batch, remembered, written)
            self._pop_written(len(batch), len(rewards))
            async with self._written:
                self._written.notify_all()
            async with self._room:
                self._room.notify_all()

    def _pop_written(self, n_calls: int, n_rewards: int) -> None:
        segs = [self._call_segs.popleft() for _ in range(n_calls)]
        segs += [self._reward_segs.popleft() for _ in range(n_rewards)]
        for _ in range(n_rewards):
            self._rewards.popleft()
        for _ in range(n_calls):
            rec = self._queue.popleft()
            sid = rec.session_id
            self._pending[sid] -= 1
            if not self._pending[sid]:
                del self._pending[sid]
            self._pending_calls.pop(rec.id, None)
        if self.journal:
            self.journal.done(s for s in segs if s is not None)
        self.written_total += n_calls
        self.rewards_written_total += n_rewards

    async def _write_once(self, calls: list[CallRecord], rewards: list[RewardRecord], dedupe: bool) -> None:
        async with self.engine.begin() as conn:
            await write_batch(conn, calls, rewards, dedupe=dedupe)

    async def _encode(self, batch: list[CallRecord]) -> tuple[list[CallRecord], list[BaseCall | None], float | None]:
        """The rows to write for a batch (deltas against calls of earlier committed batches, or the records
        themselves), what to remember of each call once it is committed, and when the oldest base a delta of
        the batch refers to started (None: no delta). Encoding a long session's call
        takes a fraction of a millisecond (serializing its token ids and messages once); the event loop gets
        a turn every `ENCODE_SLICE_S`, so requests never wait for a whole batch to be encoded."""
        if self.deltas is None:
            return batch, [], None
        stored: list[CallRecord] = []
        remembered: list[BaseCall | None] = []
        oldest: float | None = None
        now = time.time()
        since = time.perf_counter()
        for record in batch:
            if time.perf_counter() - since > ENCODE_SLICE_S:
                await asyncio.sleep(0)
                since = time.perf_counter()
            try:
                bases = self.deltas.bases(record.session_id, now)
                row, mine = encode_call(bases, record)
            except Exception:  # never let the encoding stop the write path: this call is stored whole
                log.exception("could not encode call %s as a delta; storing it whole", record.id)
                row, mine = record, None
            if row.base_call_id is not None:
                at = next(b.started for b in bases if b.id == row.base_call_id)
                oldest = at if oldest is None else min(oldest, at)
            stored.append(row)
            remembered.append(mine)
        return stored, remembered, oldest

    def _remember(self, batch: list[CallRecord], remembered: list[BaseCall | None], written: set[str]) -> None:
        if self.deltas is None:
            return
        for record, mine in zip(batch, remembered, strict=True):
            if mine is not None and record.id in written:
                self.deltas.add(record.session_id, mine)

    async def _write_with_retry(
        self,
        calls: list[CallRecord],
        rewards: list[RewardRecord],
        whole: Sequence[CallRecord] | None = None,
        oldest_base: float | None = None,
    ) -> set[str] | None:
        """The ids of the calls in the database once the batch is written (rows refused as data set aside as
        rejected); None when the writer is stopping and the database is still away. While the database is
        away this retries forever, with backoff, and the queue behind it applies backpressure at admission.
        `whole`: the batch's records with their full values when `calls` holds deltas; a batch the database
        refuses as data is written row by row from these, so no delta can refer to a row that was refused.
        `oldest_base`: when the oldest base of `calls`' deltas started; an attempt that begins once it is past
        the cache's age limit writes `whole` instead (a base that old may belong to a pruned session)."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.1, max=5),
            retry=retry_if_exception(is_transient),
            stop=self._give_up,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    n = attempt.retry_state.attempt_number
                    if n > 1:
                        self.failed_batches += 1
                        exc = attempt.retry_state.outcome.exception() if attempt.retry_state.outcome else None
                        if self.database_down_since is None:
                            self.database_down_since = time.time()
                        if n == 2 or n % 20 == 0:
                            log.warning(
                                "the database is away (%s); retrying a batch of %d calls (attempt %d); "
                                "the journal holds them meanwhile",
                                exc,
                                len(calls),
                                n,
                            )
                    if (
                        oldest_base is not None
                        and whole is not None
                        and self.deltas is not None
                        and self.deltas.max_age_s is not None
                        and time.time() - oldest_base > self.deltas.max_age_s
                    ):
                        log.info(
                            "a batch's delta bases expired while it waited; writing its %d calls whole", len(calls)
                        )
                        calls, oldest_base = list(whole), None
                    # A retry may follow a commit whose answer was lost: skip rows already stored.
                    await self._write_once(calls, rewards, dedupe=n > 1)
            self.delta_total += sum(1 for c in calls if c.base_call_id is not None)
            written = {c.id for c in calls}
        except Exception as exc:
            if is_transient(exc):
                return None
            log.error("the database refused a batch as data (%s); writing its rows one by one", exc)
            singles = list(whole if whole is not None else calls)
            refused = await self._write_rows(singles, rewards)
            written = {c.id for c in singles} - refused
        if self.database_down_since is not None:
            log.info("the database is back after %.1fs", time.time() - self.database_down_since)
            self.database_down_since = None
        return written

    def _give_up(self, retry_state) -> bool:
        # Retrying never ends while serving; when stopping, give up after a few attempts so shutdown is bounded
        # (the journal keeps the batch).
        return self._stopping and retry_state.attempt_number >= 4

    async def _write_rows(self, calls: list[CallRecord], rewards: list[RewardRecord]) -> set[str]:
        """Write rows one at a time; returns the ids of the calls the database refused (kept as rejected)."""
        rejected: list[tuple[CallRecord | RewardRecord, str]] = []
        singles: list[tuple[list[CallRecord], list[RewardRecord]]] = [([c], []) for c in calls]
        singles += [([], [r]) for r in rewards]
        for one_call, one_reward in singles:
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.1, max=5), retry=retry_if_exception(is_transient), reraise=True
            ):
                with attempt:
                    try:
                        await self._write_once(one_call, one_reward, dedupe=True)
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        rows: list[CallRecord | RewardRecord] = [*one_call, *one_reward]
                        rejected.extend((row, f"{type(exc).__name__}: {exc}") for row in rows)
        if rejected:
            self.rejected_total += len(rejected)
            if self.journal:
                path = self.journal.reject(rejected)
                log.error(
                    "the database refused %d rows as data; kept in %s with the error (fix, then "
                    "`trainwire replay-rejected`)",
                    len(rejected),
                    path,
                )
            else:
                log.error("the database refused %d rows as data and there is no journal: lost", len(rejected))
        return {row.id for row, _ in rejected if isinstance(row, CallRecord)}

    async def _replay(self, path) -> bool:
        """Write a claimed journal segment (of a process that stopped or died), then delete it."""
        calls, rewards = read_records(path)
        for i in range(0, max(len(calls), len(rewards)), REPLAY_BATCH):
            part_calls, part_rewards = calls[i : i + REPLAY_BATCH], rewards[i : i + REPLAY_BATCH]
            retrying = AsyncRetrying(
                wait=wait_exponential(multiplier=0.1, max=5),
                retry=retry_if_exception(is_transient),
                stop=self._give_up,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._write_once(part_calls, part_rewards, dedupe=True)
            except Exception as exc:
                if is_transient(exc):
                    log.error("the database is still away: %s stays for the next start", path)
                    return False
                await self._write_rows(part_calls, part_rewards)
        path.unlink()
        self.replayed_total += len(calls) + len(rewards)
        log.info("replayed %d calls and %d rewards from %s", len(calls), len(rewards), path.name)
        return True


def _head(queue: collections.deque, n: int):
    for i, item in enumerate(queue):
        if i >= n:
            return
        yield item
