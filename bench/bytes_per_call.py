"""Postgres bytes per recorded call, full records side by side with calls stored as deltas, by session length.

Starts a throwaway Postgres (tests/pgcluster.py) and, for each session length (8, 32, 64 and 128 calls by
default), writes the same sessions twice, each into a database of its own made with the real migrations: once
with every call stored whole (`--no-call-deltas`) and once as what each call adds to the session
(`--call-deltas`, store/call_deltas.py). Both go through the proxy's own write path (store/writer.BatchWriter,
its encoding and its cache included), round by round (call k of every session before call k + 1 of any, as
concurrent agents progress), in batches of the proxy's default --write-batch-size. It reports what the tables take
on disk (heap + TOAST + indexes, pg_total_relation_size) per call and per session, the growth per added call
between two lengths, what the sessions add call by call (their unique content: new prompt and completion tokens,
4 bytes each, and the JSON of the new messages) and the stored size over it, and the trainer's read of one session
(claim + full prompts, store/claims.py) at one length, with the time to build its trajectory samples merged by the
calls' stored structure and by comparing prefixes (rl/transitions.py).

A session is a tool-using agent episode of CALLS calls. Every call's request carries the whole chat so far
(system prompt, task, every earlier assistant turn with its tool call and every tool result) plus the tool
schemas, exactly as an OpenAI client sends it; the record stores that request, the response the client saw,
the prompt token ids (the whole rendered prompt again), the completion token ids and one log-prob per
completion token. Stored whole, a call's size grows with its position in the session.

Text is drawn from a Zipf-distributed synthetic vocabulary (compresses like prose under pglz, about 2x;
random letters would not compress, a tiny vocabulary would compress far too well); token ids are
Zipf-distributed over a 150k vocabulary (their int4 arrays barely compress, like real ones); ~4 characters per token.

    python bench/bytes_per_call.py                       # 8, 32, 64, 128 calls; 2048 calls per layout and length
    python bench/bytes_per_call.py --calls 16 64 --total-calls 4096 --toast-compression lz4
    python bench/bytes_per_call.py --json                # machine-readable
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from trainwire.rl.transitions import build_samples  # noqa: E402
from trainwire.store.claims import claim_batch  # noqa: E402
from trainwire.store.db import make_engine  # noqa: E402
from trainwire.store.delta_cache import DeltaCache  # noqa: E402
from trainwire.store.migrate import upgrade_head  # noqa: E402
from trainwire.store.models import Reward  # noqa: E402
from trainwire.store.writer import BatchWriter  # noqa: E402

CHARS_PER_TOKEN = 4
VOCAB = 150_000
TABLES = ["calls", "sessions", "rewards"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the product documentation and return the best passages.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for"},
                    "top_k": {"type": "integer", "description": "How many passages", "default": 5},
                },
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository the user is working on.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path relative to the repository root"},
                    "start_line": {"type": "integer"},
                    "end_line": {"type": "integer"},
                },
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_python",
            "description": "Run a Python snippet in a sandbox and return stdout and stderr.",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "The program"},
                    "timeout_s": {"type": "number", "default": 30},
                },
                "required": ["code"],
            },
        },
    },
]


class Text:
    """Zipf-distributed pseudo-words and token ids, seeded."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        syll = [
            "ka",
            "lo",
            "tre",
            "mi",
            "an",
            "sto",
            "pe",
            "ri",
            "du",
            "ex",
            "con",
            "ver",
            "al",
            "ing",
            "ed",
            "tion",
            "be",
            "se",
            "ra",
            "qu",
            "or",
            "un",
            "de",
            "ly",
            "ment",
            "ca",
            "po",
            "ta",
            "ne",
            "si",
        ]
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
        return [-(abs(self.rng.gauss(0.0, 1.2)) ** 1.5) for _ in range(n)]

    def jitter(self, mean: int, spread: float = 0.3) -> int:
        return max(8, int(self.rng.gauss(mean, mean * spread)))


