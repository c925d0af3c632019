"""Autoscaling policies converge across agents like apps: each policy's
revision, and the tombstones of deleted policies (``scs.app_sync``).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("autoscaling_policy") as batch:
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "autoscaling_tombstone",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("deleted_at", sa.Float, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("autoscaling_tombstone")
    with op.batch_alter_table("autoscaling_policy") as batch:
        batch.drop_column("revision")
