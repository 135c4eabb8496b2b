"""Read queries behind the JSON read API (and the dashboard later).

A session's status is derived: the trainer's `claimed` / `trained` / `skipped` when it set one, else
`finished` when a final reward row exists (a value, or a close without one), else `open`. Lists are newest
first and paginated by an opaque keyset cursor (stable under concurrent inserts) or by `offset`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine
from trainwire.store.models import Call, Reward, Session
from trainwire.store.rewards import aware, reward_dict

S, C, R = Session.__table__, Call.__table__, Reward.__table__

FINAL_EXISTS = exists().where(R.c.session_id == S.c.id, R.c.final.is_(True))
STATUS = case((S.c.status != "open", S.c.status), (FINAL_EXISTS, "finished"), else_="open")
ORPHANED = ~exists().where(S.c.id == R.c.session_id)


class BadQuery(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class Page:
    data: list[dict[str, Any]]
    next_cursor: str | None

    def body(self) -> dict[str, Any]:
        return {"object": "list", "data": self.data, "has_more": self.next_cursor is not None,
                "next_cursor": self.next_cursor}


# --- cursors ---------------------------------------------------------------------------------------------

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
        raise BadQuery(f"cursor {cursor[:40]!r} is not a cursor this API returned (use next_cursor as given)",
                       "cursor") from None


def status_filter(status: str):
    if status == "open":
        return and_(S.c.status == "open", ~FINAL_EXISTS)
    if status == "finished":
        return and_(S.c.status == "open", FINAL_EXISTS)
    return S.c.status == status


# --- sessions --------------------------------------------------------------------------------------------

_SESSION_COLS = [S.c.id, S.c.task_id, S.c.status.label("raw_status"), STATUS.label("status"), S.c.n_calls,
                 S.c.first_call_at, S.c.last_call_at, S.c.claimed_by, S.c.claimed_at, S.c.train_step,
                 S.c.skip_reason]


def _final_join():
    fr = R.alias("fr")
    return fr, and_(fr.c.session_id == S.c.id, fr.c.final.is_(True))


def _session_dict(m, agents: list[str] | None = None) -> dict[str, Any]:
    final = None
    if m["fr_id"] is not None:
        final = {"id": m["fr_id"], "value": m["fr_value"], "source": m["fr_source"],
                 "created_at": aware(m["fr_created_at"])}
    out = {"object": "session", "id": m["id"], "task_id": m["task_id"], "status": m["status"],
           "n_calls": m["n_calls"], "first_call_at": aware(m["first_call_at"]),
           "last_call_at": aware(m["last_call_at"]),
           "finished_at": final["created_at"] if final else None,
           "final_reward": final["value"] if final else None, "final": final,
           "claimed_by": m["claimed_by"], "claimed_at": aware(m["claimed_at"]), "train_step": m["train_step"],
           "skip_reason": m["skip_reason"]}
    if agents is not None:
        out["agents"] = agents
    return out


def _session_select():
    fr, on = _final_join()
    return select(*_SESSION_COLS, fr.c.id.label("fr_id"), fr.c.value.label("fr_value"),
                  fr.c.source.label("fr_source"), fr.c.created_at.label("fr_created_at")
                  ).select_from(S.outerjoin(fr, on))


async def _agents_of(conn, session_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {sid: [] for sid in session_ids}
    if not session_ids:
        return out
    rows = (await conn.execute(select(C.c.session_id, C.c.agent_name).where(
        C.c.session_id.in_(session_ids), C.c.agent_name.is_not(None)).distinct()
        .order_by(C.c.session_id, C.c.agent_name))).all()
    for sid, agent in rows:
        out[sid].append(agent)
    return out


async def list_sessions(engine: AsyncEngine, *, status: str | None = None, task: str | None = None,
                        agent: str | None = None, since: datetime | None = None, until: datetime | None = None,
                        limit: int = 50, cursor: str | None = None, offset: int | None = None) -> Page:
    """Sessions active in [since, until), newest (by first call) first."""
    q = _session_select()
    if status:
        q = q.where(status_filter(status))
    if task:
        q = q.where(S.c.task_id == task)
    if agent:
        q = q.where(exists().where(C.c.session_id == S.c.id, C.c.agent_name == agent))
    if since:
        q = q.where(S.c.last_call_at >= since)
    if until:
        q = q.where(S.c.first_call_at < until)
    if cursor:
        t, sid = decode_cursor(cursor, 2)
        try:
            t = aware(datetime.fromisoformat(t))
        except (TypeError, ValueError):
            raise BadQuery("cursor is not a cursor this API returned (use next_cursor as given)", "cursor") from None
        q = q.where(or_(S.c.first_call_at < t, and_(S.c.first_call_at == t, S.c.id < sid)))
    q = q.order_by(S.c.first_call_at.desc(), S.c.id.desc()).limit(limit + 1)
    if offset and not cursor:
        q = q.offset(offset)
    async with engine.connect() as conn:
        rows = [r._mapping for r in (await conn.execute(q)).all()]
        more = len(rows) > limit
        rows = rows[:limit]
        agents = await _agents_of(conn, [r["id"] for r in rows])
    data = [_session_dict(r, agents[r["id"]]) for r in rows]
    nxt = encode_cursor(aware(rows[-1]["first_call_at"]), rows[-1]["id"]) if more and rows else None
    return Page(data, nxt)


# --- calls -----------------------------------------------------------------------------------------------

_CALL_COLS = [C.c.id, C.c.session_id, C.c.seq, C.c.task_id, C.c.agent_name, C.c.trainable, C.c.kind, C.c.path,
              C.c.stream, C.c.model_requested, C.c.model_served, C.c.route, C.c.upstream, C.c.policy_version,
              C.c.finish_reason, C.c.usage, C.c.status_code, C.c.error, C.c.aborted, C.c.started_at,
              C.c.finished_at, C.c.upstream_ms, C.c.ttft_ms, C.c.overhead_ms, C.c.request, C.c.response]
_TOKEN_COLS = [C.c.prompt_token_ids, C.c.completion_token_ids, C.c.logprobs]


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
    return orjson.dumps(content).decode()


def call_input(kind: str, request: Any) -> dict[str, Any] | None:
    """The last user or tool message of a chat request (what this turn answered), or a completion's prompt."""
    if not isinstance(request, dict):
        return None
    if kind == "chat":
        for m in reversed(request.get("messages") or []):
            if isinstance(m, dict) and m.get("role") in ("user", "tool"):
                out = {"role": m["role"], "content": content_text(m.get("content"))}
                if m.get("tool_call_id"):
                    out["tool_call_id"] = m["tool_call_id"]
                return out
        return None
    if kind == "completion":
        prompt = request.get("prompt")
        return {"role": "prompt", "content": prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()}
    return None


