"""`trainwire export` round trip: record through the proxy, export with the real CLI, read the file back and
compare every row with the database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.support import dbread
from tests.support.apihelpers import TOOLS, chat, post, start, wait_rewards
from trainwire.store.export import export
from trainwire.store.export_files import COLUMNS, iter_jsonl


def run_export(db_url: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainwire.cli", "export", "--database-url", db_url, "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _ts(value) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.fixture
def recorded(start_proxy, upstream, pg_url, tmp_path):
    """A small store: tool calls, a completion, a stream, an eval call, a failed call, every kind of reward."""
    p = start(start_proxy, upstream, pg_url, tmp_path)
    a = {"X-Task-Id": "t1", "X-Agent-Name": "alice"}
    c1 = chat(p, "ex-1", "plan", headers=a, tools=TOOLS).headers["x-call-id"]
    upstream.script(tool_calls=[{"name": "calculator", "arguments": "{oops"}])
    chat(p, "ex-1", "act", headers=a, tools=TOOLS)
    assert post(p, "/reward", {"session_id": "ex-1", "reward": 0.25, "call_id": c1}).status_code == 200
    assert post(p, "/reward", {"session_id": "ex-1", "reward": 1.0}).status_code == 200
    r = httpx.post(
        f"{p.v1}/completions",
        headers={"X-Session-Id": "ex-2", "X-Task-Id": "t2", "X-Agent-Name": "bob"},
        json={"model": "policy", "prompt": "Once upon"},
    )
    assert r.status_code == 200
    assert post(p, "/sessions/ex-2/finish").status_code == 200
    chat(p, "ex-3", "eval me", headers={"X-Trainwire-Train": "false", "X-Agent-Name": "alice"})
    with httpx.stream(
        "POST",
        f"{p.v1}/chat/completions",
        headers={"X-Session-Id": "ex-4", "X-Agent-Name": "carol"},
        json={"model": "policy", "stream": True, "messages": [{"role": "user", "content": "s"}]},
    ) as r:
        b"".join(r.iter_raw())
    upstream.script(
        status=400,
        error_body={"object": "error", "message": "bad", "type": "BadRequestError", "param": None, "code": 400},
    )
    assert chat(p, "ex-4", "fails").status_code == 400
    dbread.wait_calls(pg_url, 6)
    wait_rewards(pg_url, 1, source="invalid_tool_call")
    p.stop()
    return pg_url


def _expected(url: str, *, include_eval=False, agents=None, tasks=None, since=None, until=None) -> list[dict]:
    rows = [
        c
        for c in dbread.calls(url)
        if c["kind"] in ("chat", "completion")
        and c["status_code"] == 200
        and (include_eval or c["trainable"])
        and (not agents or c["agent_name"] in agents)
        and (not tasks or c["task_id"] in tasks)
        and (not since or c["started_at"] >= since)
        and (not until or c["started_at"] < until)
    ]
    return sorted(rows, key=lambda c: (c["started_at"], c["id"]))


def _check_row(row: dict, call: dict, rewards: list[dict]) -> None:
    """One exported row against its database row and the rewards table (computed independently here)."""
    final = next((r for r in rewards if r["session_id"] == call["session_id"] and r["final"]), None)
    inter = [r for r in rewards if r["call_id"] == call["id"] and not r["final"]]
    assert row["call_id"] == call["id"] and row["session_id"] == call["session_id"]
    for key in (
        "seq",
        "task_id",
        "agent_name",
        "policy_version",
        "model_requested",
        "model_served",
        "route",
        "trainable",
        "kind",
        "stream",
        "finish_reason",
        "aborted",
        "prompt_token_ids",
        "completion_token_ids",
        "logprobs",
    ):
        assert row[key] == call[key], key
    assert _ts(row["started_at"]) == _ts(call["started_at"])
    if call["kind"] == "chat":
        assert row["messages"] == call["request"]["messages"] and row["prompt"] is None
        msg = call["response"]["choices"][0]["message"]
        assert row["response_text"] == msg["content"]
        assert row["response_tool_calls"] == (
            [
                {"id": t["id"], "name": t["function"]["name"], "arguments": t["function"]["arguments"]}
                for t in msg["tool_calls"]
            ]
            if msg.get("tool_calls")
            else None
        )
    else:
        assert row["prompt"] == call["request"]["prompt"] and row["messages"] is None
        assert row["response_text"] == call["response"]["choices"][0]["text"]
    assert row["session_finished"] == (final is not None)
    assert row["final_reward"] == (final["value"] if final else None)
    assert row["intermediate_reward"] == pytest.approx(sum(r["value"] for r in inter))
    assert row["reward"] == pytest.approx(((final["value"] or 0.0) if final else 0.0) + sum(r["value"] for r in inter))
    assert sorted(r["id"] for r in row["rewards"]) == sorted(r["id"] for r in ([final] if final else []) + inter)


def test_jsonl_round_trip(recorded, tmp_path):
    out = tmp_path / "calls.jsonl"
    proc = run_export(recorded, out)
    assert proc.returncode == 0, proc.stderr
    assert "4 calls ->" in proc.stderr and "wrote 4 calls" in proc.stderr
    rows = list(iter_jsonl(out))
    expected = _expected(recorded)
    assert [r["call_id"] for r in rows] == [c["id"] for c in expected]
    assert {r["session_id"] for r in rows} == {"ex-1", "ex-2", "ex-4"}  # no eval call, no failed call
    rewards = dbread.rewards(recorded)
    for row, call in zip(rows, expected):
        assert list(row) == COLUMNS
        _check_row(row, call, rewards)
    # The numbers, spelled out for the tool-call session: final 1.0 on both calls, +0.25 posted on the first,
    # -0.5 from the invalid_tool_call rule on the second.
    ex1 = [r for r in rows if r["session_id"] == "ex-1"]
    assert [r["reward"] for r in ex1] == [pytest.approx(1.25), pytest.approx(0.5)]
    assert [r["source"] for r in ex1[1]["rewards"]] == ["user", "invalid_tool_call"]
    ex2 = next(r for r in rows if r["session_id"] == "ex-2")
    assert ex2["session_finished"] is True and ex2["final_reward"] is None and ex2["reward"] == 0.0
    ex4 = next(r for r in rows if r["session_id"] == "ex-4")
    assert ex4["session_finished"] is False and ex4["rewards"] == [] and ex4["stream"] is True


def test_parquet_round_trip_matches_jsonl(recorded, tmp_path):
    proc = run_export(recorded, tmp_path / "calls.parquet", "--format", "parquet", "--include-eval")
    assert proc.returncode == 0, proc.stderr
    assert run_export(recorded, tmp_path / "calls.jsonl", "--include-eval").returncode == 0
    table = pq.read_table(tmp_path / "calls.parquet")
    assert table.column_names == COLUMNS
    import pyarrow as pa

    assert table.schema.field("prompt_token_ids").type.value_type == pa.int32()
    assert str(table.schema.field("started_at").type) == "timestamp[us, tz=UTC]"
    rows = table.to_pylist()
    for row in rows:
        for key in ("messages", "tools", "response_tool_calls"):  # JSON text in Parquet
            row[key] = json.loads(row[key]) if row[key] is not None else None
    expected = _expected(recorded, include_eval=True)
    assert [r["call_id"] for r in rows] == [c["id"] for c in expected] and len(rows) == 5
    rewards = dbread.rewards(recorded)
    for row, call in zip(rows, expected):
        _check_row(row, call, rewards)
    for p_row, j_row in zip(rows, iter_jsonl(tmp_path / "calls.jsonl")):
        p_row["started_at"] = _ts(p_row["started_at"])
        j_row["started_at"] = _ts(j_row["started_at"])
        assert p_row == j_row


def test_filters(recorded, tmp_path):
    def ids(*args: str) -> list[str]:
        out = tmp_path / "f.jsonl"
        proc = run_export(recorded, out, *args)
        assert proc.returncode == 0, proc.stderr
        return [r["call_id"] for r in iter_jsonl(out)]

    exp = lambda **kw: [c["id"] for c in _expected(recorded, **kw)]  # noqa: E731
    assert ids("--agent", "alice") == exp(agents=["alice"]) and len(exp(agents=["alice"])) == 2
    assert ids("--agent", "alice", "--include-eval") == exp(agents=["alice"], include_eval=True)
    assert len(exp(agents=["alice"], include_eval=True)) == 3
    assert ids("--agent", "bob", "--agent", "carol") == exp(agents=["bob", "carol"])
    assert ids("--task", "t2") == exp(tasks=["t2"]) and len(exp(tasks=["t2"])) == 1
    ex2_start = dbread.calls(recorded, "ex-2")[0]["started_at"]
    assert ids("--since", ex2_start.isoformat()) == exp(since=ex2_start)
    assert ids("--until", ex2_start.isoformat().replace("+00:00", "Z")) == exp(until=ex2_start)
    assert ids("--since", "2000-01-01", "--until", "2000-01-02") == []
    proc = run_export(recorded, tmp_path / "bad.jsonl", "--since", "last tuesday")
    assert proc.returncode == 2 and "--since must be an ISO 8601 time" in proc.stderr
    assert not (tmp_path / "bad.jsonl").exists()


def _synthetic(n: int) -> list[dict]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        {
            "id": f"bulk-{i:05d}",
            "session_id": f"bulk-s{i // 10}",
            "seq": i % 10,
            "task_id": None,
            "agent_name": "bulk",
            "trainable": True,
            "kind": "chat",
            "path": "/v1/chat/completions",
            "stream": False,
            "model_requested": "policy",
            "model_served": "base",
            "route": "policy",
            "upstream": None,
            "policy_version": 0,
            "request": {"messages": [{"role": "user", "content": f"q{i}"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": f"a{i}"}}]},
            "prompt_token_ids": [i, i + 1],
            "completion_token_ids": [i + 2],
            "logprobs": [-0.5],
            "finish_reason": "stop",
            "usage": None,
            "status_code": 200,
            "error": None,
            "aborted": False,
            # Every 7 calls share a start time: paging must not lose or repeat ties.
            "started_at": t0 + timedelta(milliseconds=i // 7),
            "finished_at": t0,
            "upstream_ms": None,
            "ttft_ms": None,
            "overhead_ms": None,
        }
        for i in range(n)
    ]


def test_large_export_pages_and_reports_progress(pg_url, tmp_path):
    calls = _synthetic(1300)
    dbread.insert_calls(pg_url, calls)
    out = tmp_path / "bulk.parquet"
    proc = run_export(pg_url, out, "--format", "parquet")
    assert proc.returncode == 0, proc.stderr
    assert "1300 calls ->" in proc.stderr and "wrote 1300 calls" in proc.stderr
    table = pq.read_table(out, columns=["call_id", "completion_token_ids"])
    assert table.column("call_id").to_pylist() == [c["id"] for c in calls]
    assert table.column("completion_token_ids").to_pylist() == [[i + 2] for i in range(1300)]

    # Small pages, ties on the keyset: every call once, in order.
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    n = asyncio.run(export(pg_url, "jsonl", tmp_path / "small.jsonl", page_size=7, progress_out=sink))
    assert n == 1300
    assert [r["call_id"] for r in iter_jsonl(tmp_path / "small.jsonl")] == [c["id"] for c in calls]
    assert "wrote 1300 calls" in sink.text


def test_responses_and_messages_calls_export_their_messages_tools_and_answers(start_proxy, upstream, db_url, tmp_path):
    """A Responses and a Messages call, recorded through the proxy on Postgres and SQLite, export as chat: their
    input read as chat messages (instructions / system first, tool calls and tool results in order), their
    function tools as chat tools, and the answer's text and tool calls (trainwire.call_shapes)."""
    p = start(start_proxy, upstream, db_url, tmp_path)
    upstream.script(text="It is 4.")
    r = httpx.post(
        f"{p.v1}/responses",
        headers={"X-Session-Id": "ex-resp"},
        json={
            "model": "policy",
            "instructions": "Be brief.",
            "input": [
                {"type": "message", "role": "user", "content": "2+2?"},
                {"type": "function_call", "call_id": "fc1", "name": "calculator", "arguments": '{"e": "2+2"}'},
                {"type": "function_call_output", "call_id": "fc1", "output": "4"},
            ],
            "tools": [{"type": "function", "name": "calculator", "parameters": {"type": "object"}}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"e": "3*3"}'}])
    r = httpx.post(
        f"{p.v1}/messages",
        headers={"X-Session-Id": "ex-msg"},
        json={
            "model": "policy",
            "max_tokens": 64,
            "system": "Use the tool.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "3*3?"}]}],
            "tools": [{"name": "calculator", "description": "math", "input_schema": {"type": "object"}}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    dbread.wait_calls(db_url, 2)
    p.stop()

    out = tmp_path / "calls.jsonl"
    proc = run_export(db_url, out)
    assert proc.returncode == 0, proc.stderr
    rows = {r["kind"]: r for r in iter_jsonl(out)}
    assert set(rows) == {"responses", "messages"}
    resp, msg = rows["responses"], rows["messages"]
    assert resp["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "fc1", "type": "function", "function": {"name": "calculator", "arguments": '{"e": "2+2"}'}}
            ],
        },
        {"role": "tool", "content": "4", "tool_call_id": "fc1"},
    ]
    assert resp["tools"] == [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    assert resp["response_text"] == "It is 4." and resp["response_tool_calls"] is None and resp["prompt"] is None
    assert msg["messages"] == [{"role": "system", "content": "Use the tool."}, {"role": "user", "content": "3*3?"}]
    assert msg["tools"] == [
        {
            "type": "function",
            "function": {"name": "calculator", "description": "math", "parameters": {"type": "object"}},
        }
    ]
    (tool_call,) = msg["response_tool_calls"]
    assert tool_call["name"] == "calculator" and json.loads(tool_call["arguments"]) == {"e": "3*3"}
    assert isinstance(tool_call["id"], str) and msg["response_text"] is None
    for row in (resp, msg):
        assert (
            row["prompt_token_ids"]
            and row["completion_token_ids"]
            and len(row["logprobs"]) == len(row["completion_token_ids"])
        )
