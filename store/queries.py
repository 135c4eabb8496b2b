"""Read queries behind the JSON read API and the dashboard: every one returns typed records
(`trainwire.store.read_models`), never rows or dicts, so no caller needs to know the tables or the dialect.

A session's status is derived: the trainer's `claimed` / `trained` / `skipped` when it set one, else
`finished` when a final reward row exists (a value, or a close without one), else `open`. Lists are newest
first and paginated by an opaque keyset cursor (stable under concurrent inserts) or by `offset`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Boolean, Integer, Text, and_, case, cast, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from trainwire.store.call_deltas import list_key
from trainwire.store.delta_reads import DELTA_COLS, full_rows, prompt_missing, prompt_tokens
from trainwire.store.models import Call, PolicyVersion, Reward, Session, TrainStep, UpstreamVersion
from trainwire.store.read_models import (
    CallCounts,
    CallDetail,
    CallSummary,
    FinalReward,
    OrphanedSession,
    Page,
    PolicyVersionRow,
    RewardCounts,
    RewardListItem,
    RewardOut,
    SessionDetail,
    SessionSummary,
    SourceRewards,
    Stats,
    TrainStepRow,
    VersionRewards,
)
from trainwire.store.rewards import aware, reward_dict

S, C, R = Session.__table__, Call.__table__, Reward.__table__
T, P, U = TrainStep.__table__, PolicyVersion.__table__, UpstreamVersion.__table__

FINAL_EXISTS = exists().where(R.c.session_id == S.c.id, R.c.final.is_(True))
STATUS = case((S.c.status != "open", S.c.status), (FINAL_EXISTS, "finished"), else_="open")
ORPHANED = ~exists().where(S.c.id == R.c.session_id)

__all__ = [
    "HAS",
    "PRUNED_REASON",
    "UNTRAINED",
    "BadQuery",
    "Page",
    "ProducerCandidate",
    "call_api",
    "call_input",
    "call_output",
    "check_text",
    "content_text",
    "decode_cursor",
    "encode_cursor",
    "find_tool_call_producers",
    "get_call",
    "get_session",
    "input_messages",
    "list_policy_versions",
    "list_rewards",
    "list_sessions",
    "list_train_steps",
    "message_text",
    "stats",
    "storable_text",
    "tool_names",
    "train_status",
]


class BadQuery(ValueError):
    """A query parameter the store cannot use (a cursor it did not hand out, text no stored value can hold);
    `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def storable_text(value: str) -> bool:
    """Whether a string can be sent to the database at all: Postgres refuses the NUL character in text, and
    neither database driver can encode a lone surrogate. No stored id or name holds either."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: str | None, param: str) -> str | None:
    """A text filter value, or BadQuery when it holds a character no stored value can (NUL, lone surrogates)."""
    if value is not None and not storable_text(value):
        raise BadQuery(f"{param} must not contain the NUL character or lone surrogates", param)
    return value


# --- cursors ---------------------------------------------------------------------------------------------

_NOT_A_CURSOR = "cursor is not a cursor this API returned (use next_cursor as given)"
INT32 = (-(2**31), 2**31 - 1)  # Integer columns (train step, policy version)
INT64 = (-(2**63), 2**63 - 1)  # BigInteger columns (reward id)


def encode_cursor(*values: Any) -> str:
    raw = orjson.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != n:
            raise ValueError
        return values
    except Exception:
        raise BadQuery(
            f"cursor {cursor[:40]!r} is not a cursor this API returned (use next_cursor as given)", "cursor"
        ) from None


def _int_cursor(cursor: str, bounds: tuple[int, int] = INT64) -> int:
    """The integer key of a keyset cursor; one outside the key column's range was never handed out (and the
    database would refuse it as a parameter)."""
    (last,) = decode_cursor(cursor, 1)
    if not isinstance(last, int) or isinstance(last, bool) or not bounds[0] <= last <= bounds[1]:
        raise BadQuery(_NOT_A_CURSOR, "cursor")
    return last


def _time_id_cursor(cursor: str) -> tuple[datetime, str]:
    t, key = decode_cursor(cursor, 2)
    try:
        if not storable_text(t):
            raise ValueError
        when = datetime.fromisoformat(t)
        # In UTC, as it was handed out (a cursor near the calendar's ends in another zone cannot be).
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        raise BadQuery(_NOT_A_CURSOR, "cursor") from None
    if not isinstance(key, str) or not storable_text(key):
        raise BadQuery(_NOT_A_CURSOR, "cursor")
    return when, key


def status_filter(status: str):
    if status == "open":
        return and_(S.c.status == "open", ~FINAL_EXISTS)
    if status == "finished":
        return and_(S.c.status == "open", FINAL_EXISTS)
    return S.c.status == status


def _paged(q, limit: int, offset: int | None, cursor: str | None):
    """One row more than a page (to know whether there is a next one); `offset` only without a cursor."""
    q = q.limit(limit + 1)
    return q.offset(offset) if offset and not cursor else q


# --- text of calls ---------------------------------------------------------------------------------------
#
# Pure functions of the recorded JSON: a call's request as the client sent it (chat, completions, Responses or
# Anthropic Messages shapes) and its client-shaped answer. They never raise, whatever the JSON holds: a failed
# call records whatever the client sent.

# calls.kind (and calls.route) -> the API the agent spoke, as the read API names it.
API_OF_KIND = {
    "chat": "chat",
    "completion": "completions",
    "responses": "responses",
    "messages": "messages",
    "other": "passthrough",
}


def call_api(kind: str, route: str | None = None) -> str:
    """The API of a call: chat | completions | responses | messages | passthrough."""
    if route == "passthrough":
        return "passthrough"
    return API_OF_KIND.get(kind, kind)


def content_text(content: Any) -> str | None:
    """A message's content as text (string content, or the text parts of a content list)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
        return "".join(parts)
    return _json_text(content)


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits, which Python's json reads back from JSON
        return str(value)


def _tool_input_text(value: Any) -> str:
    # An Anthropic tool_use block's input as the chat arguments the model was shown: the translation to chat
    # (litellm's adapter) writes json.dumps(input), separators and escapes included.
    try:
        return json.dumps({} if value is None else value)
    except (TypeError, ValueError):
        return _json_text(value)


def message_text(content: Any) -> str | None:
    """Content of any API's message as text, for showing the whole input: string content; text (and refusal)
    parts joined; every other part (an image, a file, audio) as a `[type]` placeholder, so that nothing the
    model was shown goes missing without a trace."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        return _json_text(content)
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, dict):
            for key in ("text", "refusal"):
                if isinstance(p.get(key), str):
                    parts.append(p[key])
                    break
            else:
                kind = p.get("type")
                parts.append(f"[{kind if isinstance(kind, str) else 'part'}]")
    return "".join(parts)


def _role(value: Any) -> str:
    return value if isinstance(value, str) else "unknown"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _chat_tool_call(tc: Any) -> dict[str, Any]:
    fn = _dict(_dict(tc).get("function"))
    return {"id": _dict(tc).get("id"), "name": fn.get("name"), "arguments": fn.get("arguments")}


def _chat_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in _list(request.get("messages")):
        if not isinstance(m, dict):
            continue
        msg: dict[str, Any] = {"role": _role(m.get("role")), "content": message_text(m.get("content"))}
        calls = [_chat_tool_call(tc) for tc in _list(m.get("tool_calls")) if isinstance(tc, dict)]
        if isinstance(m.get("function_call"), dict):  # the legacy single function call
            fn = m["function_call"]
            calls.append({"id": None, "name": fn.get("name"), "arguments": fn.get("arguments")})
        if calls:
            msg["tool_calls"] = calls
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _responses_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Responses input as chat messages, the way the proxy sends it to vLLM: `instructions` first as the system
    message; a function_call joins the assistant message before it (one generated turn); reasoning items are
    dropped (chat templates drop them too); items of other types are shown whole, with their type as role."""
    out: list[dict[str, Any]] = []
    instructions = request.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    source = request.get("input")
    if isinstance(source, str):
        out.append({"role": "user", "content": source})
        return out
    for item in source if isinstance(source, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message" or (kind is None and "role" in item):
            out.append({"role": _role(item.get("role")), "content": message_text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "name": item.get("name"), "arguments": item.get("arguments")}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(
                {"role": "tool", "content": message_text(item.get("output")), "tool_call_id": item.get("call_id")}
            )
        elif kind == "reasoning":
            continue
        else:
            out.append({"role": kind if isinstance(kind, str) else "unknown", "content": _json_text(item)})
    return out


def _anthropic_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic Messages input as chat messages: `system` first; an assistant turn's text blocks are its
    content and its tool_use blocks its tool calls (arguments as JSON text); each tool_result block is a tool
    message, in the order of the blocks; thinking blocks are left out."""
    out: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        out.append({"role": "system", "content": message_text(system)})
    for m in _list(request.get("messages")):
        if not isinstance(m, dict):
            continue
        role, content = _role(m.get("role")), m.get("content")
        if not isinstance(content, list):
            out.append({"role": role, "content": message_text(content)})
            continue
        turn: list[dict[str, Any]] = []  # this message's text and tool calls, then its tool results
        blocks: list[Any] = []
        calls: list[dict[str, Any]] = []
        for b in content + [None]:  # None: the end, where the last text and tool calls are emitted
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_use":
                calls.append({"id": b.get("id"), "name": b.get("name"), "arguments": _tool_input_text(b.get("input"))})
                continue
            if kind in ("thinking", "redacted_thinking"):
                continue
            if kind != "tool_result" and b is not None:
                blocks.append(b)
                continue
            if blocks or calls:
                msg: dict[str, Any] = {"role": role, "content": message_text(blocks) if blocks else None}
                if calls:
                    msg["tool_calls"] = calls
                turn.append(msg)
                blocks, calls = [], []
            if b is not None:
                turn.append(
                    {"role": "tool", "content": message_text(b.get("content")), "tool_call_id": b.get("tool_use_id")}
                )
        out.extend(turn or [{"role": role, "content": ""}])
    return out


def input_messages(kind: str, request: Any) -> list[dict[str, Any]]:
    """The whole input of a call as chat-like messages `{role, content, tool_calls?, tool_call_id?}`, whatever
    API it came in: the system prompt (instructions) first, then every message, tool call and tool result in
    order. A completion's prompt is one message of role `prompt`; pass-through calls have none."""
    if not isinstance(request, dict):
        return []
    if kind == "chat":
        return _chat_messages(request)
    if kind == "responses":
        return _responses_messages(request)
    if kind == "messages":
        return _anthropic_messages(request)
    if kind == "completion" and "prompt" in request:
        prompt = request["prompt"]
        return [{"role": "prompt", "content": prompt if isinstance(prompt, str) else _json_text(prompt)}]
    return []


def tool_names(request: Any) -> list[str]:
    """Names of the tools a request offered, in order, for every API's shape: chat's
    `{"type": "function", "function": {"name"}}` (and legacy `functions`), Responses' `{"type": "function",
    "name"}`, Anthropic's `{"name", "input_schema"}`; a tool with no name (a hosted tool) by its type."""
    if not isinstance(request, dict):
        return []
    names = []
    tools = request.get("tools")
    for t in tools if isinstance(tools, list) else []:
        if not isinstance(t, dict):
            continue
        fn = t.get("function")
        name = fn.get("name") if isinstance(fn, dict) else t.get("name")
        if not isinstance(name, str):
            name = t.get("type")
        if isinstance(name, str):
            names.append(name)
    functions = request.get("functions")
    for f in functions if isinstance(functions, list) else []:
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            names.append(f["name"])
    return names


def call_input(kind: str, request: Any) -> dict[str, Any] | None:
    """The last user or tool message of a chat (or Responses, or Messages) request: what this turn answered;
    or a completion's prompt."""
    if not isinstance(request, dict):
        return None
    if kind == "chat":
        messages = request.get("messages")
        for m in reversed(messages if isinstance(messages, list) else []):
            if isinstance(m, dict) and m.get("role") in ("user", "tool"):
                out = {"role": m["role"], "content": content_text(m.get("content"))}
                if m.get("tool_call_id"):
                    out["tool_call_id"] = m["tool_call_id"]
                return out
        return None
    if kind == "completion":
        prompt = request.get("prompt")
        return {"role": "prompt", "content": prompt if isinstance(prompt, str) else _json_text(prompt)}
    if kind in ("responses", "messages"):
        for m in reversed(input_messages(kind, request)):
            if m["role"] in ("user", "tool"):
                out = {"role": m["role"], "content": m["content"]}
                if m.get("tool_call_id"):
                    out["tool_call_id"] = m["tool_call_id"]
                return out
    return None


def _answer(content: list[str], reasoning: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"content": "".join(content) if content else None}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _responses_output(response: dict[str, Any]) -> dict[str, Any]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    items = response.get("output")
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            parts = item.get("content")
            for p in parts if isinstance(parts, list) else []:
                if isinstance(p, dict):
                    text = p.get("text") if isinstance(p.get("text"), str) else p.get("refusal")
                    if isinstance(text, str):
                        content.append(text)
        elif kind == "function_call":
            calls.append({"id": item.get("call_id"), "name": item.get("name"), "arguments": item.get("arguments")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary")
            for p in parts if isinstance(parts, list) else []:
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    reasoning.append(p["text"])
    return _answer(content, reasoning, calls)


def _anthropic_output(response: dict[str, Any]) -> dict[str, Any]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    blocks = response.get("content")
    for b in blocks if isinstance(blocks, list) else []:
        if not isinstance(b, dict):
            continue
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            content.append(b["text"])
        elif kind == "tool_use":
            calls.append({"id": b.get("id"), "name": b.get("name"), "arguments": _tool_input_text(b.get("input"))})
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            reasoning.append(b["thinking"])
    return _answer(content, reasoning, calls)


def call_output(kind: str, response: Any) -> dict[str, Any] | None:
    """The assistant's answer: text, and tool calls as name + arguments (choice 0 of a chat or completions
    answer; the output items of a Responses answer; the content blocks of an Anthropic message)."""
    if not isinstance(response, dict):
        return None
    if kind == "responses":
        return _responses_output(response)
    if kind == "messages":
        return _anthropic_output(response)
    choices = response.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    if kind == "completion":
        return {"content": first.get("text")}
    if kind != "chat":
        return None
    msg = _dict(first.get("message"))
    out: dict[str, Any] = {"content": content_text(msg.get("content"))}
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        out["reasoning_content"] = reasoning
    calls = []
    tool_calls = msg.get("tool_calls")
    for tc in tool_calls if isinstance(tool_calls, list) else []:
        calls.append(_chat_tool_call(tc))
    if calls:
        out["tool_calls"] = calls
    return out


# --- will a call be trained on? ------------------------------------------------------------------------------

# The train reason of a call whose token ids `trainwire prune` dropped: recorded fine, never trained on again,
# and not counted as untrainable (`n_untrainable`, `has=untrainable`).
PRUNED_REASON = "pruned (its session's bodies were dropped by trainwire prune)"


def train_status(
    *,
    trainable: bool,
    route: str | None,
    kind: str,
    model: str | None,
    status_code: int,
    aborted: bool,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    n_logprobs: int | None,
    untrainable_reason: str | None,
    pruned: bool = False,
) -> dict[str, Any]:
    """`{"trainable": bool, "reason": str | None}`: whether the trainer will train on this call's tokens, and
    when it will not, why. `trainable` is the call's flag (false for evaluation, frozen and pass-through calls);
    a trainable call is still not trained on when it failed, has no token ids or logprobs (the trainer's
    skipped_no_tokens), or the proxy stored an `untrainable_reason` (sampling it cannot reproduce, token ids
    that disagree with the upstream's usage). A call of a pruned session (`pruned`) has no token ids left
    either: its reason is `PRUNED_REASON`, which the counts leave out. `UNTRAINED` below is the same rule in SQL."""
    reason: str | None
    if not trainable:
        if route == "passthrough" or kind == "other":
            reason = "pass-through call (no token ids)"
        elif route == "frozen":
            reason = f"frozen route (model {model or '?'})"
        else:
            reason = "evaluation call (X-Trainwire-Train: false)"
    elif status_code != 200:
        reason = f"failed upstream call (status {status_code})"
    elif pruned and not (prompt_tokens and completion_tokens and n_logprobs):
        reason = untrainable_reason or PRUNED_REASON
    elif not prompt_tokens or not completion_tokens:
        reason = "aborted without tokens" if aborted else "no token ids recorded"
    elif not n_logprobs:
        reason = "no logprobs recorded"
    else:
        reason = untrainable_reason or None
    return {"trainable": reason is None, "reason": reason}


class _TokenCount(FunctionElement):
    """How many values a token-id or logprob array holds, NULL when there is none (without shipping the array):
    cardinality() of an int4[] / float4[] on Postgres, the JSON array's length on SQLite."""

    type = Integer()
    name = "tw_token_count"
    inherit_cache = True


@compiles(_TokenCount, "postgresql")
def _token_count_pg(element, compiler, **kw):
    return f"cardinality({compiler.process(element.clauses, **kw)})"


@compiles(_TokenCount)
def _token_count_sqlite(element, compiler, **kw):
    col = compiler.process(element.clauses, **kw)
    return f"(CASE WHEN json_type({col}) = 'array' THEN json_array_length({col}) END)"


class _NoValues(FunctionElement):
    """True when a token-id or logprob array is missing or empty. On Postgres this reads the stored size, not
    the array (pg_column_size never fetches or decompresses a TOASTed value, so /stats need not read every
    prompt): an empty int4[]/float4[] is 13 bytes stored (16 unpacked), one with a single value 25 (28)."""

    type = Boolean()
    name = "tw_no_values"
    inherit_cache = True


@compiles(_NoValues, "postgresql")
def _no_values_pg(element, compiler, **kw):
    col = compiler.process(element.clauses, **kw)
    return f"({col} IS NULL OR pg_column_size({col}) < 20)"


@compiles(_NoValues)
def _no_values_sqlite(element, compiler, **kw):
    col = compiler.process(element.clauses, **kw)  # SQLite keeps None as JSON 'null': its length is 0 too
    return f"({col} IS NULL OR json_array_length({col}) = 0)"


# A trainable call that will not be trained on (train_status's rule): evaluation, frozen and pass-through calls
# are not counted, they were never meant to be trained; nor are the missing token ids of a pruned session's
# calls (they were recorded; prune dropped them). It reads the call's session row (`S`): a query over calls
# joins or correlates `sessions`.
_NO_TOKENS = or_(
    prompt_missing(_NoValues(C.c.prompt_token_ids)), _NoValues(C.c.completion_token_ids), _NoValues(C.c.logprobs)
)
UNTRAINED = and_(
    C.c.trainable.is_(True),
    or_(C.c.status_code != 200, and_(S.c.pruned_at.is_(None), _NO_TOKENS), C.c.untrainable_reason.is_not(None)),
)
# A failed call: its status code, which prune keeps, so a pruned session's failed calls still count.
FAILED = C.c.status_code != 200


def _response_message(response: Any) -> dict[str, Any]:
    """The assistant message of choice 0 of a chat response ({} when there is none)."""
    if not isinstance(response, dict):
        return {}
    choices = response.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = first.get("message")
    return msg if isinstance(msg, dict) else {}


# --- sessions --------------------------------------------------------------------------------------------

_SESSION_COLS = [
    S.c.id,
    S.c.task_id,
    S.c.status.label("raw_status"),
    STATUS.label("status"),
    S.c.n_calls,
    S.c.first_call_at,
    S.c.last_call_at,
    S.c.claimed_by,
    S.c.claimed_at,
    S.c.train_step,
    S.c.skip_reason,
    S.c.pruned_at,
]

# `has=` filters of the session list: sessions with at least one such call.
HAS = {"failed": FAILED, "untrainable": UNTRAINED}


def _session_select():
    fr = R.alias("fr")
    return select(
        *_SESSION_COLS,
        fr.c.id.label("fr_id"),
        fr.c.value.label("fr_value"),
        fr.c.source.label("fr_source"),
        fr.c.created_at.label("fr_created_at"),
    ).select_from(S.outerjoin(fr, and_(fr.c.session_id == S.c.id, fr.c.final.is_(True))))


def _session_fields(m) -> dict[str, Any]:
    final = None
    if m["fr_id"] is not None:
        final = FinalReward(id=m["fr_id"], value=m["fr_value"], source=m["fr_source"], created_at=m["fr_created_at"])
    return {
        "id": m["id"],
        "task_id": m["task_id"],
        "status": m["status"],
        "n_calls": m["n_calls"],
        "first_call_at": m["first_call_at"],
        "last_call_at": m["last_call_at"],
        "finished_at": final.created_at if final else None,
        "final_reward": final.value if final else None,
        "final": final,
        "claimed_by": m["claimed_by"],
        "claimed_at": m["claimed_at"],
        "train_step": m["train_step"],
        "skip_reason": m["skip_reason"],
        "pruned_at": m["pruned_at"],
    }


async def _agents_of(conn, session_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {sid: [] for sid in session_ids}
    if not session_ids:
        return out
    rows = (
        await conn.execute(
            select(C.c.session_id, C.c.agent_name)
            .where(C.c.session_id.in_(session_ids), C.c.agent_name.is_not(None))
            .distinct()
            .order_by(C.c.session_id, C.c.agent_name)
        )
    ).all()
    for sid, agent in rows:
        out[sid].append(agent)
    return out


def _count_of(cond):
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


async def _problems_of(conn, session_ids: list[str]) -> dict[str, tuple[int, int]]:
    """(failed calls, trainable calls that will not be trained) of each session: one aggregate for a page."""
    out = dict.fromkeys(session_ids, (0, 0))
    if not session_ids:
        return out
    rows = (
        await conn.execute(
            select(C.c.session_id, _count_of(FAILED), _count_of(UNTRAINED))
            .select_from(C.join(S, S.c.id == C.c.session_id))
            .where(C.c.session_id.in_(session_ids))
            .group_by(C.c.session_id)
        )
    ).all()
    for sid, failed, untrained in rows:
        out[sid] = (int(failed), int(untrained))
    return out


async def list_sessions(
    engine: AsyncEngine,
    *,
    status: str | None = None,
    task: str | None = None,
    agent: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    has: Sequence[str] = (),
    limit: int = 50,
    cursor: str | None = None,
    offset: int | None = None,
) -> Page[SessionSummary]:
    """Sessions active in [since, until), newest (by first call) first; `has` keeps the sessions with at least
    one call of each kind named (`HAS`: failed, untrainable). Raises `BadQuery` for a bad cursor, an unknown
    `has` or a filter value no stored value can hold."""
    q = _session_select()
    if status:
        q = q.where(status_filter(status))
    if task:
        q = q.where(S.c.task_id == check_text(task, "task"))
    if agent:
        q = q.where(exists().where(C.c.session_id == S.c.id, C.c.agent_name == check_text(agent, "agent")))
    for name in dict.fromkeys(has):
        if name not in HAS:
            raise BadQuery(f"has must be one of {', '.join(HAS)}; got {name[:40]!r}", "has")
        q = q.where(exists().where(C.c.session_id == S.c.id, HAS[name]))
    if since:
        q = q.where(S.c.last_call_at >= since)
    if until:
        q = q.where(S.c.first_call_at < until)
    if cursor:
        t, sid = _time_id_cursor(cursor)
        q = q.where(or_(S.c.first_call_at < t, and_(S.c.first_call_at == t, S.c.id < sid)))
    q = _paged(q.order_by(S.c.first_call_at.desc(), S.c.id.desc()), limit, offset, cursor)
    async with engine.connect() as conn:
        rows = [r._mapping for r in (await conn.execute(q)).all()]
        more = len(rows) > limit
        rows = rows[:limit]
        ids = [r["id"] for r in rows]
        agents = await _agents_of(conn, ids)
        problems = await _problems_of(conn, ids)
    data = [
        SessionSummary(
            **_session_fields(r),
            agents=agents[r["id"]],
            n_failed=problems[r["id"]][0],
            n_untrainable=problems[r["id"]][1],
        )
        for r in rows
    ]
    nxt = encode_cursor(aware(rows[-1]["first_call_at"]), rows[-1]["id"]) if more and rows else None
    return Page[SessionSummary].of(data, nxt)


# --- calls -----------------------------------------------------------------------------------------------

_CALL_COLS = [
    C.c.id,
    C.c.session_id,
    C.c.seq,
    C.c.task_id,
    C.c.agent_name,
    C.c.trainable,
    C.c.kind,
    C.c.path,
    C.c.stream,
    C.c.model_requested,
    C.c.model_served,
    C.c.route,
    C.c.upstream,
    C.c.policy_version,
    C.c.finish_reason,
    C.c.usage,
    C.c.status_code,
    C.c.error,
    C.c.aborted,
    C.c.started_at,
    C.c.finished_at,
    C.c.upstream_ms,
    C.c.ttft_ms,
    C.c.overhead_ms,
    C.c.request,
    C.c.response,
    C.c.sampling,
    C.c.untrainable_reason,
    *DELTA_COLS,
    select(S.c.pruned_at).where(S.c.id == C.c.session_id).scalar_subquery().label("session_pruned_at"),
    prompt_tokens(_TokenCount(C.c.prompt_token_ids)).label("n_prompt_tokens"),
    _TokenCount(C.c.completion_token_ids).label("n_completion_tokens"),
    _TokenCount(C.c.logprobs).label("n_logprobs"),
]
_TOKEN_COLS = [C.c.prompt_token_ids, C.c.completion_token_ids, C.c.logprobs]


def _call_fields(m, rewards: list[RewardOut]) -> dict[str, Any]:
    train = train_status(
        trainable=bool(m["trainable"]),
        route=m["route"],
        kind=m["kind"],
        model=m["model_requested"] or m["model_served"],
        status_code=m["status_code"],
        aborted=bool(m["aborted"]),
        prompt_tokens=m["n_prompt_tokens"],
        completion_tokens=m["n_completion_tokens"],
        n_logprobs=m["n_logprobs"],
        untrainable_reason=m["untrainable_reason"],
        pruned=m["session_pruned_at"] is not None,
    )
    return {
        "id": m["id"],
        "session_id": m["session_id"],
        "seq": m["seq"],
        "task_id": m["task_id"],
        "agent_name": m["agent_name"],
        "trainable": bool(m["trainable"]),
        "kind": m["kind"],
        "path": m["path"],
        "stream": bool(m["stream"]),
        "model_requested": m["model_requested"],
        "model_served": m["model_served"],
        "route": m["route"],
        "policy_version": m["policy_version"],
        "status_code": m["status_code"],
        "error": m["error"],
        "aborted": bool(m["aborted"]),
        "finish_reason": m["finish_reason"],
        "usage": m["usage"],
        "started_at": m["started_at"],
        "finished_at": m["finished_at"],
        "upstream_ms": m["upstream_ms"],
        "ttft_ms": m["ttft_ms"],
        "overhead_ms": m["overhead_ms"],
        "input": call_input(m["kind"], m["request"]),
        "output": call_output(m["kind"], m["response"]),
        "rewards": rewards,
        "api": call_api(m["kind"], m["route"]),
        "prompt_tokens": m["n_prompt_tokens"],
        "completion_tokens": m["n_completion_tokens"],
        "tools": tool_names(m["request"]),
        "input_messages": input_messages(m["kind"], m["request"]),
        "sampling": m["sampling"],
        "train": train,
    }


def _token_fields(m) -> dict[str, Any]:
    return {
        "prompt_token_ids": m["prompt_token_ids"],
        "completion_token_ids": m["completion_token_ids"],
        "logprobs": m["logprobs"],
    }


async def _rewards_where(conn, cond) -> list[RewardOut]:
    return [RewardOut(**reward_dict(r)) for r in (await conn.execute(select(R).where(cond).order_by(R.c.id))).all()]


async def get_session(
    engine: AsyncEngine, session_id: str, *, tokens: bool = False
) -> SessionDetail | OrphanedSession | None:
    """One session with its calls in order, each with its rewards and text; None if nothing is known (an id
    no stored one can equal, with NUL or a lone surrogate, included). A session with rewards but no calls
    comes back as an `OrphanedSession`."""
    if not storable_text(session_id):
        return None
    cols = _CALL_COLS + (_TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        srow = (await conn.execute(_session_select().where(S.c.id == session_id))).first()
        rewards = await _rewards_where(conn, R.c.session_id == session_id)
        if srow is None:
            if not rewards:
                return None
            final = next((r for r in rewards if r.final), None)
            return OrphanedSession(
                id=session_id,
                finished_at=final.created_at if final else None,
                final_reward=final.value if final else None,
                final=final,
                rewards=rewards,
            )
        loaded = [
            c._mapping
            for c in (
                await conn.execute(select(*cols).where(C.c.session_id == session_id).order_by(C.c.started_at, C.c.seq))
            ).all()
        ]
        calls = await full_rows(conn, loaded, tokens=tokens)
    by_call: dict[str, list[RewardOut]] = {}
    for r in rewards:
        if r.call_id:
            by_call.setdefault(r.call_id, []).append(r)
    summaries = [
        CallSummary(**_call_fields(c, by_call.get(c["id"], [])), **(_token_fields(c) if tokens else {})) for c in calls
    ]
    return SessionDetail(
        **_session_fields(srow._mapping),
        agents=sorted({c["agent_name"] for c in calls if c["agent_name"]}),
        n_failed=sum(1 for c in summaries if c.status_code != 200),
        n_untrainable=sum(
            1 for c in summaries if c.trainable and not c.train.trainable and c.train.reason != PRUNED_REASON
        ),
        calls=summaries,
        rewards=rewards,
    )


async def get_call(engine: AsyncEngine, call_id: str, *, tokens: bool = False) -> CallDetail | None:
    """One call with its full request and response, its rewards and its session's final reward; None when
    there is no such call."""
    if not storable_text(call_id):
        return None
    cols = _CALL_COLS + (_TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        row = (await conn.execute(select(*cols).where(C.c.id == call_id))).first()
        if row is None:
            return None
        rewards = await _rewards_where(conn, R.c.call_id == call_id)
        final = (await conn.execute(select(R).where(R.c.session_id == row.session_id, R.c.final.is_(True)))).first()
        (m,) = await full_rows(conn, [row._mapping], tokens=tokens)
    return CallDetail(
        **_call_fields(m, rewards),
        upstream=m["upstream"],
        request=m["request"],
        response=m["response"],
        **(_token_fields(m) if tokens else {}),
        session_final=RewardOut(**reward_dict(final)) if final is not None else None,
    )


@dataclass(frozen=True, slots=True)
class ProducerCandidate:
    """A recorded call whose response made a given tool call: `n_messages` is how many messages its request
    had (where its assistant message sits in later requests; None when the request is not a chat request),
    `tool_call_ids` every tool call id of its response."""

    call_id: str
    n_messages: int | None
    tool_call_ids: tuple[str, ...]


def _n_messages(request: Any, kind: str | None = None, prefix: int | None = None) -> int | None:
    """How many messages the full request had; `prefix`: the messages of the base call not stored with a delta
    (store/call_deltas.py), counted only where the delta's list is `messages`."""
    if not isinstance(request, dict):
        return None
    messages = request.get("messages") or []
    if not isinstance(messages, list):
        return None
    return len(messages) + (prefix or 0 if list_key(kind) == "messages" else 0)


async def find_tool_call_producers(
    engine: AsyncEngine,
    *,
    session_id: str,
    exclude_call_id: str,
    started_before: datetime,
    tool_call_id: str,
    limit: int = 50,
) -> list[ProducerCandidate]:
    """Calls of `session_id` (other than `exclude_call_id`, started at or before `started_before`) whose
    response (choice 0) made tool call `tool_call_id`, newest first (by start time, then seq). At most `limit`
    calls whose stored response text contains the id are looked at."""
    q = (
        select(C.c.id, C.c.request, C.c.response, C.c.kind, C.c.messages_prefix_len)
        .where(
            C.c.session_id == session_id,
            C.c.id != exclude_call_id,
            C.c.started_at <= started_before,
            # Cheap prefilter in the database (jsonb as text on Postgres, the JSON text on SQLite); the
            # response is then parsed to keep only calls that really made this tool call.
            cast(C.c.response, Text).contains(tool_call_id, autoescape=True),
        )
        .order_by(C.c.started_at.desc(), C.c.seq.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    out = []
    for row in rows:
        ids = tuple(
            tc["id"]
            for tc in _response_message(row.response).get("tool_calls") or []
            if isinstance(tc, dict) and isinstance(tc.get("id"), str)
        )
        if tool_call_id not in ids:
            continue
        out.append(
            ProducerCandidate(
                call_id=row.id,
                tool_call_ids=ids,
                n_messages=_n_messages(row.request, row.kind, row.messages_prefix_len),
            )
        )
    return out


# --- rewards ---------------------------------------------------------------------------------------------


async def list_rewards(
    engine: AsyncEngine,
    *,
    session_id: str | None = None,
    source: str | None = None,
    final: bool | None = None,
    orphaned: bool | None = None,
    limit: int = 50,
    cursor: str | None = None,
    offset: int | None = None,
) -> Page[RewardListItem]:
    """Rewards, newest (highest id) first. Raises `BadQuery` for a bad cursor or a filter value no stored value
    can hold."""
    q = select(R, ORPHANED.label("orphaned"))
    if session_id:
        q = q.where(R.c.session_id == check_text(session_id, "session_id"))
    if source:
        q = q.where(R.c.source == check_text(source, "source"))
    if final is not None:
        q = q.where(R.c.final.is_(final))
    if orphaned is not None:
        q = q.where(ORPHANED if orphaned else ~ORPHANED)
    if cursor:
        q = q.where(R.c.id < _int_cursor(cursor))
    q = _paged(q.order_by(R.c.id.desc()), limit, offset, cursor)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    data = [RewardListItem(**reward_dict(r), orphaned=bool(r._mapping["orphaned"])) for r in rows]
    return Page[RewardListItem].of(data, encode_cursor(rows[-1].id) if more and rows else None)


# --- stats -----------------------------------------------------------------------------------------------


async def stats(engine: AsyncEngine) -> Stats:
    """Counts of sessions by status, calls (trainable, failed, trainable but not to be trained, by API), rewards
    by source, orphaned rewards, final reward by version."""
    async with engine.connect() as conn:
        by_status: dict[str, int] = dict((await conn.execute(select(STATUS, func.count()).group_by(STATUS))).all())
        kinds = (
            await conn.execute(
                select(
                    C.c.kind,
                    C.c.route,
                    func.count(),
                    _count_of(C.c.trainable.is_(True)),
                    _count_of(FAILED),
                    _count_of(UNTRAINED),
                )
                .select_from(C.outerjoin(S, S.c.id == C.c.session_id))
                .group_by(C.c.kind, C.c.route)
            )
        ).all()
        by_source = (
            await conn.execute(
                select(R.c.source, R.c.final, func.count(), func.avg(R.c.value), func.count(R.c.value))
                .group_by(R.c.source, R.c.final)
                .order_by(R.c.source, R.c.final)
            )
        ).all()
        n_orphaned, n_orphaned_sessions = (
            await conn.execute(select(func.count(), func.count(R.c.session_id.distinct())).where(ORPHANED))
        ).one()
        # A session's policy version is the newest one that served any of its calls.
        version = (
            select(func.max(C.c.policy_version))
            .where(C.c.session_id == R.c.session_id)
            .scalar_subquery()
            .label("policy_version")
        )
        finals = (select(version, R.c.value).where(R.c.final.is_(True), ~ORPHANED)).subquery()
        by_version = (
            await conn.execute(
                select(finals.c.policy_version, func.count(), func.count(finals.c.value), func.avg(finals.c.value))
                .group_by(finals.c.policy_version)
                .order_by(finals.c.policy_version)
            )
        ).all()
    n_calls = n_trainable = n_failed = n_untrained = 0
    by_api: dict[str, int] = {}
    for kind, route, n, trainable, failed, untrained in kinds:
        n_calls, n_trainable, n_failed, n_untrained = (
            n_calls + n,
            n_trainable + int(trainable),
            n_failed + int(failed),
            n_untrained + int(untrained),
        )
        api = call_api(kind, route)
        by_api[api] = by_api.get(api, 0) + int(n)
    sessions = {k: int(by_status.get(k, 0)) for k in ("open", "finished", "claimed", "trained", "skipped")}
    sessions.update({k: int(v) for k, v in by_status.items() if k not in sessions})
    sessions["total"] = sum(sessions.values())
    totals = {"total": 0, "final": 0, "intermediate": 0, "finished_without_reward": 0}
    sources: dict[str, dict[str, Any]] = {}
    for source, final, n, mean, n_valued in by_source:
        kind = "final" if final else "intermediate"
        totals["total"] += n
        totals[kind] += n
        if final:
            totals["finished_without_reward"] += n - n_valued
        entry = sources.setdefault(
            source, {"final": 0, "intermediate": 0, "mean_final": None, "mean_intermediate": None}
        )
        entry[kind] = int(n)
        entry[f"mean_{kind}"] = float(mean) if mean is not None else None
    return Stats(
        sessions=sessions,
        calls=CallCounts(
            total=int(n_calls),
            trainable=n_trainable,
            failed=n_failed,
            untrainable=n_untrained,
            by_api=dict(sorted(by_api.items())),
        ),
        rewards=RewardCounts(
            **{k: int(v) for k, v in totals.items()},
            orphaned=int(n_orphaned),
            orphaned_sessions=int(n_orphaned_sessions),
            by_source={k: SourceRewards(**v) for k, v in sources.items()},
        ),
        orphaned_rewards=int(n_orphaned),
        reward_by_policy_version=[
            VersionRewards(
                policy_version=v,
                sessions=int(n),
                rewarded=int(n_valued),
                mean=float(mean) if mean is not None else None,
            )
            for v, n, n_valued, mean in by_version
        ],
    )


# --- what the trainer did --------------------------------------------------------------------------------


async def _int_keyset_page(conn, table, key, limit: int, cursor: str | None, offset: int | None):
    """Rows of `table` by `key` descending (a unique Integer column): keyset after `cursor`, or `offset`;
    returns (rows of the page, whether there are more)."""
    q = select(table)
    if cursor:
        q = q.where(key < _int_cursor(cursor, INT32))
    q = _paged(q.order_by(key.desc()), limit, offset, cursor)
    rows = [r._mapping for r in (await conn.execute(q)).all()]
    return rows[:limit], len(rows) > limit


async def list_train_steps(
    engine: AsyncEngine, *, limit: int = 50, cursor: str | None = None, offset: int | None = None
) -> Page[TrainStepRow]:
    """The trainer's optimizer steps with their metrics, newest first. Raises `BadQuery` for a bad cursor."""
    async with engine.connect() as conn:
        rows, more = await _int_keyset_page(conn, T, T.c.step, limit, cursor, offset)
    data = [
        TrainStepRow(
            step=m["step"],
            policy_version=m["policy_version"],
            n_sessions=m["n_sessions"],
            n_samples=m["n_samples"],
            metrics=m["metrics"] or {},
            created_at=m["created_at"],
        )
        for m in rows
    ]
    return Page[TrainStepRow].of(data, encode_cursor(rows[-1]["step"]) if more and rows else None)


async def list_policy_versions(
    engine: AsyncEngine, *, limit: int = 50, cursor: str | None = None, offset: int | None = None
) -> Page[PolicyVersionRow]:
    """Published weights, newest first, each with the upstreams that serve it now (sorted). Raises
    `BadQuery` for a bad cursor."""
    async with engine.connect() as conn:
        rows, more = await _int_keyset_page(conn, P, P.c.version, limit, cursor, offset)
        serving = (await conn.execute(select(U.c.upstream, U.c.version).order_by(U.c.upstream))).all()
    by_version: dict[int, list[str]] = {}
    for upstream, version in serving:
        by_version.setdefault(version, []).append(upstream)
    data = [
        PolicyVersionRow(
            version=m["version"],
            kind=m["kind"],
            served_model=m["served_model"],
            path=m["path"],
            train_step=m["train_step"],
            status=m["status"],
            created_at=m["created_at"],
            serving_upstreams=by_version.get(m["version"], []),
        )
        for m in rows
    ]
    return Page[PolicyVersionRow].of(data, encode_cursor(rows[-1]["version"]) if more and rows else None)
