"""The JSON read API (admin key when one is set). Lists are newest first and paginated:
`{"object": "list", "data": [...], "has_more": bool, "next_cursor": str | null}`; pass `cursor=next_cursor`
(or `offset=N`) for the next page.

    GET /sessions?status=&task=&agent=&since=&until=&has=&limit=&cursor=&offset=
    GET /sessions/{session_id}?tokens=true        calls in order with rewards and text; token ids on request
    GET /calls/{call_id}?tokens=true              one call with its full request and response
    GET /rewards?session_id=&source=&final=&orphaned=&limit=&cursor=&offset=
    GET /stats                                    counts, orphaned rewards, reward mean by policy version

Every call says which `api` it came in on (chat | completions | responses | messages | passthrough), its token
counts, the tools it offered, its whole input (`input_messages`, the same shape for every API), its sampling
settings and `train`: `{"trainable", "reason"}`, why it will not be trained on when it will not. Sessions
count their failed calls (`n_failed`, status not 200) and their untrainable ones (`n_untrainable`: calls meant
for training, i.e. not evaluation, frozen or pass-through calls, that will still not be trained on: failed, no
token ids, or a reason the proxy stored). `has=failed` / `has=untrainable` (repeated or comma-separated: every
one must hold) keeps the sessions with at least one such call.

No input makes these routes answer 5xx: a bad value is a 400 naming its parameter, an id that cannot exist a
404, in OpenAI's error format.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from trainwire.proxy.errors import ApiError, responses
from trainwire.proxy.plumbing import Cursor, Limit, Offset, WireInt, admin, json_response, state_of
from trainwire.store.backlog import rewarded_backlog
from trainwire.store.journal import count_rejected, rejected_files
from trainwire.store.read_models import (
    CallDetail,
    OrphanedSession,
    Page,
    RewardListItem,
    SessionDetail,
    SessionSummary,
    Stats,
)
from trainwire.store.reads import calls, rewards, sessions
from trainwire.store.reads import stats as store_stats

router = APIRouter(dependencies=[Depends(admin)])

STATUSES = ("open", "finished", "claimed", "trained", "skipped")
# `has` as the document says it: names of sessions.HAS, comma-separated, blanks allowed.
_HAS_PATTERN = rf"^[ ,]*({'|'.join(sessions.HAS)})?([ ]*,[ ,]*({'|'.join(sessions.HAS)})?)*[ ]*$"
HasQuery = Query(
    None,
    description="Sessions with at least one failed / untrainable call: failed, untrainable "
    "(repeated or comma-separated; each must hold)",
    json_schema_extra={"items": {"type": "string", "pattern": _HAS_PATTERN}},
)
StatusQuery = Query(None, json_schema_extra={"enum": list(STATUSES)})
# What parse_time reads, as the document says it: an RFC 3339 time, or Unix seconds (a decimal number).
_TIME_DOC = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "pattern": r"^-?[0-9]{1,10}(\.[0-9]{1,6})?$"},  # Unix seconds
        {"type": "string", "maxLength": 0},  # empty: no bound (a form's or template's blank field)
    ]
}
SinceQuery = Query(None, description="Sessions that began at or after this time", json_schema_extra=_TIME_DOC)
UntilQuery = Query(None, description="Sessions that began before this time", json_schema_extra=_TIME_DOC)


def parse_time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 (a trailing Z is fine; no offset means UTC) or Unix seconds, as an aware UTC datetime."""
    if value is None or value == "":
        return None
    try:
        try:
            dt = datetime.fromtimestamp(float(value), UTC)
        except ValueError:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        # Inside the try: a time near the calendar's ends in another zone has no UTC datetime.
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise ApiError(
            400,
            f"{name} must be an ISO 8601 time (2025-01-31T12:00:00Z) or Unix seconds between the "
            f"years 1 and 9999; got {value[:40]!r}",
            param=name,
            code="invalid_value",
        ) from None


def parse_has(values: list[str] | None) -> list[str]:
    """`has=failed&has=untrainable` or `has=failed,untrainable`: the names, blanks dropped, checked."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    for name in names:
        if name not in sessions.HAS:
            raise ApiError(
                400,
                f"has must be one of {', '.join(sessions.HAS)} (repeated or comma-separated); got {name[:40]!r}",
                param="has",
                code="invalid_value",
            )
    return names


async def _flush(request: Request, session_id: str) -> None:
    # Read-your-writes: calls this process still holds in its queue are written first (not calls still
    # being served: a dashboard polling a live session must not wait for its stream to end).
    await state_of(request).writer.flush_session(session_id, timeout=5.0, inflight=False)


def _answer(record: BaseModel) -> Response:
    # The store's records dump to Python values (datetimes stay datetimes), rendered like every JSON answer.
    return json_response(record.model_dump())


class WriteQueue(BaseModel):
    """Records this proxy process still holds in its write queue."""

    calls: int
    rewards: int


class Rejected(BaseModel):
    """Rows the database refused as data, kept in this proxy's journal directory (`trainwire replay-rejected`)."""

    rows: int
    files: int
    journal_dir: str


class WritePath(BaseModel):
    """This proxy process's write path: is the database answering, and what is its journal holding."""

    database_down_since: float | None
    journal_appended: int
    replayed: int


