"""Failover and drain: the replica of every peer's instances, the agent an
instance was moved from, and this agent's persistent settings.

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
    with op.batch_alter_table("node") as batch:
        batch.add_column(sa.Column("moved_from", sa.String(64), nullable=True))
    op.create_table(
        "replica_owner",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("synced_at", sa.Float, nullable=False, server_default="0"),
    )
    op.create_table(
        "replica_instance",
        sa.Column("owner", sa.String(64), sa.ForeignKey("replica_owner.owner", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("document", sa.Text, nullable=False),
    )
    op.create_table(
        "agent_setting",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_setting")
    op.drop_table("replica_instance")
    op.drop_table("replica_owner")
    with op.batch_alter_table("node") as batch:
        batch.drop_column("moved_from")
