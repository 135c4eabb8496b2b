"""Spool files: what the writer could not write goes to disk and reads back as the same records; several
processes on one spool directory never replay one file twice."""

from __future__ import annotations

import os
from datetime import datetime, timezone

from trainwire.records import CallRecord, RewardRecord
from trainwire.store import spool


def _call(i: int) -> CallRecord:
    t = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    return CallRecord(id=f"c{i}", session_id="s", seq=i, kind="chat", path="/v1/chat/completions", status_code=200,
                      started_at=t, finished_at=t, request={"messages": [{"role": "user", "content": "é\u2028"}]},
                      prompt_token_ids=[1, 2], completion_token_ids=[3], logprobs=[-0.5], usage={"prompt_tokens": 2})


def test_round_trip_keeps_every_field(tmp_path):
    calls = [_call(0), _call(1)]
    rewards = [RewardRecord(session_id="s", call_id="c1", value=-0.2, final=False, source="truncated",
                            idempotency_key="air:truncated:c1", metadata={"x": 1},
                            created_at=datetime(2026, 1, 2, tzinfo=timezone.utc))]
    path = spool.write(tmp_path, calls, rewards)
    assert path.name.startswith("spool-")
    assert spool.read(path) == (calls, rewards)


def test_older_files_with_unknown_or_missing_keys_still_read(tmp_path):
    path = tmp_path / "spool-1-old.jsonl"
    path.write_text('{"id": "c9", "session_id": "s", "seq": 0, "kind": "chat", "path": "/v1/chat/completions", '
                    '"status_code": 200, "started_at": "2026-01-02T00:00:00+00:00", '
                    '"finished_at": "2026-01-02T00:00:01+00:00", "a_column_since_dropped": 1}\n')
    (call,), rewards = spool.read(path)
    assert rewards == [] and call.id == "c9" and call.trainable is True
    assert call.finished_at == datetime(2026, 1, 2, 0, 0, 1, tzinfo=timezone.utc)


def test_claim_renames_each_file_once_and_takes_over_dead_claims(tmp_path):
    first = spool.write(tmp_path, [_call(0)])
    dead = tmp_path / "replaying-999999999-spool-0-dead.jsonl"  # a pid no process has
    dead.write_bytes(first.read_bytes())
    mine = spool.claim(tmp_path)
    assert sorted(p.name for p in mine) == sorted([f"replaying-{os.getpid()}-{first.name}",
                                                    f"replaying-{os.getpid()}-spool-0-dead.jsonl"])
    for path in mine:  # as another live process (pid 1 always runs) would hold them
        path.rename(path.with_name(path.name.replace(f"replaying-{os.getpid()}-", "replaying-1-")))
    assert spool.claim(tmp_path) == []  # a live process's claims are left to it


def test_rejected_rows_keep_their_error(tmp_path):
    path = spool.write_rejected(tmp_path, [(_call(0), "DataError('bad')")])
    assert path.name.startswith("rejected-")
    assert b"DataError('bad')" in path.read_bytes()
    assert spool.claim(tmp_path) == []  # rejected files are not replayed as spool