class OtlpExport(BaseModel):
    """This proxy process's OpenTelemetry export (`--otlp-endpoint`): spans made, delivered to the collector,
    dropped by reason (queue_full, export_failed) and still pending."""

    spans: int
    exported: int
    dropped: dict[str, int]
    pending: int


class OtlpIngest(BaseModel):
    """This proxy process's `POST /v1/traces`: requests, spans, spans refused, tool spans and failed ones, failed
    tool spans linked to the call that requested the tool or not (by reason), rewards queued."""

    requests: int
    spans: int
    rejected: int
    tool_spans: int
    tool_errors: int
    linked: int
    unlinked: dict[str, int]
    rewards: int


class Admission(BaseModel):
    """Admission control (`--max-backlog`): the training backlog as this process last read it, and its 429s."""

    max_backlog: int
    backlog: int | None
    full: bool
    refused: int


class StatsAnswer(Stats):
    write_queue: WriteQueue
    rejected: Rejected
    write_path: WritePath
    otlp_export: OtlpExport | None = None
    otlp_ingest: OtlpIngest
    admission: Admission


@router.get("/sessions", response_model=Page[SessionSummary], responses=responses(400, 401, 503))
async def list_sessions(
    request: Request,
    status: str | None = StatusQuery,
    task: str | None = None,
    agent: str | None = None,
    since: str | None = SinceQuery,
    until: str | None = UntilQuery,
    has: list[str] | None = HasQuery,
    limit: WireInt = Limit,
    cursor: str | None = Cursor,
    offset: WireInt | None = Offset,
) -> Response:
    if status is not None and status not in STATUSES:
        raise ApiError(
            400,
            f"status must be one of {', '.join(STATUSES)}; got {status[:40]!r}",
            param="status",
            code="invalid_value",
        )
    page = await sessions.list_sessions(
        state_of(request).engine,
        status=status,
        task=task,
        agent=agent,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        has=parse_has(has),
        limit=limit,
        cursor=cursor,
        offset=offset,
    )
    return _answer(page)


@router.get(
    "/sessions/{session_id:twsession}",
    response_model=SessionDetail | OrphanedSession,
    responses=responses(400, 401, 404, 405, 503, s405="GET on /sessions/{id}/reward or /finish (they take POST)"),
)
async def get_session(request: Request, session_id: str, tokens: bool = False) -> Response:
    await _flush(request, session_id)
    found = await sessions.get_session(state_of(request).engine, session_id, tokens=tokens)
    if found is None:
        raise ApiError(
            404,
            f"no session {session_id!r}: no calls and no rewards were recorded for it",
            param="session_id",
            code="session_not_found",
        )
    return _answer(found)


@router.get("/calls/{call_id}", response_model=CallDetail, responses=responses(400, 401, 404, 503))
async def get_call(request: Request, call_id: str, tokens: bool = False) -> Response:
    tw = state_of(request)
    session_id = tw.writer.pending_session_of(call_id)
    if session_id is not None:
        await _flush(request, session_id)
    found = await calls.get_call(tw.engine, call_id, tokens=tokens)
    if found is None:
        raise ApiError(
            404,
            f"no call {call_id!r} (call ids are the X-Call-Id response header)",
            param="call_id",
            code="call_not_found",
        )
    return _answer(found)


@router.get("/rewards", response_model=Page[RewardListItem], responses=responses(400, 401, 503))
async def list_rewards(
    request: Request,
    session_id: str | None = None,
    source: str | None = None,
    final: bool | None = None,
    orphaned: bool | None = None,
    limit: WireInt = Limit,
    cursor: str | None = Cursor,
    offset: WireInt | None = Offset,
) -> Response:
    page = await rewards.list_rewards(
        state_of(request).engine,
        session_id=session_id,
        source=source,
        final=final,
        orphaned=orphaned,
        limit=limit,
        cursor=cursor,
        offset=offset,
    )
    return _answer(page)


@router.get("/stats", response_model=StatsAnswer, responses=responses(400, 401, 503))
async def stats(request: Request) -> Response:
    tw = state_of(request)
    counts = await store_stats.stats(tw.engine)
    journal_dir = tw.settings.journal_dir
    writer = tw.writer
    return _answer(
        StatsAnswer(
            **dict(counts),
            write_queue=WriteQueue(calls=writer.depth, rewards=writer.reward_depth),
            rejected=Rejected(
                rows=count_rejected(journal_dir), files=len(rejected_files(journal_dir)), journal_dir=str(journal_dir)
            ),
            write_path=WritePath(
                database_down_since=writer.database_down_since,
                journal_appended=writer.journal.appended if writer.journal else 0,
                replayed=writer.replayed_total,
            ),
            otlp_export=OtlpExport(**tw.otel.stats()) if tw.otel is not None else None,
            otlp_ingest=OtlpIngest(**dataclasses.asdict(tw.otlp_ingest)),
            admission=Admission(
                max_backlog=tw.admission.max_backlog,
                backlog=tw.admission.backlog if tw.admission.on else await rewarded_backlog(tw.engine),
                full=tw.admission.full,
                refused=tw.admission.refused,
            ),
        )
    )
