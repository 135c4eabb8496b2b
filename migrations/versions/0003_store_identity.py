"""store_info: the store's identity

A key-value table of facts about the store itself. Its first row, ``store_id``, is a random id made once at
upgrade, so a trainer can tell whose checkpoints a checkpoint directory holds (rl/identity.py): the run of this
database, or of another one that happens to be reachable under the same path.

Revision ID: 0003
Revises: 0002
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "store_info",
        sa.Column("key", sa.String(length=64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.bulk_insert(table, [{"key": "store_id", "value": uuid.uuid4().hex}])


def downgrade() -> None:
    op.drop_table("store_info")
