"""Opening the store: a SQLAlchemy engine tuned per backend, at the newest schema.

`open_store` reads the schema's revision (one small query) and runs the
migrations, which means loading alembic, only when it is behind.
"""

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

MIGRATIONS = Path(__file__).parent / "migrations"
# WAL pages past which a commit checkpoints, when a thread of its own does the rest (64 MB).
OWN_CHECKPOINT_PAGES = 16384
# The newest migration in migrations/versions; a test checks they agree.
HEAD_REVISION = "0011"
# How long a node waits for SQLite's lock before its writer spools instead.
NODE_BUSY_MS = 500
_PG_TIMEOUTS = {"connect_timeout": 3, "tcp_user_timeout": 5000}


def open_engine(url: str, own_checkpoints: bool = False) -> Engine:
    """An engine for `url`; SQLite gets WAL, NORMAL sync and a busy timeout.

    With `own_checkpoints` (a node, whose writer spools what the store does
    not take in time), commits of this engine leave the WAL to a `checkpoint`
    run from a thread of its own (once a second), and checkpoint it themselves
    only past OWN_CHECKPOINT_PAGES; and a lock held by another process is
    waited for NODE_BUSY_MS at most.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A server that is away or cut off must fail a connection or a query within seconds
        # (libpq's defaults wait for the kernel: minutes), so a node spools instead.
        options = {name: value for name, value in _PG_TIMEOUTS.items() if name not in parsed.query}
        return create_engine(url, pool_pre_ping=True, connect_args=options)
    busy_ms = NODE_BUSY_MS if own_checkpoints else 30000
    engine = create_engine(url, connect_args={"timeout": busy_ms / 1000})

    @event.listens_for(engine, "connect")
    def _tune(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets timeline readers run while listeners append; NORMAL keeps
        # commits durable across a process crash without an fsync per commit.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        if own_checkpoints:
            # SQLite runs an automatic checkpoint inside the commit that fills the WAL past
            # 1,000 pages, fsync included: 5-7 ms that every hit queued behind it waits. A
            # checkpoint beside the appends copies the pages but, with appends going on,
            # never catches up, and only one that does lets the WAL start over: commits
            # still checkpoint, rarely, so the WAL stays bounded.
            cursor.execute(f"PRAGMA wal_autocheckpoint={OWN_CHECKPOINT_PAGES}")
        cursor.close()

    return engine


def open_store(url: str, own_checkpoints: bool = False) -> Engine:
    """An engine for `url` whose schema is at the newest revision."""
    engine = open_engine(url, own_checkpoints)
    if revision(engine) != HEAD_REVISION:
        migrate(engine)
    return engine


def checkpoint(engine: Engine) -> None:
    """Copy SQLite's WAL back into the database as far as readers allow (a passive
    checkpoint waits for nobody). Nothing to do on other databases."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def revision(engine: Engine) -> str | None:
    """The schema revision alembic recorded, or None for a store never migrated."""
    try:
        with engine.connect() as connection:
            found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None
    return None if found is None else str(found)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
