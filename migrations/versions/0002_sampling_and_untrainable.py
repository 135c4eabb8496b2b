"""calls.sampling and calls.untrainable_reason

Every call's effective sampling settings, and why a call that is trainable will still not be trained on
(sampling the trainer cannot reproduce, token ids that disagree with the upstream's usage).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.add_column(
            sa.Column(
                "sampling", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
            )
        )
        batch.add_column(sa.Column("untrainable_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("untrainable_reason")
        batch.drop_column("sampling")
