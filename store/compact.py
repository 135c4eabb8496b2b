"""`trainwire compact-calls`: re-store the calls of an existing database as deltas (store/call_deltas.py), the
way the write path stores new ones with `--call-deltas`. Rows written before migration 0004, or with
`--no-call-deltas`, hold every call's whole conversation; after this they hold what each call adds.

How:
- Sessions are taken in batches of `batch_sessions`, in session id order (keyset). Each batch is one
  transaction. Session by session (what is held in memory is one session's calls), the calls are loaded with
  their full values (`delta_reads.full_rows`), encoded in order (start time, seq, id) against the last calls of
  their session with `call_deltas.encode` and a `DeltaCache` (store/delta_cache.py), as the writer would have
  stored them, and every whole row that shares a prefix with an earlier call is rewritten in place as a delta
  of it. Rows already stored as deltas stay as they are
  (and serve as bases). A row's full values never change, so readers see exactly the same before and after.
- Resumable: the batch's transaction also records the last session id done (`store_info`), so an interrupted
  run (SIGINT, SIGTERM, a crash, a lost connection) loses at most the batch in flight, and the next run goes on
  after the last committed one. A run that completes records when it started; the next run only looks at the
  sessions with a call since then (less `RESCAN_MARGIN`, for calls that were in flight), or, with
  `restart`, at every session again.
- Safe beside a running proxy: the proxy only inserts calls (`ON CONFLICT DO NOTHING`), never rewrites one, and
  the bases its writer encodes new calls against hold full values, which a rewrite keeps. A new call of a
  session being compacted is simply not in this batch (it is a delta already, or the next run's). A base is
  only chosen where it does not depend on the row being rewritten (no cycle with a delta the writer made
  against a call that started later). A whole row that a delta already refers to is left whole (checked in the
  UPDATE itself, so also against a delta the writer commits meanwhile): a reader that loaded that delta, then
  the whole row as the end of its chain, must not find the row turned into a delta of a call it did not load.
  Runs of the command itself are serialized by a lock (a Postgres advisory lock; SQLite's write lock, taken at
  BEGIN).
- Pruned sessions (store/retention.py) have no bodies and are skipped.
- The space: rewritten rows leave their old versions behind. Postgres reuses it after (auto)vacuum, SQLite reuses
  the freed pages; neither file shrinks until `VACUUM FULL calls` / pg_repack (Postgres) or `VACUUM` (SQLite).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Table, and_, bindparam, delete, exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.records import CallRecord
from trainwire.store.call_deltas import encode, remember
from trainwire.store.db import write_tx
from trainwire.store.delta_cache import DeltaCache
from trainwire.store.delta_reads import DELTA_COLS, full_rows
from trainwire.store.models import Call, Session, StoreInfo

__all__ = ["CompactReport", "RESCAN_MARGIN", "compact_calls", "stored_bytes"]

C: Table = Call.__table__  # type: ignore[assignment]
S: Table = Session.__table__  # type: ignore[assignment]
INFO: Table = StoreInfo.__table__  # type: ignore[assignment]

# store_info keys: the run in progress ({"started", "since", "after"}) and the start of the last complete run.
RUN_KEY = "compact_calls.run"
DONE_KEY = "compact_calls.complete"
# A later run looks again at sessions with a call started this long before the previous complete run began:
# a call in flight then (a long stream; the proxy's upstream timeout is 10 minutes) was written after it.
RESCAN_MARGIN = timedelta(hours=1)
_LOCK_ID = 0x7472_636F_6D70  # "trcomp": the Postgres advisory lock serializing runs

_LOAD = [
    C.c.id,
    C.c.session_id,
    C.c.seq,
    C.c.kind,
    C.c.started_at,
    C.c.request,
    C.c.prompt_token_ids,
    C.c.completion_token_ids,
    *DELTA_COLS,
]


def stored_bytes(prompt_token_ids: Any, request: Any) -> int:
    """What a row's two delta-encoded columns hold, in bytes: 4 per token id, and the request's JSON."""
    n = 4 * len(prompt_token_ids or ())
    if request is not None:
        n += len(orjson.dumps(request, option=orjson.OPT_NON_STR_KEYS))
    return n


@dataclass(slots=True)
class CompactReport:
    total: int = 0  # sessions this run had to look at, when it started (resumed runs: what was left)
    sessions: int = 0  # sessions looked at
    calls: int = 0  # calls loaded
    rewritten: int = 0  # whole rows now stored as deltas
    bytes_before: int = 0  # prompt token ids + request of the rewritten rows, before
    bytes_after: int = 0  # ... and after
    resumed_after: str | None = None
    since: datetime | None = None
    complete: bool = False
    interrupted: bool = False
    dry_run: bool = False
    batches: list[int] = field(default_factory=list)


async def _info(conn, key: str) -> str | None:
    return (await conn.execute(select(INFO.c.value).where(INFO.c.key == key))).scalar()


async def _set_info(conn, key: str, value: str | None) -> None:
    await conn.execute(delete(INFO).where(INFO.c.key == key))
    if value is not None:
        await conn.execute(insert(INFO).values(key=key, value=value))


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _wanted(since: datetime | None, after: str | None):
    cond: list[Any] = [S.c.pruned_at.is_(None)]
    if since is not None:
        cond.append(S.c.last_call_at >= since)
    if after is not None:
        cond.append(S.c.id > after)
    return and_(*cond)


def _record(m: dict[str, Any]) -> CallRecord:
    """What encode reads of a loaded row (its full values)."""
    return CallRecord(
        id=m["id"],
        session_id=m["session_id"],
        seq=m["seq"],
        kind=m["kind"],
        path="",
        status_code=0,
        started_at=m["started_at"],
        finished_at=m["started_at"],
        request=m["request"],
        prompt_token_ids=m["prompt_token_ids"],
        completion_token_ids=m["completion_token_ids"],
    )


def _depends_on(base_of: dict[str, str | None], start: str | None, call_id: str) -> bool:
    """Whether the chain of bases from `start` reaches `call_id`."""
    seen = 0
    at = start
    while at is not None:
        if at == call_id:
            return True
        at = base_of.get(at)
        seen += 1
        if seen > len(base_of) + 1:
            return True  # a cycle already (never written by trainwire): keep away from it
    return False


def _encode_session(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The updates that store the whole rows of one session (full values, in order) as deltas."""
    cache = DeltaCache(max_sessions=1, max_age_s=None)  # the session's calls, read in this transaction
    sid = rows[0]["session_id"] if rows else ""
    base_of: dict[str, str | None] = {
        r["id"]: r["base_call_id"]
        for r in rows
        if r["prompt_prefix_len"] is not None or r["messages_prefix_len"] is not None
    }
    referenced = set(base_of.values())
    updates = []
    for m in rows:
        record = _record(m)
        mine = remember(record)
        whole = m["base_call_id"] is None and m["prompt_prefix_len"] is None and m["messages_prefix_len"] is None
        if whole and m["id"] not in referenced:
            bases = cache.bases(sid)
            while True:
                row = encode(bases, record, mine)
                if row is record or not _depends_on(base_of, row.base_call_id, record.id):
                    break
                bases = [b for b in bases if b.id != row.base_call_id]
            if row is not record:
                base_of[record.id] = row.base_call_id
                u: dict[str, Any] = {
                    "b_id": record.id,
                    "b_base": row.base_call_id,
                    "b_plen": row.prompt_prefix_len,
                    "b_mlen": row.messages_prefix_len,
                    "before": stored_bytes(m["prompt_token_ids"], m["request"]),
                    "after": stored_bytes(row.prompt_token_ids, row.request),
                }
                if row.prompt_prefix_len is not None:
                    u["b_tokens"] = row.prompt_token_ids
                if row.messages_prefix_len is not None:
                    u["b_request"] = row.request
                updates.append(u)
        cache.add(sid, mine)
    return updates


