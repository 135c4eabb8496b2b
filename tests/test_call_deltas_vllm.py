"""Calls stored as deltas end to end: real vLLM (CPU build, the tiny random model), the real proxy (`trainwire
serve` subprocess) on real Postgres. A multi-turn chat session (extensions, a tool turn, a retried turn, a
compacted context) is stored as deltas: each raw row refers to an earlier call and holds only what it adds. Every
reader returns the full values: the store as the suite reads it, `GET /sessions/{id}?tokens=true`,
`GET /calls/{id}?tokens=true`, `trainwire export`, and the trainer's claim; the full prompts are exactly vLLM's
rendering of the messages sent. With `--no-call-deltas` every row is stored whole."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import dbread
from tests.support.apihelpers import get, post
from tests.support.vllm_support import require_vllm_venv, serve, tiny_model
from trainwire.store.claims import claim_batch
from trainwire.store.db import make_engine

pytestmark = pytest.mark.vllm

require_vllm_venv()

SYSTEM = {"role": "system", "content": "You are a calculator. Use the calculator tool."}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an expression",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "deltas-e2e")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, "deltas-e2e", "tiny")
    try:
        yield proc
    finally:
        proc.stop()


def tokenize_chat(vllm, messages: list[dict]) -> list[int]:
    r = httpx.post(
        f"{vllm.url}/tokenize",
        json={"model": "tiny", "messages": messages, "tools": TOOLS, "add_generation_prompt": True},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def turn(proxy, db_url: str, session: str, messages: list[dict], n_stored: int) -> str:
    """One call; waits until it is in the database, so the next call can be stored against it."""
    r = httpx.post(
        f"{proxy.v1}/chat/completions",
        headers={"X-Session-Id": session, "X-Agent-Name": "solver"},
        json={"model": "policy", "messages": messages, "tools": TOOLS, "max_tokens": 6},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert len(dbread.wait_calls(db_url, n_stored, session, timeout=30)) == n_stored
    return r.json()["choices"][0]["message"]["content"] or ""


def test_a_session_is_stored_as_deltas_and_read_whole(start_proxy, vllm, pg_url, tmp_path):
    proxy = start_proxy("--upstream", vllm.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "j"))
    sid = "deltas-1"
    sent: list[list[dict]] = []

    def call(messages: list[dict]) -> str:
        sent.append([dict(m) for m in messages])
        return turn(proxy, pg_url, sid, messages, len(sent))

    msgs = [SYSTEM, {"role": "user", "content": "Compute 2+3."}]
    answer = call(msgs)
    msgs = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Use the tool."}]
    answer = call(msgs)
    msgs = msgs + [
        {
            "role": "assistant",
            "content": answer,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    answer = call(msgs)
    retried = msgs[:-2] + [{"role": "user", "content": "Never mind the tool; just answer."}]  # a retried turn
    call(retried)
    msgs = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And 4*4?"}]
    call(msgs)
    compacted = [SYSTEM, {"role": "user", "content": "Summary: 2+3=5. Now compute 4*4."}]  # a compacted context
    call(compacted)

    raw = sorted(dbread.raw_calls(pg_url, sid), key=lambda r: r["seq"])
    assert len(raw) == len(sent) == 6
    ids = [r["id"] for r in raw]
    assert raw[0]["base_call_id"] is None
    # Each extension refers to the call it extends and stores only what it adds; the turn after the retried one
    # extends the call before the retry, which the writer still remembers.
    for i, b in ((1, 0), (2, 1), (4, 2)):
        assert raw[i]["base_call_id"] == ids[b], i
        assert raw[i]["messages_prefix_len"] == len(sent[b])
        assert raw[i]["request"]["messages"] == sent[i][len(sent[b]) :]
        assert raw[i]["prompt_prefix_len"] >= len(tokenize_chat(vllm, sent[b]))
        assert len(raw[i]["prompt_token_ids"]) < len(tokenize_chat(vllm, sent[i])) / 2
    assert raw[3]["base_call_id"] is not None and raw[3]["messages_prefix_len"] == len(sent[3]) - 1
    assert raw[5]["messages_prefix_len"] in (None, 1)  # the compacted context shares the system prompt at most

    expected = [tokenize_chat(vllm, m) for m in sent]
    full = sorted(dbread.calls(pg_url, sid), key=lambda r: r["seq"])
    assert [r["prompt_token_ids"] for r in full] == expected
    assert [r["request"]["messages"] for r in full] == sent
    assert all(r["request"]["tools"] == TOOLS for r in full)

    detail = get(proxy, f"/sessions/{sid}", tokens="true").json()
    assert [c["prompt_token_ids"] for c in detail["calls"]] == expected
    assert [c["prompt_tokens"] for c in detail["calls"]] == [len(e) for e in expected]
    assert all(c["train"]["trainable"] for c in detail["calls"]), detail["calls"]
    assert [len(c["input_messages"]) for c in detail["calls"]] == [len(m) for m in sent]
    for cid, messages, tokens in zip(ids, sent, expected, strict=True):
        one = get(proxy, f"/calls/{cid}", tokens="true").json()
        assert one["request"]["messages"] == messages and one["prompt_token_ids"] == tokens
        assert one["prompt_tokens"] == len(tokens)
    listed = get(proxy, "/sessions", has="untrainable").json()
    assert sid not in [s["id"] for s in listed["data"]]

    out = tmp_path / "export.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "trainwire.cli", "export", "--database-url", pg_url, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["seq"])
    assert [r["prompt_token_ids"] for r in rows] == expected and [r["messages"] for r in rows] == sent

    assert post(proxy, "/reward", {"session_id": sid, "reward": 1.0}).status_code == 200

    async def claim():
        engine = make_engine(pg_url)
        try:
            return await claim_batch(engine, worker_id="w", batch_size=4)
        finally:
            await engine.dispose()

    (claimed,) = asyncio.run(claim())
    assert [c.prompt_token_ids for c in claimed.calls] == expected
    assert [c.completion_token_ids for c in claimed.calls] == [r["completion_token_ids"] for r in full]
    proxy.stop()

    whole = start_proxy(
        "--upstream", vllm.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "j2"), "--no-call-deltas"
    )
    msgs = [SYSTEM, {"role": "user", "content": "Compute 1+1."}]
    answer = turn(whole, pg_url, "whole-1", msgs, 1)
    turn(
        whole,
        pg_url,
        "whole-1",
        msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Again."}],
        2,
    )
    assert [r["base_call_id"] for r in dbread.raw_calls(pg_url, "whole-1")] == [None, None]
