"""Calls and rewards that could not be written yet, on local disk: JSONL files in the spool directory.

`spool-*.jsonl` holds rows the database could not take (it stayed down at shutdown); the next start writes them
first. `rejected-*.jsonl` holds rows the database refused as data, each with the error. Several workers may start
on one spool directory together: each claims a file by renaming it to `replaying-<pid>-...` first, which only one
of them can do, and a claim left by a process that no longer runs is taken over."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson

from trainwire.records import CallRecord, RewardRecord

log = logging.getLogger("trainwire.writer")

_REWARD_TAG = "__trainwire_reward__"
_TIMES = ("started_at", "finished_at", "created_at")


def _file(directory: Path, kind: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{kind}-{int(time.time())}-{uuid.uuid4().hex[:8]}.jsonl"


def write(directory: Path, calls: Sequence[CallRecord], rewards: Sequence[RewardRecord] = ()) -> Path:
    path = _file(directory, "spool")
    with path.open("wb") as f:
        for rec in calls:
            f.write(orjson.dumps(rec) + b"\n")
        for rew in rewards:  # tagged, so older spool files (calls only) still read the same
            f.write(orjson.dumps({**_dict(rew), _REWARD_TAG: True}) + b"\n")
    return path


def write_rejected(directory: Path, rows: Iterable[tuple[CallRecord | RewardRecord, str]]) -> Path:
    path = _file(directory, "rejected")
    with path.open("wb") as f:
        for row, error in rows:
            data = _dict(row) if isinstance(row, CallRecord) else {**_dict(row), _REWARD_TAG: True}
            f.write(orjson.dumps({"error": error, "row": data}, default=str) + b"\n")
    return path


def _dict(rec: CallRecord | RewardRecord) -> dict[str, Any]:
    return {f.name: getattr(rec, f.name) for f in fields(rec)}


def _record(row: dict[str, Any]) -> CallRecord | RewardRecord:
    for key in _TIMES:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    cls = RewardRecord if row.pop(_REWARD_TAG, False) else CallRecord
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in known})


def read(path: Path) -> tuple[list[CallRecord], list[RewardRecord]]:
    calls: list[CallRecord] = []
    rewards: list[RewardRecord] = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            rec = _record(orjson.loads(line))
            (calls if isinstance(rec, CallRecord) else rewards).append(rec)  # type: ignore[arg-type]
    return calls, rewards


def claim(directory: Path) -> list[Path]:
    """Spool files for this process to replay, oldest first, each renamed to mark it as this process's."""
    if not directory.exists():
        return []
    claimed = []
    candidates = [(p, p.name) for p in directory.glob("spool-*.jsonl")]
    for p in directory.glob("replaying-*.jsonl"):
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