def _update(tokens: bool, request: bool):
    """The UPDATE of rows rewritten as deltas; only the columns that change (a value left as it is stays exactly
    as stored, a SQL NULL included)."""
    values: dict[str, Any] = {
        "base_call_id": bindparam("b_base"),
        "prompt_prefix_len": bindparam("b_plen"),
        "messages_prefix_len": bindparam("b_mlen"),
    }
    if tokens:
        values["prompt_token_ids"] = bindparam("b_tokens")
    if request:
        values["request"] = bindparam("b_request")
    later = C.alias("later")
    # `request IS NOT NULL`: a row prune dropped the body of meanwhile (its whole session, in one transaction;
    # Postgres rechecks the WHERE on the row as prune left it) is left as it is, never turned into a delta.
    return (
        update(C)
        .where(
            C.c.id == bindparam("b_id"),
            C.c.request.is_not(None),
            C.c.base_call_id.is_(None),
            C.c.prompt_prefix_len.is_(None),
            C.c.messages_prefix_len.is_(None),
            ~exists().where(later.c.session_id == C.c.session_id, later.c.base_call_id == C.c.id),
        )
        .values(values)
    )


async def _batch(conn, session_ids: list[str], report: CompactReport, dry_run: bool) -> None:
    # One session at a time: what is held in memory is one session's calls with their full values.
    for sid in session_ids:
        loaded = [
            r._mapping
            for r in (
                await conn.execute(
                    select(*_LOAD).where(C.c.session_id == sid).order_by(C.c.started_at, C.c.seq, C.c.id)
                )
            ).all()
        ]
        rows = await full_rows(conn, loaded, tokens=True)
        report.calls += len(rows)
        updates = _encode_session(rows)
        del loaded, rows
        report.rewritten += len(updates)
        report.bytes_before += sum(u.pop("before") for u in updates)
        report.bytes_after += sum(u.pop("after") for u in updates)
        if dry_run:
            continue
        # In order: a row is rewritten before the rows that become deltas of it (the UPDATE leaves a row that a
        # delta refers to as it is).
        for (tokens, request), group in itertools.groupby(updates, key=lambda u: ("b_tokens" in u, "b_request" in u)):
            await conn.execute(_update(tokens, request), list(group))


