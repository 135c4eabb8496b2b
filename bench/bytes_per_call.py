"""Postgres bytes per recorded call, measured on realistic multi-turn agent sessions.

Starts a throwaway Postgres (tests/pgcluster.py), creates the schema with the real migrations
(store.migrate.upgrade_head), writes N sessions through the proxy's own write path
(store.write_sql.write_batch, in batches of the proxy's default --write-batch-size) and reports what the
tables take on disk: heap + TOAST + indexes (pg_total_relation_size), per call and per million calls, and
the WAL the inserts wrote (what streaming replication and WAL archiving ship).

A session is a tool-using agent episode of CALLS calls. Every call's request carries the whole chat so far
(system prompt, task, every earlier assistant turn with its tool call and every tool result) plus the tool
schemas, exactly as an OpenAI client sends it; the record stores that request, the response the client saw,
the prompt token ids (the whole rendered prompt again), the completion token ids and one log-prob per
completion token. So a call's size grows with its position in the session, and the mean over a session
depends on CALLS: report the shape you run, not just the number.

Text is drawn from a Zipf-distributed synthetic vocabulary (compresses like prose under pglz, about 2x;
random letters would not compress, a tiny vocabulary would compress far too well); token ids are
Zipf-distributed over a 150k vocabulary (their int4 arrays barely compress, like real ones); ~4 characters per token.

    python bench/bytes_per_call.py                       # 500 sessions x 8 calls
    python bench/bytes_per_call.py --sessions 200 --calls 16 --toast-compression lz4
    python bench/bytes_per_call.py --json                # machine-readable
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, text  # noqa: E402

from tests.support.pgcluster import PgCluster, _bin  # noqa: E402
from trainwire.records import CallRecord  # noqa: E402
from trainwire.store.db import make_engine  # noqa: E402
from trainwire.store.migrate import upgrade_head  # noqa: E402
from trainwire.store.models import Reward  # noqa: E402
from trainwire.store.write_sql import write_batch  # noqa: E402

CHARS_PER_TOKEN = 4
VOCAB = 150_000
TABLES = ["calls", "sessions", "rewards"]

TOOLS = [
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search the product documentation and return the best passages.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "What to look for"},
            "top_k": {"type": "integer", "description": "How many passages", "default": 5}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository the user is working on.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "Path relative to the repository root"},
            "start_line": {"type": "integer"}, "end_line": {"type": "integer"}},
            "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "run_python", "description": "Run a Python snippet in a sandbox and return stdout and stderr.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string", "description": "The program"},
            "timeout_s": {"type": "number", "default": 30}},
            "required": ["code"]}}},
]


class Text:
    """Zipf-distributed pseudo-words and token ids, seeded."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        syll = ["ka", "lo", "tre", "mi", "an", "sto", "pe", "ri", "du", "ex", "con", "ver", "al", "ing", "ed",
                "tion", "be", "se", "ra", "qu", "or", "un", "de", "ly", "ment", "ca", "po", "ta", "ne", "si"]
        words = set()
        while len(words) < 6000:
            words.add("".join(self.rng.choice(syll) for _ in range(self.rng.choice((1, 2, 2, 3, 3, 4)))))
        self.words = sorted(words)
        self.word_weights = [1 / (i + 1) for i in range(len(self.words))]
        self.punct = [" ", " ", " ", " ", " ", " ", " ", ", ", ". ", "\n"]

    def prose(self, tokens: int) -> str:
        n_chars = tokens * CHARS_PER_TOKEN
        out: list[str] = []
        size = 0
        while size < n_chars:
            batch = self.rng.choices(self.words, weights=self.word_weights, k=64)
            for w in batch:
                piece = w + self.rng.choice(self.punct)
                out.append(piece)
                size += len(piece)
                if size >= n_chars:
                    break
        return "".join(out)[:n_chars]

    def token_ids(self, n: int) -> list[int]:
        # Zipf (s=1) over the vocabulary: rank = VOCAB**u is log-uniform, so the 100 most common ids make
        # ~40% of the text, as in natural text. BPE gives frequent tokens low ids, so id = rank.
        return [int(VOCAB ** self.rng.random()) - 1 for _ in range(n)]

    def logprobs(self, n: int) -> list[float]:
        return [-abs(self.rng.gauss(0.0, 1.2)) ** 1.5 for _ in range(n)]

    def jitter(self, mean: int, spread: float = 0.3) -> int:
        return max(8, int(self.rng.gauss(mean, mean * spread)))


