"""Timeline queries: ledger entries for a sandbox or canary over a time range, oldest first."""

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, select

from store.ledger import Entry
from store.schema import ledger


@dataclass(frozen=True, slots=True)
class TimelineQuery:
    """Which entries a responder asked for; None means no filter."""

    sandbox: str | None = None
    canary_id: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    types: Iterable[str] | None = None
    exclude_sandbox: str | None = None


def timeline(connection: Connection, query: TimelineQuery) -> list[Entry]:
    statement = select(ledger).order_by(ledger.c.time_us, ledger.c.seq)
    if query.sandbox is not None:
        statement = statement.where(ledger.c.sandbox == query.sandbox)
    if query.canary_id is not None:
        statement = statement.where(ledger.c.canary_id == query.canary_id)
    if query.since_us is not None:
        statement = statement.where(ledger.c.time_us >= query.since_us)
    if query.until_us is not None:
        statement = statement.where(ledger.c.time_us < query.until_us)
    if query.exclude_sandbox is not None:
        statement = statement.where(
            (ledger.c.sandbox.is_(None)) | (ledger.c.sandbox != query.exclude_sandbox)
        )
    if query.types is not None:
        statement = statement.where(ledger.c.type.in_(list(query.types)))
    return [Entry(**row._mapping) for row in connection.execute(statement)]
