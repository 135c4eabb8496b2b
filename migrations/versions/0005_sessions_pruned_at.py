"""sessions.pruned_at

`trainwire prune` drops the bodies of old trained or skipped sessions (store/retention.py): their calls keep
every column but request, response, prompt and completion token ids and logprobs, which become NULL. The
session's `pruned_at` says when, so a reader can tell a pruned session from one recorded without bodies.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("pruned_at")
