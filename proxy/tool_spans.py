"""An agent's tool spans linked to its session and to the LLM call that requested the tool.

The session: a `trainwire.session_id` or `session.id` attribute on the span or its resource (a session with no
recorded call is ignored), else the session(s) whose calls carried the span's trace id in `traceparent`
(`calls.trace_id`), else the session the OTLP request itself names (`X-Session-Id` or a `/tw/session=ID/v1/traces`
endpoint).

The call, within those sessions:
1. by tool call id: the span's `gen_ai.tool.call.id` (or OpenInference's `tool_call.id`) among the tool calls the
   calls' answers requested (chat `tool_calls`, Responses `function_call` items, Messages `tool_use` blocks); the
   newest such call started before the tool ran;
2. else by time order: the newest successful call of the span's trace (else of the session) that finished before
   the tool span started (only if none did, within `SKEW` after it), preferring one whose answer requested a tool. Frameworks run a tool right after the
   call that asked for it, so that is the one.
A span neither finds is counted as unlinked and dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from trainwire.call_shapes import call_output
from trainwire.proxy.otlp_ingest import ToolSpan
from trainwire.store.trace_links import TracedCall, calls_before, existing_sessions, sessions_of_traces

# Clocks of the agent and the proxy differ a little (other hosts, other containers): allowed skew.
SKEW = timedelta(seconds=2)


def requested_tool_calls(call: TracedCall) -> list[str]:
    """The ids of the tool calls a call's answer requested, read through its call shape (chat `tool_calls`,
    Responses `function_call` items, Messages `tool_use` blocks)."""
    answer = call_output(call.kind, call.response) or {}
    return [tc["id"] for tc in answer.get("tool_calls") or [] if isinstance(tc.get("id"), str)]


@dataclass(slots=True)
class LinkedToolSpan:
    span: ToolSpan
    session_id: str
    call_id: str | None
    matched_by: str | None  # tool_call_id | time_order


@dataclass
class IngestCounts:
    """This process's OTLP ingest, for /stats. Only failed tool spans are linked to calls (no rule rewards a
    tool that worked), so `linked` and `unlinked` count those."""

    requests: int = 0
    spans: int = 0
    rejected: int = 0
    tool_spans: int = 0
    tool_errors: int = 0
    linked: int = 0
    unlinked: dict[str, int] = field(default_factory=dict)  # why: unknown_session, no_call
    rewards: int = 0

    def unlink(self, why: str) -> None:
        self.unlinked[why] = self.unlinked.get(why, 0) + 1


def _time(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC) if ns > 0 else datetime.now(UTC)


async def _call_for(engine, span: ToolSpan, sessions: list[str]) -> tuple[str, str | None, str | None]:
    started = _time(span.start_ns)
    for session in sessions:
        if span.tool_call_id:
            for call in await calls_before(engine, session, before=started + SKEW, mentioning=span.tool_call_id):
                if span.tool_call_id in requested_tool_calls(call):
                    return session, call.call_id, "tool_call_id"
    for session in sessions:
        recent = [c for c in await calls_before(engine, session, before=started + SKEW) if c.status_code == 200]
        # Calls that finished before the tool started; only if none did, those within the clock skew (the next
        # call of the agent often starts and ends within it).
        calls = [c for c in recent if c.finished_at <= started] or [
            c for c in recent if c.finished_at <= started + SKEW
        ]
        same_trace = [c for c in calls if c.trace_id == span.trace_id] or calls
        best = next((c for c in same_trace if requested_tool_calls(c)), None) or (same_trace[0] if same_trace else None)
        if best is not None:
            return session, best.call_id, "time_order"
    return (sessions[0] if sessions else ""), None, None


async def link(engine, spans: list[ToolSpan], default_session: str | None) -> list[LinkedToolSpan | str]:
    """Each span linked, or the reason it is not (unknown_session, no_call)."""
    named = {s.session_id for s in spans if s.session_id} | ({default_session} if default_session else set())
    existing = await existing_sessions(engine, named)
    traces = await sessions_of_traces(engine, {s.trace_id for s in spans if not s.session_id})
    out: list[LinkedToolSpan | str] = []
    for span in spans:
        if span.session_id:
            sessions = [span.session_id] if span.session_id in existing else []
        else:
            sessions = traces.get(span.trace_id) or ([default_session] if default_session in existing else [])
        if not sessions:
            out.append("unknown_session")
            continue
        session, call_id, how = await _call_for(engine, span, sessions)
        out.append(LinkedToolSpan(span, session, call_id, how) if call_id else "no_call")
    return out


async def link_after_writes(tw, spans: list[ToolSpan], default_session: str | None) -> list[LinkedToolSpan | str]:
    """`link`, once more for spans that found nothing while calls were still queued for the database (this
    process's write queue, or another worker's: a few write intervals)."""
    results = await link(tw.engine, spans, default_session)
    missing = [i for i, r in enumerate(results) if isinstance(r, str)]
    if not missing:
        return results
    interval = tw.settings.write_interval_ms / 1000
    if tw.writer.depth or tw.settings.workers > 1:
        await asyncio.sleep(4 * interval + (1.0 if tw.settings.workers > 1 else 0.1))
        again = await link(tw.engine, [spans[i] for i in missing], default_session)
        for i, r in zip(missing, again, strict=True):
            results[i] = r
    return results
