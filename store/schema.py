"""Tables: canaries, the append-only ledger, and the ledger's head pointer.

Times are integer microseconds since the Unix epoch (UTC). An integer encodes
the same way in every database and in the row hash, where a DATETIME would
not (SQLite keeps text, PostgreSQL a timestamp with its own precision).
"""

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

canaries = Table(
    "canaries",
    metadata,
    # An increasing key lets a running server pick up canaries minted by other processes.
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("token", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("value", Text, nullable=False),
    Column("sandbox", String(200), nullable=False),
    Column("location", Text, nullable=False, default=""),
    Column("labels", Text, nullable=False, default="{}"),
    Column("severity", String(16), nullable=False, default="high"),
    Column("note", Text, nullable=False, default=""),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=True),
    Column("retired_us", BigInteger, nullable=True),
    Column("format", String(32), nullable=False, default=""),
    Column("path_hint", Text, nullable=False, default=""),
    Column("files", Text, nullable=False, default="{}"),
)

ledger = Table(
    "ledger",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time_us", BigInteger, nullable=False),
    Column("type", String(32), nullable=False),
    Column("canary_id", String(32), nullable=True),
    Column("sandbox", String(200), nullable=True),
    Column("protocol", String(16), nullable=True),
    Column("source", String(64), nullable=True),
    Column("node", String(64), nullable=False),
    Column("data", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_ledger_sandbox_time", "sandbox", "time_us"),
    Index("ix_ledger_sandbox_seq", "sandbox", "seq"),
    Index("ix_ledger_canary_time", "canary_id", "time_us"),
    Index("ix_ledger_time", "time_us"),
)

# One row (id = 1). Appending writers lock it first, which serialises them
# across processes and nodes, then read and advance it with their rows.
ledger_head = Table(
    "ledger_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# One row per incident: the first hit of a canary opens it; hits inside its
# window fold into it. Mutable, unlike the ledger: every change to it is also
# a ledger event.
alerts = Table(
    "alerts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("canary_id", String(32), nullable=False),
    Column("sandbox", String(200), nullable=False),
    Column("routes", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("opened_us", BigInteger, nullable=False),
    Column("window_ends_us", BigInteger, nullable=False),
    Column("last_hit_us", BigInteger, nullable=False),
    Column("first_hit_seq", BigInteger, nullable=False),
    Column("hit_count", Integer, nullable=False),
    Column("digested_count", Integer, nullable=False),
    Column("next_digest_us", BigInteger, nullable=False),
    Column("sources", Text, nullable=False),
    Column("protocols", Text, nullable=False),
    Column("acked_by", String(200), nullable=True),
    Column("acked_us", BigInteger, nullable=True),
    Column("resolved_us", BigInteger, nullable=True),
    Column("escalated_us", BigInteger, nullable=True),
    Index("ix_alerts_canary_status", "canary_id", "status"),
)

# The outbox: a delivery is written in the same transaction that decides it,
# then worked by the sender until it is sent or given up.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", String(32), nullable=True),
    Column("purpose", String(16), nullable=False),
    Column("route", String(100), nullable=False),
    Column("sink", String(100), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_us", BigInteger, nullable=False),
    Column("lease_until_us", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("created_us", BigInteger, nullable=False),
    Column("sent_us", BigInteger, nullable=True),
    Index("ix_deliveries_due", "status", "next_attempt_us"),
)

# How far into the ledger the alert dispatcher has read (one row, id = 1).
dispatch_cursor = Table(
    "dispatch_cursor",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
)

# Admin API tokens; only a hash of the secret part is kept.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("revoked_us", BigInteger, nullable=True),
)

# Random secrets every node sharing this store must agree on (the token key),
# created by whichever node needs one first.
deployment_secrets = Table(
    "deployment_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)


# The ACME certificate of the deployment (one row), and the order one node holds for all.
acme_orders = Table(
    "acme_orders",
    metadata,
    Column("name", String(32), primary_key=True),
    # Key and chain as PEM, as the last order that succeeded got them.
    Column("pem", LargeBinary, nullable=True),
    Column("issued_us", BigInteger, nullable=True),
    # The node ordering now, until when; the DNS-01 answers (JSON) every node serves meanwhile.
    Column("holder", String(128), nullable=True),
    Column("held_until_us", BigInteger, nullable=True),
    Column("challenges", Text, nullable=True),
    Column("renew_asked_us", BigInteger, nullable=True),
    Column("failed_us", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
)

spool_replays = Table(
    "spool_replays",
    metadata,
    # A node's spooled event ("<spool epoch>:<number>") and the ledger row it became: the
    # replay that appends it writes this in the same transaction, so it is appended once.
    Column("key", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

# Web console sign-ins: a session cookie's hash, the API token it acts as, its CSRF secret.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("token_id", String(32), nullable=False, index=True),
    Column("csrf", String(64), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False, index=True),
)

# One-time console sign-in links (`oobwatch token login-link`): a code's hash, for one token.
login_links = Table(
    "login_links",
    metadata,
    Column("code_sha256", String(64), primary_key=True),
    Column("token_id", String(32), nullable=False),
    Column("expires_us", BigInteger, nullable=False),
)

# Integrity checks as they ran: each verify (intact or not) and each anchor saved, by node.
ledger_checks = Table(
    "ledger_checks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("node", String(128), nullable=False),
    Column("time_us", BigInteger, nullable=False, index=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("problem", Text, nullable=True),
)
