"""Alerts (one per incident of a canary), the delivery outbox, and the dispatch cursor.

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
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("canary_id", sa.String(32), nullable=False),
        sa.Column("sandbox", sa.String(200), nullable=False),
        sa.Column("routes", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("opened_us", sa.BigInteger, nullable=False),
        sa.Column("window_ends_us", sa.BigInteger, nullable=False),
        sa.Column("last_hit_us", sa.BigInteger, nullable=False),
        sa.Column("first_hit_seq", sa.BigInteger, nullable=False),
        sa.Column("hit_count", sa.Integer, nullable=False),
        sa.Column("digested_count", sa.Integer, nullable=False),
        sa.Column("next_digest_us", sa.BigInteger, nullable=False),
        sa.Column("sources", sa.Text, nullable=False),
        sa.Column("protocols", sa.Text, nullable=False),
        sa.Column("acked_by", sa.String(200), nullable=True),
        sa.Column("acked_us", sa.BigInteger, nullable=True),
        sa.Column("resolved_us", sa.BigInteger, nullable=True),
        sa.Column("escalated_us", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_alerts_canary_status", "alerts", ["canary_id", "status"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.String(32), nullable=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("route", sa.String(100), nullable=False),
        sa.Column("sink", sa.String(100), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_us", sa.BigInteger, nullable=False),
        sa.Column("lease_until_us", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("sent_us", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_us"])
    cursor = op.create_table(
        "dispatch_cursor",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(cursor, [{"id": 1, "seq": 0}])


def downgrade() -> None:
    op.drop_table("dispatch_cursor")
    op.drop_table("deliveries")
    op.drop_table("alerts")
