"""`trainwire prune --older-than-days N [--archive-dir DIR] [--dry-run]`: drop the bodies of sessions the
trainer is done with, so the calls table stops growing with history.

Which sessions: status trained or skipped (the trainer never reads them again), last call older than N days
(N >= `MIN_OLDER_THAN_DAYS`, one day: far beyond the age at which the proxy's writer stops storing calls as
deltas of a cached call, store/delta_cache.MAX_BASE_AGE_S), not pruned yet. Whole sessions at a time: a call stored as a delta (store/call_deltas.py) is read through
earlier calls of its own session only, so no call that keeps its body can depend on a pruned one.

What is dropped: each call's request, response, prompt and completion token ids and logprobs (and its delta
columns, which described the token ids and request). Everything else stays: ids, times, models, status, usage,
sampling, rewards, and the session row, whose `pruned_at` (migration 0005) says when; readers show a pruned
call with no input, output or tokens.

Batch by batch (`batch_sessions`, one transaction each): with `archive_dir`, the batch's calls are first
written to `DIR/trainwire-pruned-<UTC time>-<batch>.parquet` by the export's writer (store/export_files.py: its
columns plus the request and response as recorded, read whole also where stored as deltas), under a temporary
name, fsynced, renamed and the directory fsynced; only then are the bodies dropped, and only of the sessions
all of whose calls are in that file (a call recorded meanwhile leaves its session to the next run). On
Postgres the sessions' rows are locked (FOR UPDATE) while they are checked and pruned, which holds off the
write path's upsert of a late call of theirs; on SQLite the transaction holds the write lock. `should_stop` (the command's SIGINT /
SIGTERM, trainwire/cli.py) finishes the batch in flight; an interrupted run's archived-but-not-dropped batch is archived again next time.

On Postgres the space the dropped bodies held (mostly TOAST) is reused for new rows once (auto)vacuum has run;
docs/scaling.md has the measurement (bench/retention.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table, and_, func, null, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.store.db import write_tx
from trainwire.store.export import pages
from trainwire.store.export_files import ARCHIVE_COLUMNS, ParquetSink
from trainwire.store.models import Call, Session

__all__ = ["BODY_COLUMNS", "MIN_OLDER_THAN_DAYS", "PRUNABLE", "PruneReport", "prune"]

C: Table = Call.__table__  # type: ignore[assignment]
S: Table = Session.__table__  # type: ignore[assignment]

PRUNABLE = ("trained", "skipped")
BODY_COLUMNS = (
    "request",
    "response",
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "base_call_id",
    "prompt_prefix_len",
    "messages_prefix_len",
)
_LOCK_ID = 0x7472_7072_756E  # "trprun"
# The smallest --older-than-days (PruneSettings enforces it too). A proxy's writer stores a call as a delta only
# of a call of its session that started less than store/delta_cache.MAX_BASE_AGE_S (an hour) ago; a session prune
# may prune has had no call for a day, so no delta is ever written against a call whose body is dropped.
MIN_OLDER_THAN_DAYS = 1.0


@dataclass(slots=True)
class PruneReport:
    total: int = 0  # sessions to prune when the run started
    sessions: int = 0  # sessions pruned (dry run: that would be)
    calls: int = 0  # their calls
    archived: int = 0  # calls written to archive files
    files: list[Path] | None = None
    deferred: int = 0  # sessions left to the next run (a call recorded while their batch was archived)
    interrupted: bool = False
    dry_run: bool = False
    table_bytes_before: int | None = None  # Postgres: pg_total_relation_size('calls')
    table_bytes_after: int | None = None


def _due(cutoff: datetime, after: str | None):
    cond: list[Any] = [S.c.status.in_(PRUNABLE), S.c.last_call_at < cutoff, S.c.pruned_at.is_(None)]
    if after is not None:
        cond.append(S.c.id > after)
    return and_(*cond)


async def _table_bytes(engine: AsyncEngine) -> int | None:
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.pg_total_relation_size("calls")))).scalar() or 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _archive(engine: AsyncEngine, session_ids: list[str], path: Path) -> dict[str, set[str]]:
    """Write the sessions' calls to `path` (durably); returns the ids written, by session."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written: dict[str, set[str]] = {}
    sink = ParquetSink(tmp, ARCHIVE_COLUMNS)
    try:
        async for rows in pages(engine, [C.c.session_id.in_(session_ids)], raw=True):
            sink.write(rows)
            for r in rows:
                written.setdefault(r["session_id"], set()).add(r["call_id"])
        if not written:
            sink.write([])
        sink.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


