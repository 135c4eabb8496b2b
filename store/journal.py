"""The proxy's local journal: every recorded call and automatic reward is appended here before the batched writer
sends it to the database, so a call that got a 2xx survives whatever happens next.

- Each record is one JSON line, written with one `write(2)` as it is submitted, before the call's response is
  handed to the client; for a stream, before the event that ends it (`[DONE]`, `response.completed`,
  `message_stop`, or the error event) leaves (proxy/forward.py). Once `write` returns the bytes are in the
  kernel's page cache, which a SIGKILL, an OOM kill or a crash of the proxy cannot take back.
- `--journal-fsync` decides what a crash of the whole host can take: `none` (page cache only: a power cut can lose
  what the kernel had not flushed, seconds), `interval` (fsync every write interval: at most that much),
  `always` (fsync before each response: nothing, at the cost measured in the README).
- Files are segments named `journal-<pid>-<start>-<n>.jsonl`. A segment is deleted once every record in it is in
  the database (or set aside as rejected). A database outage only means segments stay longer.
- At start, segments of processes that no longer run are claimed (renamed to this pid, so workers starting
  together cannot take one twice) and replayed. Replaying is idempotent: calls are keyed by id and automatic
  rewards by idempotency key, and rows already stored are skipped, so a segment replayed twice (a crash during
  replay) stores nothing twice.
- Rows the database refuses as data go to `rejected-*.jsonl` beside the segments, with the error; `/stats`
  counts them and `trainwire replay-rejected` writes them after a fix.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from trainwire.records import CallRecord, RewardRecord

log = logging.getLogger("trainwire.journal")

FSYNC_POLICIES = ("none", "interval", "always")
SEGMENT_BYTES = 64 * 1024 * 1024
_REWARD_TAG = "__trainwire_reward__"
_TIMES = ("started_at", "finished_at", "created_at")
# Files earlier versions left: the one-file-per-batch spool, replayed like segments.
_LEGACY = ("spool-*.jsonl",)


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    outstanding: int = 0  # records appended and not yet in the database
    size: int = 0
    closed: bool = False


class Journal:
    def __init__(self, directory: Path, *, fsync: str = "none", segment_bytes: int = SEGMENT_BYTES) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"--journal-fsync must be one of {', '.join(FSYNC_POLICIES)}; got {fsync!r}")
        self.dir = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._start = int(time.time() * 1000)
        self._n = 0
        self._current: Segment | None = None
        self._unsynced = False
        self.appended = 0

    # --- writing ----------------------------------------------------------------------------------------
    def _open_segment(self) -> Segment:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"journal-{os.getpid()}-{self._start}-{self._n:06d}.jsonl"
        self._n += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return Segment(path, fd)

    def append(self, record: CallRecord | RewardRecord) -> Segment:
        """Write one record; returns its segment, to be passed to `done` once the record is in the database."""
        seg = self._current
        if seg is None or seg.size >= self.segment_bytes:
            if seg is not None:
                self._close(seg)
            seg = self._current = self._open_segment()
        line = orjson.dumps(record if isinstance(record, CallRecord) else _tagged(record), default=str) + b"\n"
        view = memoryview(line)
        while view:  # one write(2) in practice; a short write (signal, full disk) continues where it stopped
            view = view[os.write(seg.fd, view) :]
        seg.size += len(line)
        seg.outstanding += 1
        self.appended += 1
        if self.fsync == "always":
            os.fsync(seg.fd)
        else:
            self._unsynced = True
        return seg

    def sync(self) -> None:
        """fsync the current segment, where the policy asks for it at intervals."""
        if self.fsync == "interval" and self._unsynced and self._current is not None:
            os.fsync(self._current.fd)
            self._unsynced = False

    def done(self, segments: Iterable[Segment]) -> None:
        """These records are in the database (or set aside as rejected): a finished, closed segment goes."""
        for seg in segments:
            seg.outstanding -= 1
            if seg.outstanding == 0 and seg.closed:
                _unlink(seg.path)

    def _close(self, seg: Segment) -> None:
        if self.fsync != "none":
            os.fsync(seg.fd)
        os.close(seg.fd)
        seg.closed = True
        if seg.outstanding == 0:
            _unlink(seg.path)

    def close(self) -> int:
        """At shutdown: what is not in the database stays on disk for the next start. Returns that count."""
        seg, self._current = self._current, None
        if seg is None:
            return 0
        left = seg.outstanding
        self._close(seg)
        return left

    # --- replay -----------------------------------------------------------------------------------------
    def claim_leftovers(self) -> list[Path]:
        """Segments (and legacy spool files) of processes that no longer run, renamed to be this process's."""
        if not self.dir.exists():
            return []
        candidates: list[tuple[Path, str]] = []
        for pattern in ("journal-*.jsonl", "replaying-*.jsonl", *_LEGACY):
            for p in self.dir.glob(pattern):
                if p.name.startswith(("journal-", "replaying-")):
                    pid = int(p.name.split("-", 2)[1])
                    if _alive(pid):
                        continue
                    original = p.name.split("-", 2)[2] if p.name.startswith("replaying-") else p.name
                else:
                    original = p.name
                candidates.append((p, original))
        claimed = []
        for path, original in sorted(candidates, key=lambda c: c[1]):
            mine = path.with_name(f"replaying-{os.getpid()}-{original}")
            try:
                path.rename(mine)
            except FileNotFoundError:
                continue  # another worker claimed it first
            claimed.append(mine)
        return claimed

    # --- rejected rows ----------------------------------------------------------------------------------
    def reject(self, rows: Sequence[tuple[CallRecord | RewardRecord, str]]) -> Path:
        return write_rejected(self.dir, rows)


def write_rejected(directory: Path, rows: Sequence[tuple[CallRecord | RewardRecord, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rejected-{int(time.time() * 1000)}-{os.getpid()}.jsonl"
    with path.open("ab") as f:
        for row, error in rows:
            data = row if isinstance(row, CallRecord) else _tagged(row)
            f.write(orjson.dumps({"error": error, "row": data}, default=str) + b"\n")
    return path


def rejected_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("rejected-*.jsonl")) if Path(directory).exists() else []


def count_rejected(directory: Path) -> int:
    total = 0
    for path in rejected_files(directory):
        try:
            total += sum(1 for line in path.read_bytes().splitlines() if line.strip())
        except OSError:
            continue
    return total


def read_records(path: Path, *, rejected: bool = False) -> tuple[list[CallRecord], list[RewardRecord]]:
    """The records of a segment (or, with `rejected`, of a rejected file). A last line cut short (the host died
    mid-write) is skipped with a warning: its call never got its response."""
    calls: list[CallRecord] = []
    rewards: list[RewardRecord] = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
            if rejected:
                row = row["row"]
            rec = _record(row)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s line %d is not a whole record (%s); skipped", path, i + 1, exc)
            continue
        (calls if isinstance(rec, CallRecord) else rewards).append(rec)  # type: ignore[arg-type]
    return calls, rewards


def _tagged(rec: RewardRecord) -> dict[str, Any]:
    return {**{f.name: getattr(rec, f.name) for f in fields(rec)}, _REWARD_TAG: True}


def _record(row: dict[str, Any]) -> CallRecord | RewardRecord:
    for key in _TIMES:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    cls: type[CallRecord] | type[RewardRecord] = RewardRecord if row.pop(_REWARD_TAG, False) else CallRecord
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in known})


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a file of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