def make_session(t: Text, *, calls: int, completion_tokens: int, tool_result_tokens: int,
                 system_tokens: int, start: datetime) -> list[dict]:
    sid = "sess_" + uuid.uuid4().hex
    task = "task_" + uuid.uuid4().hex[:12]
    messages: list[dict] = [
        {"role": "system", "content": t.prose(system_tokens)},
        {"role": "user", "content": t.prose(t.jitter(120))},
    ]
    prompt_ids = t.token_ids(system_tokens + 120 + 40 * len(TOOLS) * 3)  # + rendered tool schemas
    records = []
    clock = start
    for seq in range(calls):
        last = seq == calls - 1
        n_out = t.jitter(completion_tokens)
        completion_ids = t.token_ids(n_out)
        request = {"model": "policy", "messages": [dict(m) for m in messages], "tools": TOOLS,
                   "tool_choice": "auto", "temperature": 1.0, "max_tokens": 1024}
        if last:
            message = {"role": "assistant", "content": t.prose(n_out), "tool_calls": None}
            finish = "stop"
        else:
            tool = t.rng.choice(TOOLS)["function"]["name"]
            args = {"query": t.prose(12)} if tool == "search_docs" else (
                {"path": f"src/{t.prose(3).replace(' ', '_')}.py"} if tool == "read_file" else {"code": t.prose(n_out // 2)})
            message = {"role": "assistant", "content": t.prose(n_out // 2),
                       "tool_calls": [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                                       "function": {"name": tool, "arguments": json.dumps(args)}}]}
            finish = "tool_calls"
        response = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
                    "created": int(clock.timestamp()), "model": "policy",
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish,
                                 "stop_reason": None}],
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                              "total_tokens": len(prompt_ids) + n_out}}
        upstream_ms = 15.0 * n_out + t.rng.random() * 200
        finished = clock + timedelta(milliseconds=upstream_ms + 3)
        records.append({
            "id": "call_" + uuid.uuid4().hex, "session_id": sid, "seq": seq, "task_id": task,
            "agent_name": "support-agent", "trainable": True, "kind": "chat", "path": "/v1/chat/completions",
            "stream": bool(t.rng.random() < 0.5), "model_requested": "policy", "model_served": "policy-v17",
            "route": "policy", "upstream": "http://vllm:8000", "policy_version": 17,
            "request": request, "response": response, "prompt_token_ids": list(prompt_ids),
            "completion_token_ids": completion_ids, "logprobs": t.logprobs(n_out), "finish_reason": finish,
            "usage": response["usage"], "status_code": 200, "error": None, "aborted": False,
            "started_at": clock, "finished_at": finished, "upstream_ms": upstream_ms,
            "ttft_ms": 40 + t.rng.random() * 60, "overhead_ms": 0.4 + t.rng.random()})
        # The next call's chat: this assistant turn, then the tool's answer.
        messages.append({k: v for k, v in message.items() if v is not None})
        prompt_ids = prompt_ids + completion_ids + t.token_ids(8)  # + chat-template tokens
        if not last:
            n_tool = t.jitter(tool_result_tokens, 0.5)
            messages.append({"role": "tool", "tool_call_id": message["tool_calls"][0]["id"],
                             "content": t.prose(n_tool)})
            prompt_ids = prompt_ids + t.token_ids(n_tool + 8)
        clock = finished + timedelta(milliseconds=200 + t.rng.random() * 2000)
    return records


