"""Canaries remember what was planted: credential format, usual path, and every file.

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
    with op.batch_alter_table("canaries") as batch:
        batch.add_column(sa.Column("format", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("path_hint", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("files", sa.Text, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("canaries") as batch:
        batch.drop_column("files")
        batch.drop_column("path_hint")
        batch.drop_column("format")
