"""Apps converge across agents: each app's revision, and the tombstones of
deleted apps (``scs.app_sync``).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("app") as batch:
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "app_tombstone",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("deleted_at", sa.Float, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("app_tombstone")
    with op.batch_alter_table("app") as batch:
        batch.drop_column("revision")