async def measure(url: str, args) -> dict:
    t = Text(args.seed)
    engine = make_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sessions = [make_session(t, calls=args.calls, completion_tokens=args.completion_tokens,
                             tool_result_tokens=args.tool_result_tokens, system_tokens=args.system_tokens,
                             start=start + timedelta(seconds=i))
                for i in range(args.sessions)]
    # Interleave sessions like concurrent agents do, then write in the proxy's batch size.
    stream = [s[k] for k in range(args.calls) for s in sessions]
    async with engine.connect() as conn:
        wal_start = (await conn.execute(text("SELECT pg_current_wal_insert_lsn()"))).scalar()
    t0 = time.perf_counter()
    for i in range(0, len(stream), args.batch):
        async with engine.begin() as conn:
            await write_batch(conn, [CallRecord(**r) for r in stream[i:i + args.batch]])
    async with engine.begin() as conn:
        await conn.execute(insert(Reward.__table__), [
            {"session_id": s[0]["session_id"], "value": round(t.rng.random(), 3), "final": True, "source": "user",
             "created_at": s[-1]["finished_at"]} for s in sessions])
    write_s = time.perf_counter() - t0
    async with engine.connect() as conn:
        wal_bytes = (await conn.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :start)"),
                                        {"start": wal_start})).scalar()
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE"))
        rows = {}
        for table in TABLES:
            r = (await conn.execute(text(
                "SELECT pg_total_relation_size(c.oid) AS total, pg_relation_size(c.oid) AS heap, "
                "COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast, "
                "pg_indexes_size(c.oid) AS indexes FROM pg_class c WHERE c.relname = :t"), {"t": table})).one()
            rows[table] = dict(r._mapping)
        # What the columns hold before Postgres compresses them (bytes of the stored datums, after TOAST).
        col = (await conn.execute(text(
            "SELECT avg(pg_column_size(request)) AS request, avg(pg_column_size(response)) AS response, "
            "avg(pg_column_size(prompt_token_ids)) AS prompt_token_ids, "
            "avg(pg_column_size(completion_token_ids)) AS completion_token_ids, "
            "avg(pg_column_size(logprobs)) AS logprobs, avg(octet_length(request::text)) AS request_json_text, "
            "avg(cardinality(prompt_token_ids)) AS prompt_tokens, "
            "avg(cardinality(completion_token_ids)) AS completion_tokens FROM calls"))).one()
        version = (await conn.execute(text("SHOW server_version"))).scalar()
        compression = (await conn.execute(text("SHOW default_toast_compression"))).scalar()
    await engine.dispose()
    n_calls = len(stream)
    per_call = {tb: rows[tb]["total"] / n_calls for tb in TABLES}
    total_per_call = sum(per_call.values())
    return {
        "postgres": version, "toast_compression": compression, "sessions": args.sessions,
        "calls_per_session": args.calls, "calls": n_calls, "write_s": round(write_s, 2),
        "tables": rows, "columns_avg_bytes": {k: round(float(v), 1) for k, v in col._mapping.items()},
        "bytes_per_call": {**{tb: round(v) for tb, v in per_call.items()}, "all": round(total_per_call)},
        "gb_per_million_calls": round(total_per_call * 1e6 / 1e9, 2),
        # WAL written by the inserts (what replication and WAL archiving ship), fsync=off does not change it.
        "wal_bytes_per_call": round(float(wal_bytes) / n_calls),
    }


def report(r: dict) -> str:
    mib = 1024 * 1024
    lines = [f"Postgres {r['postgres']}, TOAST compression {r['toast_compression']}: {r['sessions']} sessions x "
             f"{r['calls_per_session']} calls = {r['calls']} calls, written in {r['write_s']} s", ""]
    lines.append(f"{'table':<10}{'total MiB':>11}{'heap':>10}{'TOAST':>10}{'indexes':>10}{'bytes/call':>12}")
    for tb, v in r["tables"].items():
        lines.append(f"{tb:<10}{v['total'] / mib:>11.1f}{v['heap'] / mib:>10.1f}{v['toast'] / mib:>10.1f}"
                     f"{v['indexes'] / mib:>10.1f}{r['bytes_per_call'][tb]:>12,}")
    lines.append("")
    lines.append(f"all tables: {r['bytes_per_call']['all']:,} bytes per call = "
                 f"{r['gb_per_million_calls']} GB per million calls; WAL written: "
                 f"{r['wal_bytes_per_call']:,} bytes per call")
    c = r["columns_avg_bytes"]
    lines.append(f"mean call: {c['prompt_tokens']:.0f} prompt tokens, {c['completion_tokens']:.0f} completion "
                 f"tokens; stored column bytes: request {c['request']:.0f} (JSON text {c['request_json_text']:.0f}), "
                 f"response {c['response']:.0f}, prompt ids {c['prompt_token_ids']:.0f}, completion ids "
                 f"{c['completion_token_ids']:.0f}, logprobs {c['logprobs']:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=500)
    p.add_argument("--calls", type=int, default=8, help="calls per session")
    p.add_argument("--completion-tokens", type=int, default=200)
    p.add_argument("--tool-result-tokens", type=int, default=300)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--batch", type=int, default=256, help="calls per write transaction (proxy default)")
    p.add_argument("--toast-compression", choices=["pglz", "lz4"], default="pglz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with PgCluster() as cluster:
        url = cluster.create_database("bench")
        if args.toast_compression != "pglz":
            cluster._run(_bin("psql"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", "bench", "-c",
                         f"ALTER DATABASE bench SET default_toast_compression = '{args.toast_compression}'")
        upgrade_head(url)
        result = asyncio.run(measure(url, args))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
