"""`trainwire export --format jsonl|parquet --out FILE [--since T] [--until T] [--agent NAME] [--task ID]
[--include-eval]`: one row per LLM call, usable for SFT or prompt optimization without trainwire.

Which calls: calls of every kind whose shape exports (trainwire.call_shapes: chat, completions, Responses,
Messages; not pass-through calls) the upstream answered (status 200), oldest first, in [since, until)
by start time; only trainable ones (not `X-Trainwire-Train: false`, not frozen routes) unless
`--include-eval`; none of a session `trainwire prune` pruned (its calls are in the archive files it wrote).
Read in pages of `PAGE` calls (keyset on start time and id), written as they come: memory stays flat however
large the store is. The file is written under a temporary name and renamed at the end, so
a file at FILE is always complete. Progress goes to stderr.

Columns:
- call_id, session_id, seq, task_id, agent_name, policy_version, model_requested, model_served, route,
  trainable, kind, stream, started_at (ISO 8601 UTC in JSONL, a UTC timestamp in Parquet), finish_reason,
  aborted (a stream the client cut off: its output is partial)
- messages, tools (in OpenAI's chat format: a chat request's as sent; a Responses or Messages request's input
  read as chat messages, with its tool calls and tool results, and its function tools as chat tools), prompt
  (completion request); response_text, reasoning_content, response_tool_calls ([{id, name, arguments}], from the
  answer of any API). Each kind's shape says how (`CallShape.export`, `CallShape.answer`). In Parquet, messages /
  tools / response_tool_calls are JSON text.
- prompt_token_ids, completion_token_ids, logprobs (one per completion token; as the upstream sampled them)
- rewards, as LightningRL assigns them (gamma 1): `final_reward` is the session's final reward (null when the
  session has none yet, or was closed by /finish without one: see `session_finished`); `intermediate_reward`
  is the sum of the non-final rewards attached to this call (posted with call_id, or AIR; 0 when none);
  `reward` = final_reward (0 when null) + intermediate_reward. `rewards` lists every reward counted, with
  its id, source, value and final flag.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.call_shapes import SHAPES, ExportInput, call_output, content_text, shape_of
from trainwire.store.db import make_engine
from trainwire.store.delta_reads import DELTA_COLS, full_rows
from trainwire.store.export_files import ExportError, JsonlSink, ParquetSink
from trainwire.store.models import Call, Reward, Session
from trainwire.store.rewards import aware

C, R, S = Call.__table__, Reward.__table__, Session.__table__
PAGE = 500
EXPORTED_KINDS = tuple(kind for kind, shape in SHAPES.items() if shape.export is not None)

_SELECT = [
    C.c.id,
    C.c.session_id,
    C.c.seq,
    C.c.task_id,
    C.c.agent_name,
    C.c.policy_version,
    C.c.model_requested,
    C.c.model_served,
    C.c.route,
    C.c.trainable,
    C.c.kind,
    C.c.stream,
    C.c.started_at,
    C.c.finish_reason,
    C.c.aborted,
    C.c.request,
    C.c.response,
    C.c.prompt_token_ids,
    C.c.completion_token_ids,
    C.c.logprobs,
    *DELTA_COLS,
]


def parse_time(value: str | None, flag: str) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(
            f"{flag} must be an ISO 8601 time like 2025-01-31 or 2025-01-31T12:00:00Z; got {value!r}"
        ) from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _filters(since, until, agents, tasks, include_eval) -> list:
    # Pruned sessions (store/retention.py) have no bodies left to export: they are in their archive files.
    pruned = select(S.c.id).where(S.c.pruned_at.is_not(None))
    cond = [C.c.kind.in_(EXPORTED_KINDS), C.c.status_code == 200, C.c.session_id.not_in(pruned)]
    if not include_eval:
        cond.append(C.c.trainable.is_(True))
    if since:
        cond.append(C.c.started_at >= since)
    if until:
        cond.append(C.c.started_at < until)
    if agents:
        cond.append(C.c.agent_name.in_(agents))
    if tasks:
        cond.append(C.c.task_id.in_(tasks))
    return cond


@dataclass(frozen=True, slots=True)
class RewardRef:
    """A reward as an export row lists it."""

    id: int
    source: str
    value: float | None
    final: bool

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "value": self.value, "final": self.final}


@dataclass(slots=True)
class _Page:
    calls: list[Any]  # row mappings of _SELECT, oldest first
    finals: dict[str, RewardRef]  # session id -> its final reward
    per_call: dict[str, list[RewardRef]]  # call id -> its intermediate rewards, by id


def _row(m, page: _Page, raw: bool = False) -> dict[str, Any]:
    shape = shape_of(m["kind"])
    request = m["request"] if isinstance(m["request"], dict) else {}
    out = call_output(m["kind"], m["response"]) or {}
    given = shape.export(request) if shape.export is not None else ExportInput()
    final = page.finals.get(m["session_id"])
    inter = page.per_call.get(m["id"], [])
    intermediate = float(sum(r.value for r in inter if r.value is not None))
    final_value = final.value if final else None
    row = {
        "call_id": m["id"],
        "session_id": m["session_id"],
        "seq": m["seq"],
        "task_id": m["task_id"],
        "agent_name": m["agent_name"],
        "policy_version": m["policy_version"],
        "model_requested": m["model_requested"],
        "model_served": m["model_served"],
        "route": m["route"],
        "trainable": bool(m["trainable"]),
        "kind": m["kind"],
        "stream": bool(m["stream"]),
        "started_at": aware(m["started_at"]),
        "finish_reason": m["finish_reason"],
        "aborted": bool(m["aborted"]),
        "messages": given.messages,
        "tools": given.tools,
        "prompt": given.prompt,
        "response_text": content_text(out.get("content")),
        "reasoning_content": out.get("reasoning_content"),
        "response_tool_calls": out.get("tool_calls"),
        "prompt_token_ids": m["prompt_token_ids"],
        "completion_token_ids": m["completion_token_ids"],
        "logprobs": m["logprobs"],
        "final_reward": final_value,
        "session_finished": final is not None,
        "intermediate_reward": intermediate,
        "reward": (final_value or 0.0) + intermediate,
        "rewards": [r.as_dict() for r in ([final] if final else []) + inter],
    }
    if raw:
        row["request"], row["response"] = m["request"], m["response"]
    return row


async def _count(engine: AsyncEngine, cond) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(C).where(*cond))).scalar() or 0)


async def _read_page(engine: AsyncEngine, cond, after: tuple[datetime, str] | None, page_size: int) -> _Page:
    """The next `page_size` calls after `after` (start time, id), with their sessions' final rewards and
    their own intermediate rewards."""
    q = select(*_SELECT).where(*cond)
    if after is not None:
        q = q.where(or_(C.c.started_at > after[0], and_(C.c.started_at == after[0], C.c.id > after[1])))
    q = q.order_by(C.c.started_at, C.c.id).limit(page_size)
    async with engine.connect() as conn:
        loaded = [r._mapping for r in (await conn.execute(q)).all()]
        if not loaded:
            return _Page([], {}, {})
        rows = await full_rows(conn, loaded, tokens=True)  # calls stored as deltas, whole again
        call_ids = [r["id"] for r in rows]
        session_ids = sorted({r["session_id"] for r in rows})
        finals = {
            r.session_id: RewardRef(r.id, r.source, r.value, True)
            for r in (
                await conn.execute(
                    select(R.c.id, R.c.session_id, R.c.source, R.c.value).where(
                        R.c.session_id.in_(session_ids), R.c.final.is_(True)
                    )
                )
            ).all()
        }
        per_call: dict[str, list[RewardRef]] = {}
        for r in (
            await conn.execute(
                select(R.c.id, R.c.call_id, R.c.source, R.c.value)
                .where(R.c.call_id.in_(call_ids), R.c.final.is_(False))
                .order_by(R.c.id)
            )
        ).all():
            per_call.setdefault(r.call_id, []).append(RewardRef(r.id, r.source, r.value, False))
    return _Page(rows, finals, per_call)


async def pages(engine: AsyncEngine, cond, page_size: int = PAGE, raw: bool = False):
    """Export rows, a page at a time, oldest first; `raw`: with the request and response as recorded."""
    after: tuple[datetime, str] | None = None
    while True:
        page = await _read_page(engine, cond, after, page_size)
        if not page.calls:
            return
        yield [_row(m, page, raw) for m in page.calls]
        last = page.calls[-1]
        after = (last["started_at"], last["id"])
        if len(page.calls) < page_size:
            return


# --- command ---------------------------------------------------------------------------------------------


class Progress:
    def __init__(self, total: int, out, every_s: float = 1.0) -> None:
        self.total, self.out, self.every_s = total, out, every_s
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s and self.total > PAGE:
            self.last = now
            pct = 100 * self.done / max(self.total, 1)
            rate = self.done / max(now - self.t0, 1e-9)
            print(
                f"trainwire export: {self.done}/{self.total} calls ({pct:.0f}%, {rate:.0f}/s)",
                file=self.out,
                flush=True,
            )


async def export(
    url: str,
    fmt: str,
    out: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    agents: list[str] | None = None,
    tasks: list[str] | None = None,
    include_eval: bool = False,
    page_size: int = PAGE,
    progress_out=sys.stderr,
) -> int:
    """Write the export; returns the number of rows."""
    engine = make_engine(url)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    sink = None
    try:
        cond = _filters(since, until, agents, tasks, include_eval)
        total = await _count(engine, cond)
        print(f"trainwire export: {total} calls -> {out} ({fmt})", file=progress_out, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        sink = ParquetSink(tmp) if fmt == "parquet" else JsonlSink(tmp)
        progress = Progress(total, progress_out)
        async for rows in pages(engine, cond, page_size):
            sink.write(rows)
            progress.add(len(rows))
        if fmt == "parquet" and progress.done == 0:
            sink.write([])  # an empty file still carries the schema
        sink.close()
        sink = None
        os.replace(tmp, out)
        elapsed = time.monotonic() - progress.t0
        print(
            f"trainwire export: wrote {progress.done} calls to {out} in {elapsed:.1f}s", file=progress_out, flush=True
        )
        return progress.done
    finally:
        if sink is not None:
            sink.close()
        if tmp.exists():
            tmp.unlink()
        await engine.dispose()


def run_export(settings, args: argparse.Namespace) -> int:
    try:
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
        asyncio.run(
            export(
                settings.resolved_database_url,
                args.format,
                Path(args.out),
                since=since,
                until=until,
                agents=args.agent,
                tasks=args.task,
                include_eval=args.include_eval,
            )
        )
    except ExportError as exc:
        print(f"trainwire export: error: {exc}", file=sys.stderr)
        return 2
    return 0
