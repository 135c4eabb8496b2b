"""`trainwire replay-rejected`: the rows the database refused as data (kept by the writer in
`rejected-*.jsonl` files of the journal directory, store/journal.py) written again, once the cause is fixed."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.records import CallRecord, RewardRecord
from trainwire.store.db_errors import is_transient
from trainwire.store.journal import read_records, rejected_files, write_rejected
from trainwire.store.write_sql import write_batch


async def replay_rejected(engine: AsyncEngine, directory, say=print) -> tuple[int, int]:
    """Write the rows of `rejected-*.jsonl` again (after the cause was fixed: a migration, a cleaned row).
    Rows the database still refuses go to a new rejected file with their new error; a replayed file is removed.
    Returns (written, still refused)."""
    written = refused = 0
    for path in rejected_files(directory):
        calls, rewards = read_records(path, rejected=True)
        again: list[tuple[CallRecord | RewardRecord, str]] = []
        rows: list[CallRecord | RewardRecord] = [*calls, *rewards]
        for row in rows:
            one_call = [row] if isinstance(row, CallRecord) else []
            one_reward = [row] if isinstance(row, RewardRecord) else []
            try:
                async with engine.begin() as conn:
                    await write_batch(conn, one_call, one_reward, dedupe=True)
                written += 1
            except Exception as exc:
                if is_transient(exc):
                    raise
                again.append((row, f"{type(exc).__name__}: {exc}"))
        if again:
            write_rejected(path.parent, again)
        path.unlink()
        refused += len(again)
        say(f"{path.name}: {len(rows) - len(again)} written, {len(again)} still refused")
    return written, refused
