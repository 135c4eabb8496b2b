"""calls.trace_id, calls.parent_span_id

The W3C `traceparent` an agent sent with a call: its trace id links the OTLP spans the agent later posts to
`/v1/traces` (its tool spans) to the call's session, and its parent span id makes the span trainwire exports a
child of the agent's. Indexed by trace id, the ingest's lookup. Older rows keep both NULL.

Revision ID: 0006_call_trace
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_call_trace"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("parent_span_id", sa.String(length=16), nullable=True))
    op.create_index("ix_calls_trace_id", "calls", ["trace_id"])


def downgrade() -> None:
    op.drop_index("ix_calls_trace_id", table_name="calls")
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("parent_span_id")
        batch.drop_column("trace_id")