async def prune(
    engine: AsyncEngine,
    *,
    older_than_days: float,
    archive_dir: Path | None = None,
    batch_sessions: int = 50,
    dry_run: bool = False,
    now: datetime | None = None,
    say: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
) -> PruneReport:
    if not older_than_days >= MIN_OLDER_THAN_DAYS:
        raise ValueError(f"older_than_days must be at least {MIN_OLDER_THAN_DAYS:g}; got {older_than_days!r}")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=older_than_days)
    report = PruneReport(dry_run=dry_run, files=[])
    async with engine.connect() as conn:
        report.total = int(
            (await conn.execute(select(func.count()).select_from(S).where(_due(cutoff, None)))).scalar() or 0
        )
    report.table_bytes_before = await _table_bytes(engine)
    where = f", archived to {archive_dir}" if archive_dir else ""
    say(
        f"{report.total} trained or skipped sessions with no call since {cutoff.isoformat()}{where}"
        f"{' (dry run: nothing is written)' if dry_run else ''}"
    )
    if archive_dir is not None and not dry_run:
        archive_dir.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    after: str | None = None
    t0 = last_say = time.monotonic()
    while True:
        if should_stop():
            report.interrupted = True
            break
        async with engine.connect() as conn:
            ids = list(
                (
                    await conn.execute(select(S.c.id).where(_due(cutoff, after)).order_by(S.c.id).limit(batch_sessions))
                ).scalars()
            )
        if not ids:
            break
        after = ids[-1]
        if dry_run:
            async with engine.connect() as conn:
                report.calls += int(
                    (await conn.execute(select(func.count()).select_from(C).where(C.c.session_id.in_(ids)))).scalar()
                    or 0
                )
            report.sessions += len(ids)
            continue
        archived: dict[str, set[str]] | None = None
        if archive_dir is not None:
            path = archive_dir / f"trainwire-pruned-{stamp}-{len(report.files or []) + 1:05d}.parquet"
            archived = await _archive(engine, ids, path)
            assert report.files is not None
            report.files.append(path)
            report.archived += sum(len(v) for v in archived.values())
        async with write_tx(engine, _LOCK_ID) as conn:
            lock = select(S.c.id).where(S.c.id.in_(ids), _due(cutoff, None))
            if engine.dialect.name == "postgresql":
                lock = lock.with_for_update()
            still = set((await conn.execute(lock)).scalars())
            calls: dict[str, set[str]] = {}
            for sid, cid in (
                await conn.execute(select(C.c.session_id, C.c.id).where(C.c.session_id.in_(list(still))))
            ).all():
                calls.setdefault(sid, set()).add(cid)
            ok = sorted(sid for sid in still if archived is None or calls.get(sid, set()) <= archived.get(sid, set()))
            report.deferred += len(still) - len(ok)
            if ok:
                await conn.execute(update(C).where(C.c.session_id.in_(ok)).values({c: null() for c in BODY_COLUMNS}))
                await conn.execute(update(S).where(S.c.id.in_(ok)).values(pruned_at=now))
        report.sessions += len(ok)
        report.calls += sum(len(calls.get(sid, ())) for sid in ok)
        if time.monotonic() - last_say >= 1.0:
            last_say = time.monotonic()
            say(_progress(report, time.monotonic() - t0))
    if not dry_run:
        report.table_bytes_after = await _table_bytes(engine)
    say(_progress(report, time.monotonic() - t0))
    if report.interrupted:
        say("stopped; run it again to prune the rest")
    return report


def _progress(r: PruneReport, elapsed: float) -> str:
    verb = "would be pruned" if r.dry_run else "pruned"
    out = f"{r.sessions}/{r.total} sessions {verb} ({r.calls} calls"
    if r.files:
        out += f", {r.archived} archived in {len(r.files)} files"
    if r.deferred:
        out += f", {r.deferred} left to the next run: calls recorded while they were archived"
    out += f", {elapsed:.1f}s)"
    if r.table_bytes_after is not None and r.table_bytes_before is not None:
        out += (
            f"; calls table {r.table_bytes_before:,} -> {r.table_bytes_after:,} bytes (the space dropped "
            "bodies held is reused once autovacuum has run)"
        )
    return out
