"""The store's tables. The proxy writes calls and rewards; the trainer reads them and writes its steps and
the policy versions it published; the proxy reads the versions back to route and stamp requests."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Postgres keeps token ids as int4[] and logprobs as float4[] (4 bytes a value, no JSON parsing on read);
# SQLite has no arrays, so there they are JSON lists.
IntArray = JSON().with_variant(ARRAY(Integer), "postgresql")
FloatArray = JSON().with_variant(ARRAY(Float(precision=24)), "postgresql")
Json = JSON().with_variant(JSONB(), "postgresql")
Id = String(128)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Session(Base):
    """One episode. Created by the write path with its first call; its status moves
    open -> claimed -> trained | skipped, driven by the trainer. A trained or skipped session may later be
    pruned: its calls' bodies dropped, `pruned_at` set."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    task_id: Mapped[str | None] = mapped_column(Id, index=True)
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    n_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    first_call_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_call_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    final_reward: Mapped[float | None] = mapped_column(Float)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    train_step: Mapped[int | None] = mapped_column(Integer)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    # When `trainwire prune` dropped the bodies of its calls (store/retention.py, migration 0005); NULL: never.
    pruned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The trainer's claim query: finished, unclaimed sessions, oldest first.
        Index("ix_sessions_claimable", "status", "finished_at"),
    )


class Call(Base):
    """One LLM call as the agent made it and as the upstream answered it."""

    __tablename__ = "calls"
    id: Mapped[str] = mapped_column(Id, primary_key=True)
    session_id: Mapped[str] = mapped_column(Id)
    seq: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(Id)
    agent_name: Mapped[str | None] = mapped_column(String(128))
    trainable: Mapped[bool] = mapped_column(Boolean, default=True)
    kind: Mapped[str] = mapped_column(String(16))  # chat | completion | responses | messages | other
    path: Mapped[str] = mapped_column(String(256))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    model_requested: Mapped[str | None] = mapped_column(String(256))
    model_served: Mapped[str | None] = mapped_column(String(256))
    route: Mapped[str] = mapped_column(String(16), default="policy")  # policy | frozen | passthrough
    upstream: Mapped[str | None] = mapped_column(String(512))
    policy_version: Mapped[int | None] = mapped_column(Integer)
    request: Mapped[dict | None] = mapped_column(Json)
    response: Mapped[dict | None] = mapped_column(Json)
    prompt_token_ids: Mapped[list | None] = mapped_column(IntArray)
    completion_token_ids: Mapped[list | None] = mapped_column(IntArray)
    logprobs: Mapped[list | None] = mapped_column(FloatArray)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    usage: Mapped[dict | None] = mapped_column(Json)
    status_code: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    aborted: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    upstream_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    overhead_ms: Mapped[float | None] = mapped_column(Float)
    sampling: Mapped[dict | None] = mapped_column(Json)
    untrainable_reason: Mapped[str | None] = mapped_column(Text)
    # The agent's W3C trace context (migration 0006): OTLP spans posted to /v1/traces find their session by it.
    trace_id: Mapped[str | None] = mapped_column(String(32))
    parent_span_id: Mapped[str | None] = mapped_column(String(16))
    # A call stored as what it adds to its session (migration 0004, store/call_deltas.py): `base_call_id` is an
    # earlier call of the same session; with `prompt_prefix_len` L the stored prompt_token_ids are the tokens
    # after the first L of the base's full prompt + completion; with `messages_prefix_len` M the request's
    # message list (`messages`, or a Responses `input` list) holds only the messages after the base's first M.
    # All NULL: the row is stored whole. Readers always see the full values.
    base_call_id: Mapped[str | None] = mapped_column(Id)
    prompt_prefix_len: Mapped[int | None] = mapped_column(Integer)
    messages_prefix_len: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_calls_session_order", "session_id", "started_at", "seq"),
        Index("ix_calls_started_at", "started_at"),
        Index("ix_calls_agent", "agent_name"),
        Index("ix_calls_trace_id", "trace_id"),
    )


class Reward(Base):
    """A reward, posted by the user (`source='user'`) or by an automatic rule (`source=<rule name>`).
    `final` rewards close the episode; `value` is null for a close without a reward (/finish)."""

    __tablename__ = "rewards"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(Id, index=True)
    call_id: Mapped[str | None] = mapped_column(Id, index=True)
    value: Mapped[float | None] = mapped_column(Float)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[str] = mapped_column(String(64), default="user")
    idempotency_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    meta: Mapped[dict | None] = mapped_column("metadata", Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        # At most one final reward per session, enforced by the database even under concurrent posts.
        Index(
            "uq_rewards_one_final",
            "session_id",
            unique=True,
            postgresql_where=text("final"),
            sqlite_where=text("final = 1"),
        ),
    )


class PolicyVersion(Base):
    """A set of weights the trainer published. Version 0 is the base model and has no row."""

    __tablename__ = "policy_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))  # lora | full
    served_model: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(Text)
    train_step: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="published")  # published | partial
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UpstreamVersion(Base):
    """What each vLLM upstream serves now. The proxy routes and stamps X-Policy-Version from this, so a
    publish that reached only some replicas is visible instead of silently mixed."""

    __tablename__ = "upstream_versions"
    upstream: Mapped[str] = mapped_column(String(512), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    served_model: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainStep(Base):
    """One optimizer step of the trainer with its metrics (loss, rewards, timings...)."""

    __tablename__ = "train_steps"
    step: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    policy_version: Mapped[int | None] = mapped_column(Integer)
    n_sessions: Mapped[int] = mapped_column(Integer)
    n_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StoreInfo(Base):
    """Facts about the store itself, one row a key. ``store_id``: a random id made when the table was created
    (migration 0003), which the trainer records beside its checkpoints (store/identity.py)."""

    __tablename__ = "store_info"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


__all__ = ["Base", "Session", "Call", "Reward", "PolicyVersion", "UpstreamVersion", "TrainStep", "StoreInfo", "utcnow"]
