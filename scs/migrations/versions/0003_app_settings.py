"""App settings for their workers: ``env``, ``workdir``, ``python`` and
``task_events``.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("app") as batch:
        batch.add_column(sa.Column("env", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("workdir", sa.String(4096), nullable=True))
        batch.add_column(sa.Column("python", sa.String(4096), nullable=True))
        batch.add_column(sa.Column("task_events", sa.Boolean, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("app") as batch:
        batch.drop_column("task_events")
        batch.drop_column("python")
        batch.drop_column("workdir")
        batch.drop_column("env")
