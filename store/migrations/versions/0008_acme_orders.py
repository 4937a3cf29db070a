"""ACME: the certificate every node serves, and the one order in progress for all of them.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acme_orders",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("pem", sa.LargeBinary, nullable=True),
        sa.Column("issued_us", sa.BigInteger, nullable=True),
        sa.Column("holder", sa.String(128), nullable=True),
        sa.Column("held_until_us", sa.BigInteger, nullable=True),
        sa.Column("challenges", sa.Text, nullable=True),
        sa.Column("renew_asked_us", sa.BigInteger, nullable=True),
        sa.Column("failed_us", sa.BigInteger, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("acme_orders")
