"""Extra ``celery worker`` arguments on apps and instances.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("app") as batch:
        batch.add_column(sa.Column("arguments", sa.Text, nullable=False, server_default="[]"))
    with op.batch_alter_table("node") as batch:
        batch.add_column(sa.Column("arguments", sa.Text, nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("node") as batch:
        batch.drop_column("arguments")
    with op.batch_alter_table("app") as batch:
        batch.drop_column("arguments")
