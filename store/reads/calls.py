"""Calls: one call whole (`get_call`), the columns and fields every call read shares (a session's calls use them
too), and the calls that made a given tool call (`find_tool_call_producers`, for the automatic rewards).

A call's `api`, `input`, `input_messages`, `output` and `tools` are read by its kind's shape
(trainwire.call_shapes), its `train` status by store/reads/trainability.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncEngine

from trainwire.call_shapes import call_api, call_input, call_output, input_messages, shape_of, tool_names
from trainwire.call_shapes.chat import answer_message
from trainwire.records import text_problem
from trainwire.store.delta_reads import DELTA_COLS, full_rows, prompt_tokens
from trainwire.store.models import Call, Reward, Session
from trainwire.store.read_models import CallDetail, RewardOut
from trainwire.store.reads.trainability import TokenCount, train_status
from trainwire.store.rewards import reward_dict

S, C, R = Session.__table__, Call.__table__, Reward.__table__

CALL_COLS = [
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
    prompt_tokens(TokenCount(C.c.prompt_token_ids)).label("n_prompt_tokens"),
    TokenCount(C.c.completion_token_ids).label("n_completion_tokens"),
    TokenCount(C.c.logprobs).label("n_logprobs"),
]
TOKEN_COLS = [C.c.prompt_token_ids, C.c.completion_token_ids, C.c.logprobs]


def call_fields(m, rewards: list[RewardOut]) -> dict[str, Any]:
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


def token_fields(m) -> dict[str, Any]:
    return {
        "prompt_token_ids": m["prompt_token_ids"],
        "completion_token_ids": m["completion_token_ids"],
        "logprobs": m["logprobs"],
    }


async def rewards_where(conn, cond) -> list[RewardOut]:
    return [RewardOut(**reward_dict(r)) for r in (await conn.execute(select(R).where(cond).order_by(R.c.id))).all()]


async def get_call(engine: AsyncEngine, call_id: str, *, tokens: bool = False) -> CallDetail | None:
    """One call with its full request and response, its rewards and its session's final reward; None when
    there is no such call."""
    if text_problem(call_id):
        return None
    cols = CALL_COLS + (TOKEN_COLS if tokens else [])
    async with engine.connect() as conn:
        row = (await conn.execute(select(*cols).where(C.c.id == call_id))).first()
        if row is None:
            return None
        rewards = await rewards_where(conn, R.c.call_id == call_id)
        final = (await conn.execute(select(R).where(R.c.session_id == row.session_id, R.c.final.is_(True)))).first()
        (m,) = await full_rows(conn, [row._mapping], tokens=tokens)
    return CallDetail(
        **call_fields(m, rewards),
        upstream=m["upstream"],
        request=m["request"],
        response=m["response"],
        **(token_fields(m) if tokens else {}),
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


def n_messages(request: Any, kind: str | None = None, prefix: int | None = None) -> int | None:
    """How many messages the full request had; `prefix`: the messages of the base call not stored with a delta
    (store/call_deltas.py), counted only where the delta's list is `messages`."""
    if not isinstance(request, dict):
        return None
    messages = request.get("messages") or []
    if not isinstance(messages, list):
        return None
    return len(messages) + (prefix or 0 if shape_of(kind).list_key == "messages" else 0)


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
            for tc in answer_message(row.response).get("tool_calls") or []
            if isinstance(tc, dict) and isinstance(tc.get("id"), str)
        )
        if tool_call_id not in ids:
            continue
        out.append(
            ProducerCandidate(
                call_id=row.id,
                tool_call_ids=ids,
                n_messages=n_messages(row.request, row.kind, row.messages_prefix_len),
            )
        )
    return out
