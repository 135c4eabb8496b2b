"""Automatic intermediate rewards (AIR): system signals turned into dense rewards, as in Agent Lightning.

Each rule looks at one recorded call just before it is queued for writing and names the calls it rewards.
A rule's reward is a `rewards` row with `source` = the rule's name, `call_id` set and `final` false, so it is
visible in the read API and removable (`DELETE /rewards?source=NAME`). Values come from the settings
(`--air-<rule> VALUE|off`). Rewards are queued on the batched writer and written with the calls; each has a
deterministic idempotency key (`air:<rule>:<call>:<detail>`), so a rule that sees the same thing twice (the
same tool message is resent with every later request of a session) or a replayed batch stores it once.

Rules (one reward per offending tool call / response):
- `invalid_tool_call`: a tool call whose arguments are not a JSON object (invalid JSON included), or that names
  a tool the request did not offer in `tools` (or legacy `functions`).
- `tool_error`: a later request of the same session carries the `tool` message answering a tool call, and
  that message reports an error (`--air-tool-error-pattern` regexes, searched in the message text; the default
  `^\\s*\\{\\s*"error"\\s*:` is taken to mean "a JSON object with a non-null `error` key", wherever the key is).
  The reward goes to the earlier call that produced the tool call: found through a bounded in-memory map per
  session (keyed by the tool call id and where the assistant message sits in the history), else in the store.
- `truncated`: a response cut off by `max_tokens` (`finish_reason == "length"`).
Failed upstream calls (status != 200) and aborted streams are not judged: the model did not finish them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import Text, cast, select
from trainwire.store.models import Call, utcnow
from trainwire.store.queries import content_text

log = logging.getLogger("trainwire.air")

JSON_ERROR_PATTERN = r'^\s*\{\s*"error"\s*:'
MAX_SESSIONS = 20_000          # sessions remembered for tool_error
MAX_PER_SESSION = 2_048        # tool calls (and judged tool messages) remembered per session


@dataclass(slots=True)
class Finding:
    """One reward a rule wants: for `call_id`, or (call_id None) for the call that produced tool call
    `tool_call_id` as the assistant message at `message_index`, to be looked up in the store."""

    key: str
    metadata: dict[str, Any]
    call_id: str | None
    tool_call_id: str | None = None
    message_index: int | None = None


Rule = Callable[["Air", dict[str, Any]], list[Finding]]


def _message(rec: dict[str, Any]) -> dict[str, Any]:
    resp = rec.get("response")
    if not isinstance(resp, dict):
        return {}
    choices = resp.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = first.get("message")
    return msg if isinstance(msg, dict) else {}


def _judged(rec: dict[str, Any]) -> bool:
    return rec.get("status_code") == 200 and not rec.get("aborted")


def offered_tools(request: Any) -> set[str]:
    names: set[str] = set()
    if not isinstance(request, dict):
        return names
    for t in request.get("tools") or []:
        if isinstance(t, dict):
            fn = t.get("function") if isinstance(t.get("function"), dict) else t
            if isinstance(fn.get("name"), str):
                names.add(fn["name"])
    for fn in request.get("functions") or []:
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


# --- rules -----------------------------------------------------------------------------------------------

def invalid_tool_call(air: "Air", rec: dict[str, Any]) -> list[Finding]:
    if rec.get("kind") != "chat" or not _judged(rec):
        return []
    tool_calls = _message(rec).get("tool_calls") or []
    if not tool_calls:
        return []
    offered = offered_tools(rec.get("request"))
    out = []
    for i, tc in enumerate(tool_calls):
        fn = (tc or {}).get("function") or {}
        name, args = fn.get("name"), fn.get("arguments")
        problems = []
        if name not in offered:
            problems.append(f"tool {name!r} is not among the request's tools "
                            f"({', '.join(sorted(offered)) or 'none offered'})")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
            if not isinstance(parsed, dict):
                problems.append(f"arguments are not a JSON object: {str(args)[:200]!r}")
        except ValueError as exc:
            problems.append(f"arguments are not valid JSON ({exc}): {str(args)[:200]!r}")
        if problems:
            out.append(Finding(key=str(i), call_id=rec["id"],
                               metadata={"tool_call_id": (tc or {}).get("id"), "name": name, "problems": problems}))
    return out


def tool_error(air: "Air", rec: dict[str, Any]) -> list[Finding]:
    request = rec.get("request")
    if rec.get("kind") != "chat" or not isinstance(request, dict):
        return []
    messages = request.get("messages") or []
    memo = air.memo(rec["session_id"])
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
        j = _producer_index(messages, i, tcid)
        call_id = memo.produced.get((j, tcid)) if j is not None else None
        if call_id is None and j is None:
            call_id = memo.latest.get(tcid)
        out.append(Finding(key=tcid, call_id=call_id, tool_call_id=tcid, message_index=j,
                           metadata={"tool_call_id": tcid, "answered_in": rec["id"],
                                     "tool_message": (text or "")[:500]}))
    return out


def truncated(air: "Air", rec: dict[str, Any]) -> list[Finding]:
    if rec.get("kind") not in ("chat", "completion") or not _judged(rec):
        return []
    reason = rec.get("finish_reason")
    if reason is None and isinstance(rec.get("response"), dict):
        choices = rec["response"].get("choices") or []
        reason = choices[0].get("finish_reason") if choices and isinstance(choices[0], dict) else None
    if reason != "length":
        return []
    usage = rec.get("usage") or {}
    return [Finding(key="", call_id=rec["id"], metadata={"finish_reason": "length",
                                                          "completion_tokens": usage.get("completion_tokens"),
                                                          "max_tokens": _max_tokens(rec.get("request"))})]


def _max_tokens(request: Any) -> int | None:
    if isinstance(request, dict):
        return request.get("max_completion_tokens") or request.get("max_tokens")
    return None


def _producer_index(messages: list[Any], i: int, tcid: str) -> int | None:
    """Where the assistant message that made tool call `tcid` sits (the nearest one before the answer)."""
    for k in range(i - 1, -1, -1):
        m = messages[k]
        if isinstance(m, dict) and m.get("role") == "assistant":
            if any(isinstance(tc, dict) and tc.get("id") == tcid for tc in m.get("tool_calls") or []):
                return k
    return None


RULES: dict[str, Rule] = {"invalid_tool_call": invalid_tool_call, "tool_error": tool_error, "truncated": truncated}


# --- engine ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Memo:
    produced: dict[tuple[int, str], str] = field(default_factory=dict)  # (history index, tool call id) -> call
    latest: dict[str, str] = field(default_factory=dict)                # tool call id -> newest call making it
    judged: dict[tuple[int, str], bool] = field(default_factory=dict)   # tool messages already looked at

    @staticmethod
    def remember(d: dict, key, value) -> None:
        d.pop(key, None)
        d[key] = value
        if len(d) > MAX_PER_SESSION:
            del d[next(iter(d))]


class Air:
    def __init__(self, settings, writer, engine) -> None:
        self.writer = writer
        self.engine = engine
        self.values: dict[str, float] = {}
        for name in RULES:
            try:
                value = settings.air_value(name)
            except ValueError:
                raise ValueError(f"--air-{name.replace('_', '-')} must be a number or 'off'; got "
                                 f"{getattr(settings, 'air_' + name)!r}") from None
            if value is not None:
                self.values[name] = value
        patterns = list(settings.air_tool_error_pattern)
        self.json_error = JSON_ERROR_PATTERN in patterns
        try:
            self.patterns = [re.compile(p) for p in patterns if p != JSON_ERROR_PATTERN]
            self._json_pattern = re.compile(JSON_ERROR_PATTERN)
        except re.error as exc:
            raise ValueError(f"--air-tool-error-pattern: not a valid regex: {exc}") from None
        self._sessions: collections.OrderedDict[str, _Memo] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.submitted = 0

    # --- state -------------------------------------------------------------------------------------
    def memo(self, session_id: str) -> _Memo:
        memo = self._sessions.pop(session_id, None) or _Memo()
        self._sessions[session_id] = memo
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return memo

    def is_error(self, text: str | None) -> bool:
        if not text:
            return False
        if self.json_error and text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                if obj.get("error") not in (None, False, "", [], {}):
                    return True
            elif self._json_pattern.search(text):  # not parseable (cut off?) but it starts like one
                return True
        return any(p.search(text) for p in self.patterns)

    # --- the hook ----------------------------------------------------------------------------------
    def observe(self, rec: dict[str, Any]) -> None:
        """Run every active rule on a call about to be queued; queue their rewards."""
        for name, value in self.values.items():
            for f in RULES[name](self, rec):
                if f.call_id is not None:
                    self._submit(name, value, f.call_id, rec["session_id"], f)
                else:
                    self._spawn(self._resolve(name, value, rec, f))
        if "tool_error" in self.values and rec.get("kind") == "chat":
            self._remember_tool_calls(rec)

    def _remember_tool_calls(self, rec: dict[str, Any]) -> None:
        request = rec.get("request")
        tool_calls = _message(rec).get("tool_calls") or []
        if not tool_calls or not isinstance(request, dict):
            return
        n = len(request.get("messages") or [])  # the answer sits at this index in later requests
        memo = self.memo(rec["session_id"])
        for tc in tool_calls:
            if isinstance(tc, dict) and isinstance(tc.get("id"), str):
                memo.remember(memo.produced, (n, tc["id"]), rec["id"])
                memo.remember(memo.latest, tc["id"], rec["id"])

    def _submit(self, rule: str, value: float, call_id: str, session_id: str, f: Finding) -> None:
        key = f"air:{rule}:{call_id}" + (f":{f.key}" if f.key else "")
        self.writer.submit_reward({"session_id": session_id, "call_id": call_id, "value": value, "final": False,
                                   "source": rule, "idempotency_key": key[:256], "metadata": f.metadata,
                                   "created_at": utcnow()})
        self.submitted += 1

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, rule: str, value: float, rec: dict[str, Any], f: Finding) -> None:
        """The call that produced a tool call, from the store (this process forgot it, or never saw it)."""
        C = Call.__table__
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(
                    select(C.c.id, C.c.request, C.c.response)
                    .where(C.c.session_id == rec["session_id"], C.c.id != rec["id"],
                           C.c.started_at <= rec["started_at"],
                           cast(C.c.response, Text).contains(f.tool_call_id, autoescape=True))
                    .order_by(C.c.started_at.desc(), C.c.seq.desc()).limit(50))).all()
        except Exception:
            log.exception("tool_error: looking up the call that made tool call %r failed", f.tool_call_id)
            return
        best = None
        for row in rows:
            if not any(isinstance(tc, dict) and tc.get("id") == f.tool_call_id
                       for tc in _message({"response": row.response}).get("tool_calls") or []):
                continue
            n = len(row.request.get("messages") or []) if isinstance(row.request, dict) else None
            if f.message_index is None or n == f.message_index:
                best = row.id
                break
            best = best or row.id
        if best is None:
            log.info("tool_error: no recorded call of session %r made tool call %r; no reward",
                     rec["session_id"], f.tool_call_id)
            return
        self._submit(rule, value, best, rec["session_id"], f)

    async def drain(self, timeout: float = 10.0) -> None:
        """Let store lookups in flight finish (before the writer drains at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
