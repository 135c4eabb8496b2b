"""calls.base_call_id, calls.prompt_prefix_len, calls.messages_prefix_len

A call of a long session may be stored as what it adds to an earlier call of the same session: the prompt token
ids after the first `prompt_prefix_len` tokens of the base call's prompt + completion, and the request's
messages after the base request's first `messages_prefix_len` (store/call_deltas.py). Rows stored before this
revision keep all three NULL and read as they are.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("base_call_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("prompt_prefix_len", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("messages_prefix_len", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("messages_prefix_len")
        batch.drop_column("prompt_prefix_len")
        batch.drop_column("base_call_id")
