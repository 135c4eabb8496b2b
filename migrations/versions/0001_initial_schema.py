"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24 15:35:10.065714
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=128), nullable=True),
        sa.Column("agent_name", sa.String(length=128), nullable=True),
        sa.Column("trainable", sa.Boolean(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=256), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("model_requested", sa.String(length=256), nullable=True),
        sa.Column("model_served", sa.String(length=256), nullable=True),
        sa.Column("route", sa.String(length=16), nullable=False),
        sa.Column("upstream", sa.String(length=512), nullable=True),
        sa.Column("policy_version", sa.Integer(), nullable=True),
        sa.Column(
            "request", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column(
            "response", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column(
            "prompt_token_ids", sa.JSON().with_variant(postgresql.ARRAY(sa.Integer()), "postgresql"), nullable=True
        ),
        sa.Column(
            "completion_token_ids", sa.JSON().with_variant(postgresql.ARRAY(sa.Integer()), "postgresql"), nullable=True
        ),
        sa.Column(
            "logprobs", sa.JSON().with_variant(postgresql.ARRAY(sa.Float(precision=24)), "postgresql"), nullable=True
        ),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column(
            "usage", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("aborted", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("upstream_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("overhead_ms", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index("ix_calls_agent", ["agent_name"], unique=False)
        batch_op.create_index("ix_calls_session_order", ["session_id", "started_at", "seq"], unique=False)
        batch_op.create_index("ix_calls_started_at", ["started_at"], unique=False)

    op.create_table(
        "policy_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("served_model", sa.String(length=256), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("train_step", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "rewards",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("call_id", sa.String(length=128), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column(
            "metadata", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("rewards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rewards_call_id"), ["call_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rewards_session_id"), ["session_id"], unique=False)
        batch_op.create_index(
            "uq_rewards_one_final",
            ["session_id"],
            unique=True,
            postgresql_where=sa.text("final"),
            sqlite_where=sa.text("final = 1"),
        )

    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("task_id", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("n_calls", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_call_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_call_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("final_reward", sa.Float(), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("train_step", sa.Integer(), nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index("ix_sessions_claimable", ["status", "finished_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_last_call_at"), ["last_call_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_task_id"), ["task_id"], unique=False)

    op.create_table(
        "train_steps",
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=True),
        sa.Column("n_sessions", sa.Integer(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column(
            "metrics", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("step"),
    )
    op.create_table(
        "upstream_versions",
        sa.Column("upstream", sa.String(length=512), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("served_model", sa.String(length=256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("upstream"),
    )


def downgrade() -> None:
    op.drop_table("upstream_versions")
    op.drop_table("train_steps")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_task_id"))
        batch_op.drop_index(batch_op.f("ix_sessions_last_call_at"))
        batch_op.drop_index("ix_sessions_claimable")

    op.drop_table("sessions")
    with op.batch_alter_table("rewards", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_rewards_one_final", postgresql_where=sa.text("final"), sqlite_where=sa.text("final = 1")
        )
        batch_op.drop_index(batch_op.f("ix_rewards_session_id"))
        batch_op.drop_index(batch_op.f("ix_rewards_call_id"))

    op.drop_table("rewards")
    op.drop_table("policy_versions")
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_index("ix_calls_started_at")
        batch_op.drop_index("ix_calls_session_order")
        batch_op.drop_index("ix_calls_agent")

    op.drop_table("calls")
