"""Read queries behind the JSON read API and the dashboard: every one returns typed records
(`trainwire.store.read_models`), never rows or dicts, so no caller needs to know the tables or the dialect.

A session's status is derived: the trainer's `claimed` / `trained` / `skipped` when it set one, else
`finished` when a final reward row exists (a value, or a close without one), else `open`. Lists are newest
first and paginated by an opaque keyset cursor (stable under concurrent inserts) or by `offset`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Text, and_, case, cast, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

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

__all__ = ["BadQuery", "Page", "ProducerCandidate", "call_input", "call_output", "content_text", "decode_cursor",
           "encode_cursor", "find_tool_call_producers", "get_call", "get_session", "list_policy_versions",
           "list_rewards", "list_sessions", "list_train_steps", "stats"]


class BadQuery(ValueError):
    """A query parameter the store cannot use (a cursor it did not hand out); `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# --- cursors ---------------------------------------------------------------------------------------------

_NOT_A_CURSOR = "cursor is not a cursor this API returned (use next_cursor as given)"


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


def _int_cursor(cursor: str) -> int:
    (last,) = decode_cursor(cursor, 1)
    if not isinstance(last, int) or isinstance(last, bool):
        raise BadQuery(_NOT_A_CURSOR, "cursor")
    return last


def _time_id_cursor(cursor: str) -> tuple[datetime, str]:
    t, key = decode_cursor(cursor, 2)
    try:
        when = datetime.fromisoformat(t)
    except (TypeError, ValueError):
        raise BadQuery(_NOT_A_CURSOR, "cursor") from None
    if not isinstance(key, str):
        raise BadQuery(_NOT_A_CURSOR, "cursor")
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)), key


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


def _response_message(response: Any) -> dict[str, Any]:
    """The assistant message of choice 0 of a chat response ({} when there is none)."""
    if not isinstance(response, dict):
        return {}
    choices = response.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = first.get("message")
    return msg if isinstance(msg, dict) else {}


# --- sessions --------------------------------------------------------------------------------------------

_SESSION_COLS = [S.c.id, S.c.task_id, S.c.status.label("raw_status"), STATUS.label("status"), S.c.n_calls,
                 S.c.first_call_at, S.c.last_call_at, S.c.claimed_by, S.c.claimed_at, S.c.train_step,
                 S.c.skip_reason]


def _session_select():
    fr = R.alias("fr")
    return select(*_SESSION_COLS, fr.c.id.label("fr_id"), fr.c.value.label("fr_value"),
                  fr.c.source.label("fr_source"), fr.c.created_at.label("fr_created_at")
                  ).select_from(S.outerjoin(fr, and_(fr.c.session_id == S.c.id, fr.c.final.is_(True))))


def _session_fields(m) -> dict[str, Any]:
    final = None
    if m["fr_id"] is not None:
        final = FinalReward(id=m["fr_id"], value=m["fr_value"], source=m["fr_source"],
                            created_at=m["fr_created_at"])
    return {"id": m["id"], "task_id": m["task_id"], "status": m["status"], "n_calls": m["n_calls"],
            "first_call_at": m["first_call_at"], "last_call_at": m["last_call_at"],
            "finished_at": final.created_at if final else None, "final_reward": final.value if final else None,
            "final": final, "claimed_by": m["claimed_by"], "claimed_at": m["claimed_at"],
            "train_step": m["train_step"], "skip_reason": m["skip_reason"]}


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
                        limit: int = 50, cursor: str | None = None,
                        offset: int | None = None) -> Page[SessionSummary]:
    """Sessions active in [since, until), newest (by first call) first. Raises `BadQuery` for a bad cursor."""
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
        t, sid = _time_id_cursor(cursor)
        q = q.where(or_(S.c.first_call_at < t, and_(S.c.first_call_at == t, S.c.id < sid)))
    q = _paged(q.order_by(S.c.first_call_at.desc(), S.c.id.desc()), limit, offset, cursor)
    async with engine.connect() as conn:
        rows = [r._mapping for r in (await conn.execute(q)).all()]
        more = len(rows) > limit
        rows = rows[:limit]
        agents = await _agents_of(conn, [r["id"] for r in rows])
    data = [SessionSummary(**_session_fields(r), agents=agents[r["id"]]) for r in rows]
    nxt = encode_cursor(aware(rows[-1]["first_call_at"]), rows[-1]["id"]) if more and rows else None
    return Page[SessionSummary].of(data, nxt)


# --- calls -----------------------------------------------------------------------------------------------

_CALL_COLS = [C.c.id, C.c.session_id, C.c.seq, C.c.task_id, C.c.agent_name, C.c.trainable, C.c.kind, C.c.path,
              C.c.stream, C.c.model_requested, C.c.model_served, C.c.route, C.c.upstream, C.c.policy_version,
              C.c.finish_reason, C.c.usage, C.c.status_code, C.c.error, C.c.aborted, C.c.started_at,
              C.c.finished_at, C.c.upstream_ms, C.c.ttft_ms, C.c.overhead_ms, C.c.request, C.c.response]
_TOKEN_COLS = [C.c.prompt_token_ids, C.c.completion_token_ids, C.c.logprobs]


def _call_fields(m, rewards: list[RewardOut]) -> dict[str, Any]:
    return {"id": m["id"], "session_id": m["session_id"], "seq": m["seq"], "task_id": m["task_id"],
            "agent_name": m["agent_name"], "trainable": bool(m["trainable"]), "kind": m["kind"], "path": m["path"],
            "stream": bool(m["stream"]), "model_requested": m["model_requested"],
            "model_served": m["model_served"], "route": m["route"], "policy_version": m["policy_version"],
            "status_code": m["status_code"], "error": m["error"], "aborted": bool(m["aborted"]),
            "finish_reason": m["finish_reason"], "usage": m["usage"], "started_at": m["started_at"],
            "finished_at": m["finished_at"], "upstream_ms": m["upstream_ms"], "ttft_ms": m["ttft_ms"],
            "overhead_ms": m["overhead_ms"], "input": call_input(m["kind"], m["request"]),
            "output": call_output(m["kind"], m["response"]), "rewards": rewards}


def _token_fields(m) -> dict[str, Any]:
    return {"prompt_token_ids": m["prompt_token_ids"], "completion_token_ids": m["completion_token_ids"],
            "logprobs": m["logprobs"]}


async def _rewards_where(conn, cond) -> list[RewardOut]:
    return [RewardOut(**reward_dict(r)) for r in (await conn.execute(select(R).where(cond).order_by(R.c.id))).all()]


async def get_session(engine: AsyncEngine, session_id: str, *,
                      tokens: bool = False) -> SessionDetail | OrphanedSession | None:
    """One session with its calls in order, each with its rewards and text; None if nothing is known.
    A session with rewards but no calls comes back as an `OrphanedSession`."""
    cols = _CALL_COLS + (_TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        srow = (await conn.execute(_session_select().where(S.c.id == session_id))).first()
        rewards = await _rewards_where(conn, R.c.session_id == session_id)
        if srow is None:
            if not rewards:
                return None
            final = next((r for r in rewards if r.final), None)
            return OrphanedSession(id=session_id, finished_at=final.created_at if final else None,
                                   final_reward=final.value if final else None, final=final, rewards=rewards)
        calls = [c._mapping for c in (await conn.execute(select(*cols).where(C.c.session_id == session_id)
                                                         .order_by(C.c.started_at, C.c.seq))).all()]
    by_call: dict[str, list[RewardOut]] = {}
    for r in rewards:
        if r.call_id:
            by_call.setdefault(r.call_id, []).append(r)
    return SessionDetail(
        **_session_fields(srow._mapping), agents=sorted({c["agent_name"] for c in calls if c["agent_name"]}),
        calls=[CallSummary(**_call_fields(c, by_call.get(c["id"], [])), **(_token_fields(c) if tokens else {}))
               for c in calls],
        rewards=rewards)


async def get_call(engine: AsyncEngine, call_id: str, *, tokens: bool = False) -> CallDetail | None:
    """One call with its full request and response, its rewards and its session's final reward."""
    cols = _CALL_COLS + (_TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        row = (await conn.execute(select(*cols).where(C.c.id == call_id))).first()
        if row is None:
            return None
        rewards = await _rewards_where(conn, R.c.call_id == call_id)
        final = (await conn.execute(select(R).where(R.c.session_id == row.session_id, R.c.final.is_(True)))).first()
    m = row._mapping
    return CallDetail(**_call_fields(m, rewards), upstream=m["upstream"], request=m["request"],
                      response=m["response"], **(_token_fields(m) if tokens else {}),
                      session_final=RewardOut(**reward_dict(final)) if final is not None else None)


@dataclass(frozen=True, slots=True)
class ProducerCandidate:
    """A recorded call whose response made a given tool call: `n_messages` is how many messages its request
    had (where its assistant message sits in later requests; None when the request is not a chat request),
    `tool_call_ids` every tool call id of its response."""

    call_id: str
    n_messages: int | None
    tool_call_ids: tuple[str, ...]


def _n_messages(request: Any) -> int | None:
    if not isinstance(request, dict):
        return None
    messages = request.get("messages") or []
    return len(messages) if isinstance(messages, list) else None


async def find_tool_call_producers(engine: AsyncEngine, *, session_id: str, exclude_call_id: str,
                                   started_before: datetime, tool_call_id: str,
                                   limit: int = 50) -> list[ProducerCandidate]:
    """Calls of `session_id` (other than `exclude_call_id`, started at or before `started_before`) whose
    response (choice 0) made tool call `tool_call_id`, newest first (by start time, then seq). At most `limit`
    calls whose stored response text contains the id are looked at."""
    q = (select(C.c.id, C.c.request, C.c.response)
         .where(C.c.session_id == session_id, C.c.id != exclude_call_id, C.c.started_at <= started_before,
                # Cheap prefilter in the database (jsonb as text on Postgres, the JSON text on SQLite); the
                # response is then parsed to keep only calls that really made this tool call.
                cast(C.c.response, Text).contains(tool_call_id, autoescape=True))
         .order_by(C.c.started_at.desc(), C.c.seq.desc()).limit(limit))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    out = []
    for row in rows:
        ids = tuple(tc["id"] for tc in _response_message(row.response).get("tool_calls") or []
                    if isinstance(tc, dict) and isinstance(tc.get("id"), str))
        if tool_call_id not in ids:
            continue
        out.append(ProducerCandidate(call_id=row.id, n_messages=_n_messages(row.request), tool_call_ids=ids))
    return out


# --- rewards ---------------------------------------------------------------------------------------------

async def list_rewards(engine: AsyncEngine, *, session_id: str | None = None, source: str | None = None,
                       final: bool | None = None, orphaned: bool | None = None, limit: int = 50,
                       cursor: str | None = None, offset: int | None = None) -> Page[RewardListItem]:
    """Rewards, newest (highest id) first. Raises `BadQuery` for a bad cursor."""
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
    """Counts of sessions by status, calls, rewards by source, orphaned rewards, final reward by version."""
    async with engine.connect() as conn:
        by_status: dict[str, int] = dict((await conn.execute(select(STATUS, func.count()).group_by(STATUS))).all())
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
    sessions["total"] = sum(sessions.values())
    totals = {"total": 0, "final": 0, "intermediate": 0, "finished_without_reward": 0}
    sources: dict[str, dict[str, Any]] = {}
    for source, final, n, mean, n_valued in by_source:
        kind = "final" if final else "intermediate"
        totals["total"] += n
        totals[kind] += n
        if final:
            totals["finished_without_reward"] += n - n_valued
        entry = sources.setdefault(source, {"final": 0, "intermediate": 0, "mean_final": None,
                                            "mean_intermediate": None})
        entry[kind] = int(n)
        entry[f"mean_{kind}"] = float(mean) if mean is not None else None
    return Stats(
        sessions=sessions, calls=CallCounts(total=int(n_calls), trainable=int(n_trainable), failed=int(n_failed)),
        rewards=RewardCounts(**{k: int(v) for k, v in totals.items()}, orphaned=int(n_orphaned),
                             orphaned_sessions=int(n_orphaned_sessions),
                             by_source={k: SourceRewards(**v) for k, v in sources.items()}),
        orphaned_rewards=int(n_orphaned),
        reward_by_policy_version=[
            VersionRewards(policy_version=v, sessions=int(n), rewarded=int(n_valued),
                           mean=float(mean) if mean is not None else None) for v, n, n_valued, mean in by_version])


# --- what the trainer did --------------------------------------------------------------------------------

async def _int_keyset_page(conn, table, key, limit: int, cursor: str | None, offset: int | None):
    """Rows of `table` by `key` descending (a unique integer column): keyset after `cursor`, or `offset`;
    returns (rows of the page, whether there are more)."""
    q = select(table)
    if cursor:
        q = q.where(key < _int_cursor(cursor))
    q = _paged(q.order_by(key.desc()), limit, offset, cursor)
    rows = [r._mapping for r in (await conn.execute(q)).all()]
    return rows[:limit], len(rows) > limit


async def list_train_steps(engine: AsyncEngine, *, limit: int = 50, cursor: str | None = None,
                           offset: int | None = None) -> Page[TrainStepRow]:
    """The trainer's optimizer steps with their metrics, newest first. Raises `BadQuery` for a bad cursor."""
    async with engine.connect() as conn:
        rows, more = await _int_keyset_page(conn, T, T.c.step, limit, cursor, offset)
    data = [TrainStepRow(step=m["step"], policy_version=m["policy_version"], n_sessions=m["n_sessions"],
                         n_samples=m["n_samples"], metrics=m["metrics"] or {}, created_at=m["created_at"])
            for m in rows]
    return Page[TrainStepRow].of(data, encode_cursor(rows[-1]["step"]) if more and rows else None)


async def list_policy_versions(engine: AsyncEngine, *, limit: int = 50, cursor: str | None = None,
                               offset: int | None = None) -> Page[PolicyVersionRow]:
    """Published weights, newest first, each with the upstreams that serve it now (sorted). Raises
    `BadQuery` for a bad cursor."""
    async with engine.connect() as conn:
        rows, more = await _int_keyset_page(conn, P, P.c.version, limit, cursor, offset)
        serving = (await conn.execute(select(U.c.upstream, U.c.version).order_by(U.c.upstream))).all()
    by_version: dict[int, list[str]] = {}
    for upstream, version in serving:
        by_version.setdefault(version, []).append(upstream)
    data = [PolicyVersionRow(version=m["version"], kind=m["kind"], served_model=m["served_model"], path=m["path"],
                             train_step=m["train_step"], status=m["status"], created_at=m["created_at"],
                             serving_upstreams=by_version.get(m["version"], [])) for m in rows]
    return Page[PolicyVersionRow].of(data, encode_cursor(rows[-1]["version"]) if more and rows else None)