def call_output(kind: str, response: Any) -> dict[str, Any] | None:
    """The assistant's answer (choice 0): text, and tool calls as name + arguments."""
    if not isinstance(response, dict):
        return None
    choices = response.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    if kind == "completion":
        return {"content": first.get("text")}
    if kind != "chat":
        return None
    msg = first.get("message") or {}
    out: dict[str, Any] = {"content": content_text(msg.get("content"))}
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        out["reasoning_content"] = reasoning
    calls = []
    for tc in msg.get("tool_calls") or []:
        fn = (tc or {}).get("function") or {}
        calls.append({"id": tc.get("id"), "name": fn.get("name"), "arguments": fn.get("arguments")})
    if calls:
        out["tool_calls"] = calls
    return out


def _call_dict(m, rewards: list[dict[str, Any]], *, tokens: bool, full: bool) -> dict[str, Any]:
    out = {"object": "call", "id": m["id"], "session_id": m["session_id"], "seq": m["seq"],
           "task_id": m["task_id"], "agent_name": m["agent_name"], "trainable": bool(m["trainable"]),
           "kind": m["kind"], "path": m["path"], "stream": bool(m["stream"]),
           "model_requested": m["model_requested"], "model_served": m["model_served"], "route": m["route"],
           "policy_version": m["policy_version"], "status_code": m["status_code"], "error": m["error"],
           "aborted": bool(m["aborted"]), "finish_reason": m["finish_reason"], "usage": m["usage"],
           "started_at": aware(m["started_at"]), "finished_at": aware(m["finished_at"]),
           "upstream_ms": m["upstream_ms"], "ttft_ms": m["ttft_ms"], "overhead_ms": m["overhead_ms"],
           "input": call_input(m["kind"], m["request"]), "output": call_output(m["kind"], m["response"]),
           "rewards": rewards}
    if full:
        out["upstream"] = m["upstream"]
        out["request"] = m["request"]
        out["response"] = m["response"]
    if tokens:
        out["prompt_token_ids"] = m["prompt_token_ids"]
        out["completion_token_ids"] = m["completion_token_ids"]
        out["logprobs"] = m["logprobs"]
    return out


async def _rewards_where(conn, cond) -> list[dict[str, Any]]:
    return [reward_dict(r) for r in (await conn.execute(select(R).where(cond).order_by(R.c.id))).all()]


