"""Typed records that cross layers: the proxy makes them, the store writes them.

They sit at the bottom layer, beside the settings, so the proxy and the store can share them without importing
each other's modules; `token_problem` and `text_problem` are checks both sides make. Field names are the store's
column names (tests/unit/test_records.py holds them to it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass(slots=True)
class CallRecord:
    """One LLM call as the agent made it and as the upstream answered it: one row of `calls`."""

    id: str
    session_id: str
    seq: int
    kind: str  # chat | completion | responses | messages | other
    path: str
    status_code: int
    started_at: datetime
    finished_at: datetime
    task_id: str | None = None
    agent_name: str | None = None
    trainable: bool = True
    stream: bool = False
    model_requested: str | None = None
    model_served: str | None = None
    route: str = "policy"  # policy | frozen | passthrough
    upstream: str | None = None
    policy_version: int | None = None
    request: Any = None
    response: Any = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    aborted: bool = False
    upstream_ms: float | None = None
    ttft_ms: float | None = None
    overhead_ms: float | None = None
    sampling: dict[str, Any] | None = None  # {"requested", "effective"[, "enforced"]} (proxy/sampling.py)
    untrainable_reason: str | None = None  # why its tokens must not be trained on, though it is trainable
    # The W3C trace context the agent sent (`traceparent`): OTLP spans the agent exports later are matched to the
    # session by it (proxy/otlp_ingest.py), and the exported span is a child of the agent's (proxy/otel_export.py).
    trace_id: str | None = None  # 32 lower-case hex digits
    parent_span_id: str | None = None  # 16 lower-case hex digits
    # Set only by the store's write path on the copy it writes (store/call_deltas.py); the proxy leaves them
    # None, and every reader gets records with the full values.
    base_call_id: str | None = None
    prompt_prefix_len: int | None = None
    messages_prefix_len: int | None = None


@dataclass(slots=True)
class RewardRecord:
    """A reward the proxy itself queues (automatic intermediate rewards): one row of `rewards`. Its idempotency
    key is deterministic, so writing it twice stores it once."""

    session_id: str
    value: float | None
    final: bool
    source: str
    idempotency_key: str
    created_at: datetime
    call_id: str | None = None
    metadata: dict[str, Any] | None = None


def token_problem(
    prompt_ids: list[int] | None,
    completion_ids: list[int] | None,
    logprobs: list[float] | None,
    usage: dict[str, Any] | None,
    aborted: bool = False,
) -> str | None:
    """Why a call's recorded tokens cannot be trusted for training, or None. The upstream's own `usage` counts
    and the logprobs must agree with the token ids; an aborted stream stops before its usage is sent."""
    if not prompt_ids or not completion_ids:
        return None  # nothing to train on anyway (the trainer counts it as skipped_no_tokens)
    if logprobs is not None and len(logprobs) != len(completion_ids):
        return f"tokens: {len(logprobs)} logprobs for {len(completion_ids)} completion tokens"
    if not usage or aborted:
        return None
    for name, ids in (("prompt_tokens", prompt_ids), ("completion_tokens", completion_ids)):
        counted = usage.get(name)
        if isinstance(counted, int) and counted != len(ids):
            return (
                f"tokens: {len(ids)} recorded {name.split('_')[0]} token ids, but the upstream's usage says {counted}"
            )
    return None


def text_problem(value: str) -> str | None:
    """Why a text value cannot go to the database, or None: Postgres refuses the NUL character in text and jsonb,
    and neither driver can encode a lone surrogate (JSON escapes such as \\ud800 decode to one). The one check
    of its meaning: the proxy's parameters, reward bodies and the store's cursors and ids all ask it."""
    if "\x00" in value:
        return "must not contain the NUL character (U+0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain a lone surrogate (it is not valid Unicode)"
    return None


CALL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CallRecord))
REWARD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RewardRecord))


def as_row(record: CallRecord | RewardRecord) -> dict[str, Any]:
    """A shallow dict of a record (no deep copy, unlike dataclasses.asdict): what SQLAlchemy executes with."""
    names = CALL_FIELDS if isinstance(record, CallRecord) else REWARD_FIELDS
    return {name: getattr(record, name) for name in names}