async def compact_calls(
    engine: AsyncEngine,
    *,
    batch_sessions: int = 50,
    max_sessions: int = 0,
    dry_run: bool = False,
    restart: bool = False,
    say: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
) -> CompactReport:
    """Compact the sessions not compacted yet, `batch_sessions` per transaction; stop after `max_sessions`
    (0: all), or when `should_stop()` (asked before each batch: the command's SIGINT / SIGTERM, trainwire/cli.py);
    the next run goes on."""
    report = CompactReport(dry_run=dry_run)
    async with engine.connect() as conn:
        run = await _info(conn, RUN_KEY)
        done = await _info(conn, DONE_KEY)
    now = datetime.now(UTC)
    if run and not restart:
        state = json.loads(run)
        started = state["started"]
        since = datetime.fromisoformat(state["since"]) if state["since"] else None
        after = state["after"]
        report.resumed_after = after
    else:
        started = now.isoformat()
        since = datetime.fromisoformat(done) - RESCAN_MARGIN if done and not restart else None
        after = None
    report.since = since
    async with engine.connect() as conn:
        report.total = int(
            (await conn.execute(select(func.count()).select_from(S).where(_wanted(since, after)))).scalar() or 0
        )
    where = f"resuming after session {after!r}, " if after else ""
    scope = f"sessions with a call since {since.isoformat()}" if since else "every session"
    say(f"{where}{report.total} sessions to look at ({scope}){' (dry run: nothing is written)' if dry_run else ''}")
    t0 = last_say = time.monotonic()
    while True:
        if should_stop():
            report.interrupted = True
            break
        limit = batch_sessions
        if max_sessions:
            limit = min(limit, max_sessions - report.sessions)
            if limit <= 0:
                break
        async with write_tx(engine, _LOCK_ID) as conn:
            ids = list(
                (
                    await conn.execute(select(S.c.id).where(_wanted(since, after)).order_by(S.c.id).limit(limit))
                ).scalars()
            )
            if not ids:
                report.complete = True
                if not dry_run:
                    await _set_info(conn, RUN_KEY, None)
                    await _set_info(conn, DONE_KEY, started)
                break
            await _batch(conn, ids, report, dry_run)
            after = ids[-1]
            if not dry_run:
                await _set_info(
                    conn,
                    RUN_KEY,
                    json.dumps({"started": started, "since": since.isoformat() if since else None, "after": after}),
                )
        report.sessions += len(ids)
        report.batches.append(len(ids))
        if time.monotonic() - last_say >= 1.0:
            last_say = time.monotonic()
            say(_progress(report, time.monotonic() - t0))
    say(_progress(report, time.monotonic() - t0))
    return report


def _progress(r: CompactReport, elapsed: float) -> str:
    saved = f", {r.bytes_before:,} -> {r.bytes_after:,} bytes of prompt tokens and requests" if r.rewritten else ""
    verb = "would be stored" if r.dry_run else "stored"
    return f"{r.sessions}/{r.total} sessions, {r.calls} calls, {r.rewritten} {verb} as deltas{saved} ({elapsed:.1f}s)"