async def get_session(engine: AsyncEngine, session_id: str, *, tokens: bool = False) -> dict[str, Any] | None:
    """One session with its calls in order, each with its rewards and text; None if nothing is known.
    A session with rewards but no calls comes back with status `orphaned`."""
    cols = _CALL_COLS + (_TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        srow = (await conn.execute(_session_select().where(S.c.id == session_id))).first()
        rewards = await _rewards_where(conn, R.c.session_id == session_id)
        if srow is None:
            if not rewards:
                return None
            final = next((r for r in rewards if r["final"]), None)
            return {"object": "session", "id": session_id, "task_id": None, "status": "orphaned", "n_calls": 0,
                    "finished_at": final["created_at"] if final else None,
                    "final_reward": final["value"] if final else None, "final": final, "agents": [],
                    "calls": [], "rewards": rewards}
        calls = (await conn.execute(select(*cols).where(C.c.session_id == session_id)
                                    .order_by(C.c.started_at, C.c.seq))).all()
    by_call: dict[str, list[dict[str, Any]]] = {}
    for r in rewards:
        if r["call_id"]:
            by_call.setdefault(r["call_id"], []).append(r)
    out = _session_dict(srow._mapping)
    out["agents"] = sorted({c.agent_name for c in calls if c.agent_name})
    out["calls"] = [_call_dict(c._mapping, by_call.get(c.id, []), tokens=tokens, full=False) for c in calls]
    out["rewards"] = rewards
    return out


async def get_call(engine: AsyncEngine, call_id: str, *, tokens: bool = False) -> dict[str, Any] | None:
    cols = _CALL_COLS + (_TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        row = (await conn.execute(select(*cols).where(C.c.id == call_id))).first()
        if row is None:
            return None
        rewards = await _rewards_where(conn, R.c.call_id == call_id)
        final = (await conn.execute(select(R).where(R.c.session_id == row.session_id, R.c.final.is_(True)))).first()
    out = _call_dict(row._mapping, rewards, tokens=tokens, full=True)
    out["session_final"] = reward_dict(final) if final is not None else None
    return out


# --- rewards ---------------------------------------------------------------------------------------------

async def list_rewards(engine: AsyncEngine, *, session_id: str | None = None, source: str | None = None,
                       final: bool | None = None, orphaned: bool | None = None, limit: int = 50,
                       cursor: str | None = None, offset: int | None = None) -> Page:
    q = select(R, ORPHANED.label("orphaned"))
    if session_id:
        q = q.where(R.c.session_id == session_id)
    if source:
        q = q.where(R.c.source == source)
    if final is not None:
        q = q.where(R.c.final.is_(final))
    if orphaned is not None:
        q = q.where(ORPHANED if orphaned else ~ORPHANED)
    if cursor:
        (last_id,) = decode_cursor(cursor, 1)
        if not isinstance(last_id, int):
            raise BadQuery("cursor is not a cursor this API returned (use next_cursor as given)", "cursor")
        q = q.where(R.c.id < last_id)
    q = q.order_by(R.c.id.desc()).limit(limit + 1)
    if offset and not cursor:
        q = q.offset(offset)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    data = [{**reward_dict(r), "orphaned": bool(r._mapping["orphaned"])} for r in rows]
    return Page(data, encode_cursor(rows[-1].id) if more and rows else None)


# --- stats -----------------------------------------------------------------------------------------------

async def stats(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        by_status = dict((await conn.execute(select(STATUS, func.count()).group_by(STATUS))).all())
        n_calls, n_trainable, n_failed = (await conn.execute(select(
            func.count(), func.coalesce(func.sum(case((C.c.trainable.is_(True), 1), else_=0)), 0),
            func.coalesce(func.sum(case((C.c.status_code != 200, 1), else_=0)), 0)))).one()
        by_source = (await conn.execute(select(
            R.c.source, R.c.final, func.count(), func.avg(R.c.value), func.count(R.c.value))
            .group_by(R.c.source, R.c.final).order_by(R.c.source, R.c.final))).all()
        n_orphaned, n_orphaned_sessions = (await conn.execute(select(
            func.count(), func.count(R.c.session_id.distinct())).where(ORPHANED))).one()
        # A session's policy version is the newest one that served any of its calls.
        version = (select(func.max(C.c.policy_version)).where(C.c.session_id == R.c.session_id)
                   .scalar_subquery().label("policy_version"))
        finals = (select(version, R.c.value).where(R.c.final.is_(True), ~ORPHANED)).subquery()
        by_version = (await conn.execute(select(
            finals.c.policy_version, func.count(), func.count(finals.c.value), func.avg(finals.c.value))
            .group_by(finals.c.policy_version).order_by(finals.c.policy_version))).all()
    sessions = {k: int(by_status.get(k, 0)) for k in ("open", "finished", "claimed", "trained", "skipped")}
    sessions.update({k: int(v) for k, v in by_status.items() if k not in sessions})
    sessions["total"] = sum(v for k, v in sessions.items())
    rewards = {"total": 0, "final": 0, "intermediate": 0, "finished_without_reward": 0, "orphaned": int(n_orphaned),
               "orphaned_sessions": int(n_orphaned_sessions), "by_source": {}}
    for source, final, n, mean, n_valued in by_source:
        rewards["total"] += n
        rewards["final" if final else "intermediate"] += n
        if final:
            rewards["finished_without_reward"] += n - n_valued
        entry = rewards["by_source"].setdefault(source, {"final": 0, "intermediate": 0, "mean_final": None,
                                                         "mean_intermediate": None})
        entry["final" if final else "intermediate"] = int(n)
        entry["mean_final" if final else "mean_intermediate"] = float(mean) if mean is not None else None
    return {"object": "stats", "sessions": sessions,
            "calls": {"total": int(n_calls), "trainable": int(n_trainable), "failed": int(n_failed)},
            "rewards": rewards, "orphaned_rewards": int(n_orphaned),
            "reward_by_policy_version": [
                {"policy_version": v, "sessions": int(n), "rewarded": int(n_valued),
                 "mean": float(mean) if mean is not None else None} for v, n, n_valued, mean in by_version]}
