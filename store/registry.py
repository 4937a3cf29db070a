"""The canaries table: insert, look up and list canary rows."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, RowMapping, select, update

from store.schema import canaries


def insert(connection: Connection, row: Mapping[str, Any]) -> None:
    connection.execute(canaries.insert(), [dict(row)])


def after(connection: Connection, pk: int) -> Sequence[RowMapping]:
    """Rows added after primary key `pk`, oldest first: how a server catches up."""
    query = select(canaries).where(canaries.c.pk > pk).order_by(canaries.c.pk)
    return connection.execute(query).mappings().all()


def by_tokens(connection: Connection, tokens: Iterable[str]) -> Sequence[RowMapping]:
    query = select(canaries).where(canaries.c.token.in_(list(tokens)))
    return connection.execute(query).mappings().all()


def listing(connection: Connection, sandbox: str | None = None) -> Sequence[RowMapping]:
    query = select(canaries).order_by(canaries.c.pk)
    if sandbox is not None:
        query = query.where(canaries.c.sandbox == sandbox)
    return connection.execute(query).mappings().all()


def retire(connection: Connection, canary_id: str, when_us: int) -> RowMapping | None:
    """Mark a canary retired (it still matches and pages); its row, or None if there is none."""
    connection.execute(
        update(canaries).where(canaries.c.id == canary_id).values(retired_us=when_us)
    )
    return connection.execute(select(canaries).where(canaries.c.id == canary_id)).mappings().first()
