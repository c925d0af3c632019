"""The first schema: brokers, apps, nodes, queues and consumptions.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("url", sa.String(1024), nullable=False, unique=True),
    )
    op.create_table(
        "app",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("broker_id", sa.Integer, sa.ForeignKey("broker.id"), nullable=False),
        sa.Column("celery_app", sa.String(255), nullable=True),
    )
    op.create_table(
        "node",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("app.id", ondelete="CASCADE"), nullable=False),
        sa.Column("broker_id", sa.Integer, sa.ForeignKey("broker.id"), nullable=True),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("min_concurrency", sa.Integer, nullable=False),
        sa.Column("is_enabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "queue",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("app.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("exchange", sa.String(200), nullable=False),
        sa.Column("routing_key", sa.String(200), nullable=False),
        sa.Column("exchange_type", sa.String(32), nullable=True),
        sa.Column("options", sa.Text, nullable=True),
        sa.UniqueConstraint("app_id", "name"),
    )
    op.create_table(
        "consumption",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.Integer, sa.ForeignKey("node.id", ondelete="CASCADE"), nullable=False),
        sa.Column("queue_name", sa.String(200), nullable=False),
        sa.Column("exchange", sa.String(200), nullable=False),
        sa.Column("routing_key", sa.String(200), nullable=False),
        sa.Column("exchange_type", sa.String(32), nullable=True),
        sa.Column("options", sa.Text, nullable=True),
        sa.UniqueConstraint("node_id", "queue_name"),
    )


def downgrade() -> None:
    for table in ("consumption", "queue", "node", "app", "broker"):
        op.drop_table(table)
