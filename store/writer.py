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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from trainwire.store import pg_write
from trainwire.store.models import Call, Reward, Session

log = logging.getLogger("trainwire.writer")

_REWARD_TAG = "__trainwire_reward__"


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the database is unreachable or the connection broke. Not: it rejected the data."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    return not isinstance(exc, (sa_exc.StatementError, ValueError, TypeError))


def _insert_for(engine: AsyncEngine):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def session_rows(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One upsert row per session touched by a batch of calls."""
    rows: dict[str, dict[str, Any]] = {}
    for c in calls:
        row = rows.get(c["session_id"])
        if row is None:
            rows[c["session_id"]] = {"id": c["session_id"], "task_id": c.get("task_id"), "n_calls": 1,
                                     "first_call_at": c["started_at"], "last_call_at": c["started_at"]}
        else:
            row["n_calls"] += 1
            row["first_call_at"] = min(row["first_call_at"], c["started_at"])
            row["last_call_at"] = max(row["last_call_at"], c["started_at"])
            row["task_id"] = row["task_id"] or c.get("task_id")
    return list(rows.values())


async def write_calls(conn, engine: AsyncEngine, calls: list[dict[str, Any]]) -> None:
    """Insert calls (idempotent on the call id, so a replayed spool cannot double-write) and upsert sessions."""
    if not calls:
        return
    rows = session_rows(calls)
    if engine.dialect.name == "postgresql":
        await pg_write.insert_calls(conn, calls)
        await pg_write.upsert_sessions(conn, rows)
        await pg_write.adopt_final_rewards(conn, [r["id"] for r in rows])
        return
    insert = _insert_for(engine)
    await conn.execute(insert(Call.__table__).on_conflict_do_nothing(index_elements=["id"]), calls)
    stmt = insert(Session.__table__)
    stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={
        "n_calls": Session.__table__.c.n_calls + stmt.excluded.n_calls,
        "last_call_at": func.max(Session.__table__.c.last_call_at, stmt.excluded.last_call_at),
        "first_call_at": func.min(Session.__table__.c.first_call_at, stmt.excluded.first_call_at),
        "task_id": func.coalesce(Session.__table__.c.task_id, stmt.excluded.task_id),
    })
    # Sorted so concurrent writers lock session rows in the same order: no deadlock.
    await conn.execute(stmt, sorted(rows, key=lambda r: r["id"]))
    await adopt_final_rewards(conn, [r["id"] for r in rows])


async def adopt_final_rewards(conn, session_ids: list[str]) -> None:
    """A final reward can arrive before its session's first call is written (another proxy worker's queue):
    copy it onto the session row once the row exists, so `finished_at`/`final_reward` agree with the rewards
    table. Sessions that already have `finished_at`, or no final reward, are untouched (the common case)."""
    if not session_ids:
        return
    from sqlalchemy import and_, exists, select, update

    s, r = Session.__table__, Reward.__table__
    final = and_(r.c.session_id == s.c.id, r.c.final.is_(True))
    await conn.execute(update(s).where(s.c.id.in_(session_ids), s.c.finished_at.is_(None),
                                       exists().where(final))
                       .values(finished_at=select(r.c.created_at).where(final).scalar_subquery(),
                               final_reward=select(r.c.value).where(final).scalar_subquery()))


async def write_rewards(conn, engine: AsyncEngine, rewards: list[dict[str, Any]]) -> None:
    """Insert automatic rewards; one with an idempotency key that is already stored is skipped."""
    if not rewards:
        return
    insert = _insert_for(engine)
    await conn.execute(insert(Reward.__table__).on_conflict_do_nothing(index_elements=["idempotency_key"]),
                       rewards)


class BatchWriter:
    def __init__(self, engine: AsyncEngine, *, batch_size: int = 256, interval_ms: int = 50,
                 max_queue: int = 10000, spool_dir: Path | None = None) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.interval = interval_ms / 1000
        self.max_queue = max_queue
        self.spool_dir = spool_dir
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._rewards: collections.deque[dict[str, Any]] = collections.deque()  # AIR rewards waiting
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._written = asyncio.Condition()
        self._pending: collections.Counter[str] = collections.Counter()   # session -> queued calls
        self._inflight: collections.Counter[str] = collections.Counter()  # session -> calls being served
        self._pending_calls: dict[str, str] = {}                          # call id -> session id, while queued
        self._task: asyncio.Task | None = None
        self._writing: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None  # batch being written
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

    def submit(self, record: dict[str, Any]) -> None:
        sid = record["session_id"]
        if self._inflight[sid] > 0:
            self._inflight[sid] -= 1
            if not self._inflight[sid]:
                del self._inflight[sid]
        self._pending[sid] += 1
        self._pending_calls[record["id"]] = sid
        self._queue.append(record)
        # Wake the writer on the first record (so it waits at most `interval`, not its 1 s idle poll) and
        # when a batch is full.
        if len(self._queue) == 1 or len(self._queue) >= self.batch_size:
            self._wake.set()

    def submit_reward(self, reward: dict[str, Any]) -> None:
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
                sid = rec["session_id"]
                self._pending[sid] -= 1
                if not self._pending[sid]:
                    del self._pending[sid]
                self._pending_calls.pop(rec["id"], None)
            self.written_total += len(batch)
            async with self._written:
                self._written.notify_all()
            async with self._room:
                self._room.notify_all()

    async def _write_once(self, batch: list[dict[str, Any]], rewards: list[dict[str, Any]]) -> None:
        async with self.engine.begin() as conn:
            if batch:
                await write_calls(conn, self.engine, batch)
            await write_rewards(conn, self.engine, list(rewards))

    async def _write_with_retry(self, batch: list[dict[str, Any]], rewards: list[dict[str, Any]] = ()) -> None:
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
                    await self._write_once(batch, rewards)
        except Exception as exc:
            if _transient(exc):
                log.exception("could not write %d calls and %d rewards; spooling them to disk", len(batch),
                              len(rewards))
                self._spool(batch, list(rewards))
                return
            log.error("the database rejected a batch (%s); writing its rows one by one", exc)
            rejected: list[tuple[dict[str, Any], str]] = []
            for row, is_reward in [(c, False) for c in batch] + [(r, True) for r in rewards]:
                try:
                    await self._write_once([] if is_reward else [row], [row] if is_reward else [])
                except Exception as row_exc:
                    if _transient(row_exc):
                        self._spool([] if is_reward else [row], [row] if is_reward else [])
                    else:
                        rejected.append(({**row, _REWARD_TAG: True} if is_reward else row, repr(row_exc)))
            self._reject(rejected)

    def _reject(self, rows: list[tuple[dict[str, Any], str]]) -> None:
        if not rows:
            return
        self.rejected_total += len(rows)
        if not self.spool_dir:
            log.error("no spool dir: %d rejected rows lost", len(rows))
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"rejected-{int(time.time())}-{uuid.uuid4().hex[:8]}.jsonl"
        with path.open("wb") as f:
            for row, error in rows:
                f.write(orjson.dumps({"error": error, "row": row}, default=str) + b"\n")
        log.error("the database rejected %d rows; kept in %s with the error", len(rows), path)

    # --- spool ----------------------------------------------------------------------------------
    def _spool(self, batch: list[dict[str, Any]], rewards: list[dict[str, Any]] = ()) -> None:
        if not batch and not rewards:
            return
        if not self.spool_dir:
            log.error("no spool dir: %d calls and %d rewards lost", len(batch), len(rewards))
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"spool-{int(time.time())}-{uuid.uuid4().hex[:8]}.jsonl"
        with path.open("wb") as f:
            for rec in batch:
                f.write(orjson.dumps(rec) + b"\n")
            for rec in rewards:  # tagged, so older spool files (calls only) still read the same
                f.write(orjson.dumps({**rec, _REWARD_TAG: True}) + b"\n")
        log.error("spooled %d calls and %d rewards to %s; they are written at the next start", len(batch),
                  len(rewards), path)

    async def _replay_spool(self) -> None:
        if not self.spool_dir or not self.spool_dir.exists():
            return
        for path in self._claim_spool_files():
            rows, rewards = [], []
            for line in path.read_bytes().splitlines():
                if not line.strip():
                    continue
                row = orjson.loads(line)
                (rewards if row.pop(_REWARD_TAG, False) else rows).append(row)
                for key in ("started_at", "finished_at", "created_at"):
                    if isinstance(row.get(key), str):
                        row[key] = datetime.fromisoformat(row[key])
            if rows or rewards:
                async with self.engine.begin() as conn:
                    if rows:
                        await write_calls(conn, self.engine, rows)
                    await write_rewards(conn, self.engine, rewards)
            path.unlink()
            log.info("replayed %d spooled calls and %d rewards from %s", len(rows), len(rewards), path)

    def _claim_spool_files(self) -> list[Path]:
        """Spool files for this process to replay. Several workers start together on one spool dir: each file
        is claimed by renaming it to `replaying-<pid>-...`, which only one of them can do. A claim left by a
        process that no longer runs (it died mid-replay) is taken over."""
        claimed = []
        candidates = [(p, p.name) for p in self.spool_dir.glob("spool-*.jsonl")]
        for p in self.spool_dir.glob("replaying-*.jsonl"):
            _, pid, original = p.name.split("-", 2)
            if not _alive(int(pid)):
                candidates.append((p, original))
        for path, original in sorted(candidates, key=lambda c: c[1]):
            mine = path.with_name(f"replaying-{os.getpid()}-{original}")
            try:
                path.rename(mine)
            except FileNotFoundError:
                continue  # another worker claimed it first
            claimed.append(mine)
        return claimed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a claim of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
