"""Automatic intermediate rewards (AIR): system signals turned into dense rewards, as in Agent Lightning.

The rules are in proxy/air_rules.py, each registered with its default. This engine runs the active ones on every
recorded call just before it is queued for writing. A rule's reward is a `rewards` row with `source` = the rule's
name, `call_id` set and `final` false, so it is visible in the read API and removable
(`DELETE /rewards?source=NAME`). Rewards are queued on the batched writer and written with the calls; each has a
deterministic idempotency key (`air:<rule>:<call>:<detail>`), so a rule that sees the same thing twice (the same
tool message is resent with every later request of a session) or a replayed batch stores it once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainwire.proxy.air_rules import RULES, Finding, message, parse_value
from trainwire.records import CallRecord, RewardRecord
from trainwire.store.models import utcnow
from trainwire.store.reads.calls import find_tool_call_producers

log = logging.getLogger("trainwire.air")

# Idempotency keys of automatic rewards start with this; a user's key there could shadow one.
KEY_PREFIX = "air:"
JSON_ERROR_PATTERN = r'^\s*\{\s*"error"\s*:'
MAX_SESSIONS = 20_000  # sessions remembered for tool_error
MAX_PER_SESSION = 2_048  # tool calls (and judged tool messages) remembered per session


@dataclass(slots=True)
class _Memo:
    produced: dict[tuple[int, str], str] = field(default_factory=dict)  # (history index, tool call id) -> call
    latest: dict[str, str] = field(default_factory=dict)  # tool call id -> newest call making it
    judged: dict[tuple[int, str], bool] = field(default_factory=dict)  # tool messages already looked at

    @staticmethod
    def remember(d: dict, key, value) -> None:
        d.pop(key, None)
        d[key] = value
        if len(d) > MAX_PER_SESSION:
            del d[next(iter(d))]


class Air:
    def __init__(self, configured: Mapping[str, Any], error_patterns: list[str], writer, engine) -> None:
        """`configured`: rule name -> value or 'off' (settings.air); rules left out take their default."""
        self.writer = writer
        self.engine = engine
        unknown = sorted(set(configured) - set(RULES))
        if unknown:
            raise ValueError(f"unknown automatic reward rule(s) {', '.join(unknown)}; the rules are {', '.join(RULES)}")
        self.values: dict[str, float] = {}
        for name, rule in RULES.items():
            value = parse_value(rule, configured[name]) if name in configured else rule.default
            if value is not None:
                self.values[name] = value
        patterns = list(error_patterns)
        self.json_error = JSON_ERROR_PATTERN in patterns
        try:
            self.patterns = [re.compile(p) for p in patterns if p != JSON_ERROR_PATTERN]
            self._json_pattern = re.compile(JSON_ERROR_PATTERN)
        except re.error as exc:
            raise ValueError(f"--air-tool-error-pattern: not a valid regex: {exc}") from None
        self._sessions: collections.OrderedDict[str, _Memo] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.submitted = 0
        self.on_reward: Callable[[RewardRecord], None] | None = None  # the OpenTelemetry export, when on

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
    def observe(self, rec: CallRecord) -> None:
        """Run every active rule on a call about to be queued; queue their rewards."""
        for name, value in self.values.items():
            if RULES[name].on != "call":
                continue
            for f in RULES[name].judge(self, rec):
                if f.call_id is not None:
                    self._submit(name, value, f.call_id, rec.session_id, f)
                else:
                    self._spawn(self._resolve(name, value, rec, f))
        if "tool_error" in self.values and rec.kind == "chat":
            self._remember_tool_calls(rec)

    def observe_tool_span(self, linked) -> int:
        """Run the active tool-span rules on a tool span linked to its call (proxy/tool_spans.py); queue their
        rewards. Returns how many were queued."""
        queued = 0
        for name, value in self.values.items():
            if RULES[name].on != "tool_span":
                continue
            for f in RULES[name].judge(self, linked):
                if f.call_id is not None:
                    self._submit(name, value, f.call_id, linked.session_id, f)
                    queued += 1
        return queued

    def _remember_tool_calls(self, rec: CallRecord) -> None:
        request = rec.request
        tool_calls = message(rec).get("tool_calls") or []
        if not tool_calls or not isinstance(request, dict):
            return
        n = len(request.get("messages") or [])  # the answer sits at this index in later requests
        memo = self.memo(rec.session_id)
        for tc in tool_calls:
            if isinstance(tc, dict) and isinstance(tc.get("id"), str):
                memo.remember(memo.produced, (n, tc["id"]), rec.id)
                memo.remember(memo.latest, tc["id"], rec.id)

    def _submit(self, rule: str, value: float, call_id: str, session_id: str, f: Finding) -> None:
        key = f"{KEY_PREFIX}{rule}:{call_id}" + (f":{f.key}" if f.key else "")
        reward = RewardRecord(
            session_id=session_id,
            call_id=call_id,
            value=value,
            final=False,
            source=rule,
            idempotency_key=key[:256],
            metadata=f.metadata,
            created_at=utcnow(),
        )
        self.writer.submit_reward(reward)
        self.submitted += 1
        if self.on_reward is not None:
            self.on_reward(reward)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, rule: str, value: float, rec: CallRecord, f: Finding) -> None:
        """The call that produced a tool call, from the store (this process forgot it, or never saw it)."""
        assert f.tool_call_id is not None
        try:
            found = await find_tool_call_producers(
                self.engine,
                session_id=rec.session_id,
                exclude_call_id=rec.id,
                started_before=rec.started_at,
                tool_call_id=f.tool_call_id,
            )
        except Exception:
            log.exception("tool_error: looking up the call that made tool call %r failed", f.tool_call_id)
            return
        # The one whose answer sits where the tool message says it does; else the newest that made the call.
        best = next((c.call_id for c in found if c.n_messages == f.message_index), None)
        if best is None and found:
            best = found[0].call_id
        if best is None:
            log.info(
                "tool_error: no recorded call of session %r made tool call %r; no reward",
                rec.session_id,
                f.tool_call_id,
            )
            return
        self._submit(rule, value, best, rec.session_id, f)

    async def drain(self, timeout: float = 10.0) -> None:
        """Let store lookups in flight finish (before the writer drains at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
