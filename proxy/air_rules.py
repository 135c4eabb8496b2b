"""The automatic intermediate reward rules, each registered with its name, default reward and help text.

A rule is a function `(air, record) -> list[Finding]`: it looks at one recorded call just before it is queued and
names the calls it rewards. Registering it with `@rule(...)` is all it takes to add one: the CLI makes its flag
`--air-<name> VALUE|off` (env `TRAINWIRE_AIR_<NAME>`) from the registry, and the engine (proxy/air.py) runs it
with the configured value. A rule reads a call's JSON with the call-shape readers (trainwire.call_shapes) that
the read API and export use. Failed upstream calls (status != 200) and aborted streams are not judged: the model
did not finish them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainwire.call_shapes import content_text
from trainwire.call_shapes.chat import answer_message
from trainwire.records import CallRecord

if TYPE_CHECKING:
    from trainwire.proxy.air import Air


@dataclass(slots=True)
class Finding:
    """One reward a rule wants: for `call_id`, or (call_id None) for the call that produced tool call
    `tool_call_id` as the assistant message at `message_index`, to be looked up in the store."""

    key: str
    metadata: dict[str, Any]
    call_id: str | None
    tool_call_id: str | None = None
    message_index: int | None = None


Judge = Callable[["Air", Any], list[Finding]]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    default: float | None  # None: off unless configured
    help: str
    judge: Judge
    # What the rule judges: "call", every recorded CallRecord; "tool_span", every tool span an agent posts to
    # /v1/traces, linked to the call that requested the tool (proxy/tool_spans.py: a LinkedToolSpan).
    on: str = "call"

    @property
    def flag(self) -> str:
        return "--air-" + self.name.replace("_", "-")


RULES: dict[str, Rule] = {}


def rule(name: str, *, default: float | None, help: str, on: str = "call") -> Callable[[Judge], Judge]:
    def register(judge: Judge) -> Judge:
        if name in RULES:
            raise ValueError(f"automatic reward rule {name!r} is registered twice")
        RULES[name] = Rule(name, default, help, judge, on)
        return judge

    return register


def parse_value(rule_: Rule, raw: Any) -> float | None:
    """A configured value: a number, or off/none/false/empty for a rule that is off."""
    if raw is None:
        return None
    text = str(raw).strip().lower()
    if text in {"off", "none", "false", ""}:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{rule_.flag} must be a number or 'off'; got {raw!r}")
    return value


# --- helpers the rules share -------------------------------------------------------------------------


def message(rec: CallRecord) -> dict[str, Any]:
    """The assistant message of choice 0 of a chat answer, or {}."""
    return answer_message(rec.response)


def _judged(rec: CallRecord) -> bool:
    return rec.status_code == 200 and not rec.aborted


def offered_tools(request: Any) -> set[str]:
    names: set[str] = set()
    if not isinstance(request, dict):
        return names
    for t in request.get("tools") or []:
        if isinstance(t, dict):
            fn = t["function"] if isinstance(t.get("function"), dict) else t
            if isinstance(fn.get("name"), str):
                names.add(fn["name"])
    for fn in request.get("functions") or []:
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def producer_index(messages: list[Any], i: int, tcid: str) -> int | None:
    """Where the assistant message that made tool call `tcid` sits (the nearest one before the answer)."""
    for k in range(i - 1, -1, -1):
        m = messages[k]
        if isinstance(m, dict) and m.get("role") == "assistant":
            if any(isinstance(tc, dict) and tc.get("id") == tcid for tc in m.get("tool_calls") or []):
                return k
    return None


# --- the rules --------------------------------------------------------------------------------------------


@rule(
    "invalid_tool_call",
    default=-0.5,
    help="Reward for a tool call with bad JSON arguments or an unknown tool, or 'off'",
)
def invalid_tool_call(air: "Air", rec: CallRecord) -> list[Finding]:
    """A tool call whose arguments are not a JSON object (invalid JSON included), or that names a tool the
    request did not offer in `tools` (or legacy `functions`). One reward per offending tool call."""
    if rec.kind != "chat" or not _judged(rec):
        return []
    tool_calls = message(rec).get("tool_calls") or []
    if not tool_calls:
        return []
    offered = offered_tools(rec.request)
    out = []
    for i, tc in enumerate(tool_calls):
        fn = (tc or {}).get("function") or {}
        name, args = fn.get("name"), fn.get("arguments")
        problems = []
        if name not in offered:
            problems.append(
                f"tool {name!r} is not among the request's tools ({', '.join(sorted(offered)) or 'none offered'})"
            )
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
            if not isinstance(parsed, dict):
                problems.append(f"arguments are not a JSON object: {str(args)[:200]!r}")
        except ValueError as exc:
            problems.append(f"arguments are not valid JSON ({exc}): {str(args)[:200]!r}")
        if problems:
            out.append(
                Finding(
                    key=str(i),
                    call_id=rec.id,
                    metadata={"tool_call_id": (tc or {}).get("id"), "name": name, "problems": problems},
                )
            )
    return out


@rule("tool_error", default=-0.2, help="Reward for a call whose tool answer reports an error, or 'off'")
def tool_error(air: "Air", rec: CallRecord) -> list[Finding]:
    """A later request of the same session carries the `tool` message answering a tool call, and that message
    reports an error (`--air-tool-error-pattern`). The reward goes to the earlier call that produced the tool
    call: found through a bounded in-memory map per session (keyed by the tool call id and where the assistant
    message sits in the history), else in the store."""
    request = rec.request
    if rec.kind != "chat" or not isinstance(request, dict):
        return []
    messages = request.get("messages") or []
    memo = air.memo(rec.session_id)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "tool" or not isinstance(m.get("tool_call_id"), str):
            continue
        tcid = m["tool_call_id"]
        if (i, tcid) in memo.judged:
            continue
        memo.remember(memo.judged, (i, tcid), True)
        text = content_text(m.get("content"))
        if not air.is_error(text):
            continue
        j = producer_index(messages, i, tcid)
        call_id = memo.produced.get((j, tcid)) if j is not None else None
        if call_id is None and j is None:
            call_id = memo.latest.get(tcid)
        out.append(
            Finding(
                key=tcid,
                call_id=call_id,
                tool_call_id=tcid,
                message_index=j,
                metadata={"tool_call_id": tcid, "answered_in": rec.id, "tool_message": (text or "")[:500]},
            )
        )
    return out


@rule("truncated", default=-0.2, help="Reward for a response cut off by max_tokens, or 'off'")
def truncated(air: "Air", rec: CallRecord) -> list[Finding]:
    """A response cut off by `max_tokens` (`finish_reason == "length"`)."""
    if rec.kind not in ("chat", "completion") or not _judged(rec):
        return []
    reason = rec.finish_reason
    if reason is None and isinstance(rec.response, dict):
        choices = rec.response.get("choices") or []
        reason = choices[0].get("finish_reason") if choices and isinstance(choices[0], dict) else None
    if reason != "length":
        return []
    usage = rec.usage or {}
    request = rec.request if isinstance(rec.request, dict) else {}
    return [
        Finding(
            key="",
            call_id=rec.id,
            metadata={
                "finish_reason": "length",
                "completion_tokens": usage.get("completion_tokens"),
                "max_tokens": request.get("max_completion_tokens") or request.get("max_tokens"),
            },
        )
    ]


@rule(
    "tool_span_error",
    default=-0.2,
    help="Reward for the call whose requested tool's span (OTLP at POST /v1/traces) has status ERROR, or 'off'",
    on="tool_span",
)
def tool_span_error(air: "Air", linked: Any) -> list[Finding]:
    """A tool span the agent's own tracing sent (`gen_ai.operation.name = execute_tool`, or OpenInference's
    `openinference.span.kind = TOOL`) with status ERROR: the real outcome of the tool, not a guess from the tool
    message's text (`tool_error`). The reward goes to the LLM call that requested the tool (proxy/tool_spans.py
    says how it is found). One reward per span: its span id is in the idempotency key."""
    span = linked.span
    if not span.error or linked.call_id is None:
        return []
    return [
        Finding(
            key=span.span_id,
            call_id=linked.call_id,
            metadata={
                "tool": span.tool,
                "status": "ERROR",
                "message": span.message,
                "duration_ms": round(span.duration_ms, 3),
                "tool_call_id": span.tool_call_id,
                "trace_id": span.trace_id,
                "span_id": span.span_id,
                "matched_by": linked.matched_by,
            },
        )
    ]