def make_session(
    t: Text, *, calls: int, completion_tokens: int, tool_result_tokens: int, system_tokens: int, start: datetime
) -> list[dict]:
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
        request = {
            "model": "policy",
            "messages": [dict(m) for m in messages],
            "tools": TOOLS,
            "tool_choice": "auto",
            "temperature": 1.0,
            "max_tokens": 1024,
        }
        if last:
            message = {"role": "assistant", "content": t.prose(n_out), "tool_calls": None}
            finish = "stop"
        else:
            tool = t.rng.choice(TOOLS)["function"]["name"]
            args = (
                {"query": t.prose(12)}
                if tool == "search_docs"
                else (
                    {"path": f"src/{t.prose(3).replace(' ', '_')}.py"}
                    if tool == "read_file"
                    else {"code": t.prose(n_out // 2)}
                )
            )
            message = {
                "role": "assistant",
                "content": t.prose(n_out // 2),
                "tool_calls": [
                    {
                        "id": "call_" + uuid.uuid4().hex[:24],
                        "type": "function",
                        "function": {"name": tool, "arguments": json.dumps(args)},
                    }
                ],
            }
            finish = "tool_calls"
        response = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(clock.timestamp()),
            "model": "policy",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": n_out,
                "total_tokens": len(prompt_ids) + n_out,
            },
        }
        upstream_ms = 15.0 * n_out + t.rng.random() * 200
        finished = clock + timedelta(milliseconds=upstream_ms + 3)
        records.append(
            {
                "id": "call_" + uuid.uuid4().hex,
                "session_id": sid,
                "seq": seq,
                "task_id": task,
                "agent_name": "support-agent",
                "trainable": True,
                "kind": "chat",
                "path": "/v1/chat/completions",
                "stream": bool(t.rng.random() < 0.5),
                "model_requested": "policy",
                "model_served": "policy-v17",
                "route": "policy",
                "upstream": "http://vllm:8000",
                "policy_version": 17,
                "request": request,
                "response": response,
                "prompt_token_ids": list(prompt_ids),
                "completion_token_ids": completion_ids,
                "logprobs": t.logprobs(n_out),
                "finish_reason": finish,
                "usage": response["usage"],
                "status_code": 200,
                "error": None,
                "aborted": False,
                "started_at": clock,
                "finished_at": finished,
                "upstream_ms": upstream_ms,
                "ttft_ms": 40 + t.rng.random() * 60,
                "overhead_ms": 0.4 + t.rng.random(),
            }
        )
        # The next call's chat: this assistant turn, then the tool's answer.
        messages.append({k: v for k, v in message.items() if v is not None})
        prompt_ids = prompt_ids + completion_ids + t.token_ids(8)  # + chat-template tokens
        if not last:
            n_tool = t.jitter(tool_result_tokens, 0.5)
            messages.append(
                {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": t.prose(n_tool)}
            )
            prompt_ids = prompt_ids + t.token_ids(n_tool + 8)
        clock = finished + timedelta(milliseconds=200 + t.rng.random() * 2000)
    return records


def unique_bytes(session: list[dict]) -> int:
    """What a session adds call by call: the new prompt tokens (after the previous call's prompt + completion)
    and completion tokens (4 bytes each), and the JSON of the new request messages."""
    total, seen_tokens, seen_messages = 0, 0, 0
    for r in session:
        messages = r["request"]["messages"]
        total += 4 * (len(r["prompt_token_ids"]) - seen_tokens + len(r["completion_token_ids"]))
        total += sum(len(json.dumps(m)) for m in messages[seen_messages:])
        seen_tokens = len(r["prompt_token_ids"]) + len(r["completion_token_ids"])
        seen_messages = len(messages)
    return total


async def write_sessions(url: str, sessions: list[list[dict]], *, deltas: bool, batch: int) -> float:
    """Write through the proxy's BatchWriter (the encoding and its cache included), round by round: call k of
    every session before call k + 1 of any, as concurrent agents progress, each round in batches of `batch`."""
    engine = make_engine(url)
    # The sessions are dated when the caller says (bench/retention.py: days in the past): a cache that never
    # expires, so what is measured is the encoding, not MAX_BASE_AGE_S.
    writer = BatchWriter(
        engine,
        batch_size=batch,
        interval_ms=1,
        max_queue=10**9,
        call_deltas=deltas,
        delta_cache=DeltaCache(max_age_s=None),
    )
    await writer.start()
    t0 = time.perf_counter()
    n_calls = max(len(s) for s in sessions)
    for k in range(n_calls):
        for s in sessions:
            if k < len(s):
                writer.submit(CallRecord(**s[k]))
        while writer.depth:
            await asyncio.sleep(0.001)
    await writer.stop()
    write_s = time.perf_counter() - t0
    async with engine.begin() as conn:
        await conn.execute(
            insert(Reward.__table__),
            [
                {
                    "session_id": s[0]["session_id"],
                    "value": 1.0,
                    "final": True,
                    "source": "user",
                    "created_at": s[-1]["finished_at"],
                }
                for s in sessions
            ],
        )
    await engine.dispose()
    return write_s


async def sizes(url: str, n_calls: int) -> dict:
    engine = make_engine(url)
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE"))
        rows = {}
        for table in TABLES:
            r = (
                await conn.execute(
                    text(
                        "SELECT pg_total_relation_size(c.oid) AS total, pg_relation_size(c.oid) AS heap, "
                        "COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast, "
                        "pg_indexes_size(c.oid) AS indexes FROM pg_class c WHERE c.relname = :t"
                    ),
                    {"t": table},
                )
            ).one()
            rows[table] = dict(r._mapping)
        # What the columns hold as stored (after TOAST compression), per call.
        col = (
            await conn.execute(
                text(
                    "SELECT avg(pg_column_size(request)) AS request, avg(pg_column_size(response)) AS response, "
                    "avg(pg_column_size(prompt_token_ids)) AS prompt_token_ids, "
                    "avg(pg_column_size(completion_token_ids)) AS completion_token_ids, "
                    "avg(pg_column_size(logprobs)) AS logprobs, "
                    "avg(cardinality(prompt_token_ids)) AS stored_prompt_tokens, "
                    "avg((base_call_id IS NOT NULL)::int) AS deltas FROM calls"
                )
            )
        ).one()
        version = (await conn.execute(text("SHOW server_version"))).scalar()
        compression = (await conn.execute(text("SHOW default_toast_compression"))).scalar()
    await engine.dispose()
    total = sum(rows[tb]["total"] for tb in TABLES)
    return {
        "postgres": version,
        "toast_compression": compression,
        "tables": rows,
        "columns_avg_bytes": {k: round(float(v), 2) for k, v in col._mapping.items()},
        "bytes_per_call": round(total / n_calls),
        "total_bytes": total,
    }


async def read_time(url: str, n: int) -> dict:
    """Mean seconds for the trainer to claim one session and load its calls with full prompts (claims.py), and to
    build its trajectory samples (rl/transitions.py) from the claim as it is (merged by the calls' stored structure
    where they have one) and with that structure left out (every call's prompt compared with the samples)."""
    engine = make_engine(url)
    times: dict[str, list[float]] = {"claim_s": [], "trajectory_s": [], "trajectory_compared_s": []}
    for _ in range(n):
        t0 = time.perf_counter()
        claimed = await claim_batch(engine, worker_id="bench", batch_size=1, group_by_task=False)
        times["claim_s"].append(time.perf_counter() - t0)
        assert claimed and all(c.prompt_token_ids for c in claimed[0].calls)
        whole = [
            dataclasses.replace(
                s, calls=[dataclasses.replace(c, base_call_id=None, prompt_prefix_len=None) for c in s.calls]
            )
            for s in claimed
        ]
        built = {}
        for key, sessions in (("trajectory_s", claimed), ("trajectory_compared_s", whole)):
            t0 = time.perf_counter()
            built[key] = build_samples(sessions, mode="trajectory")
            times[key].append(time.perf_counter() - t0)
        assert built["trajectory_s"].samples == built["trajectory_compared_s"].samples
    await engine.dispose()
    return {k: round(sum(v) / len(v), 4) for k, v in times.items()}


def session_shape(args, calls: int) -> dict:
    return {
        "calls": calls,
        "completion_tokens": args.completion_tokens,
        "tool_result_tokens": args.tool_result_tokens,
        "system_tokens": args.system_tokens,
    }


async def measure(cluster, args) -> dict:
    results: dict = {"layouts": {}, "shape": vars(args)}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for calls in args.calls:
        t = Text(args.seed)
        n_sessions = max(4, args.total_calls // calls)
        sessions = [
            make_session(t, start=start + timedelta(seconds=i), **session_shape(args, calls)) for i in range(n_sessions)
        ]
        unique = sum(unique_bytes(s) for s in sessions) / n_sessions
        row: dict = {"sessions": n_sessions, "unique_bytes_per_session": round(unique)}
        for layout, deltas in (("full", False), ("deltas", True)):
            url = cluster.create_database(f"bench_{layout}_{calls}")
            await asyncio.to_thread(upgrade_head, url)  # Alembic's env runs its own event loop
            write_s = await write_sessions(url, sessions, deltas=deltas, batch=args.batch)
            size = await sizes(url, n_sessions * calls)
            size["write_s"] = round(write_s, 2)
            size["bytes_per_session"] = round(size["total_bytes"] / n_sessions)
            size["x_unique"] = round(size["bytes_per_session"] / unique, 2)
            if calls == args.read_calls:
                size.update(await read_time(url, min(args.read_sessions, n_sessions)))
            row[layout] = size
        results["layouts"][calls] = row
    calls = sorted(results["layouts"])
    for a, b in zip(calls, calls[1:], strict=False):
        for layout in ("full", "deltas"):
            ra, rb = results["layouts"][a][layout], results["layouts"][b][layout]
            rb["growth_per_added_call"] = round((rb["bytes_per_session"] - ra["bytes_per_session"]) / (b - a))
    return results


def report(r: dict) -> str:
    first = next(iter(r["layouts"].values()))["full"]
    lines = [
        f"Postgres {first['postgres']}, TOAST compression {first['toast_compression']}; sessions of "
        f"{r['shape']['system_tokens']} system tokens, {r['shape']['completion_tokens']} completion tokens and "
        f"{r['shape']['tool_result_tokens']} tool-result tokens per call; full = every call stored whole "
        f"(--no-call-deltas), deltas = what each call adds (--call-deltas)",
        "",
    ]
    cols = (
        "calls",
        "sessions",
        "bytes/call full",
        "deltas",
        "bytes/session full",
        "deltas",
        "growth/added call full",
        "deltas",
        "unique/session",
        "deltas/unique",
        "rows as deltas",
    )
    widths = [max(len(c), 8) for c in cols]
    lines.append("  ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for calls, row in r["layouts"].items():
        f, d = row["full"], row["deltas"]
        cells = [
            f"{calls}",
            f"{row['sessions']}",
            f"{f['bytes_per_call']:,}",
            f"{d['bytes_per_call']:,}",
            f"{f['bytes_per_session']:,}",
            f"{d['bytes_per_session']:,}",
            f"{f['growth_per_added_call']:,}" if "growth_per_added_call" in f else "-",
            f"{d['growth_per_added_call']:,}" if "growth_per_added_call" in d else "-",
            f"{row['unique_bytes_per_session']:,}",
            f"{d['x_unique']}",
            f"{d['columns_avg_bytes']['deltas'] * 100:.1f}%",
        ]
        lines.append("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    for calls, row in r["layouts"].items():
        if "claim_s" in row["full"]:
            lines.append("")
            lines.append(
                f"trainer's read of one {calls}-call session (claim + full prompts): full "
                f"{row['full']['claim_s'] * 1000:.1f} ms, deltas {row['deltas']['claim_s'] * 1000:.1f} ms"
            )
            d = row["deltas"]
            lines.append(
                f"its trajectory samples (rl/transitions.py), from the deltas' claim: merged by the stored "
                f"structure {d['trajectory_s'] * 1000:.1f} ms, by comparing prefixes "
                f"{d['trajectory_compared_s'] * 1000:.1f} ms"
            )
    lines.append("")
    lines.append("stored column bytes per call (mean, after TOAST) at each length, full -> deltas:")
    for calls, row in r["layouts"].items():
        f, d = row["full"]["columns_avg_bytes"], row["deltas"]["columns_avg_bytes"]
        lines.append(
            f"  {calls:>3} calls: request {f['request']:,.0f} -> {d['request']:,.0f}, prompt ids "
            f"{f['prompt_token_ids']:,.0f} -> {d['prompt_token_ids']:,.0f}, response {d['response']:,.0f}, "
            f"completion ids {d['completion_token_ids']:,.0f}, logprobs {d['logprobs']:,.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, nargs="+", default=[8, 32, 64, 128], help="calls per session (each)")
    p.add_argument(
        "--total-calls", type=int, default=2048, help="calls per layout and length (sessions = this / calls)"
    )
    p.add_argument("--completion-tokens", type=int, default=200)
    p.add_argument("--tool-result-tokens", type=int, default=300)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--batch", type=int, default=256, help="calls per write transaction (proxy default)")
    p.add_argument("--read-calls", type=int, default=64, help="session length whose trainer read is timed")
    p.add_argument("--read-sessions", type=int, default=8, help="sessions claimed one by one for that timing")
    p.add_argument("--toast-compression", choices=["pglz", "lz4"], default="pglz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with PgCluster() as cluster:
        if args.toast_compression != "pglz":
            cluster._run(
                _bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                f"ALTER SYSTEM SET default_toast_compression = '{args.toast_compression}'",
            )
            cluster._run(
                _bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                "SELECT pg_reload_conf()",
            )
        result = asyncio.run(measure(cluster, args))
    print(json.dumps(result, indent=2, default=str) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
