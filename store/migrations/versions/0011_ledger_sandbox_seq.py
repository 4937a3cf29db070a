"""An index on each sandbox's ledger rows by seq: a live view's poll for one sandbox's rows
after a seq reads only those rows.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ledger_sandbox_seq", "ledger", ["sandbox", "seq"])


def downgrade() -> None:
    op.drop_index("ix_ledger_sandbox_seq", "ledger")
