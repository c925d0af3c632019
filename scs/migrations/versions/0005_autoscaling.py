"""Queue-depth autoscaling: one policy per app (DESIGN §9.5).

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
    op.create_table(
        "autoscaling_policy",
        sa.Column("app_id", sa.Integer, sa.ForeignKey("app.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("min_instances", sa.Integer, nullable=False),
        sa.Column("max_instances", sa.Integer, nullable=False),
        sa.Column("messages_per_instance", sa.Integer, nullable=False),
        sa.Column("scale_down_after", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("autoscaling_policy")
