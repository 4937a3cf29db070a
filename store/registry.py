"""The canaries table: insert, look up, list (with their hit counts) and retire canary rows."""

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, RowMapping, func, select, update

from store import bursts
from store.schema import canaries, ledger


def insert(connection: Connection, row: Mapping[str, Any]) -> None:
    connection.execute(canaries.insert(), [dict(row)])


def after(connection: Connection, pk: int) -> Sequence[RowMapping]:
    """Rows added after primary key `pk`, oldest first: how a server catches up."""
    query = select(canaries).where(canaries.c.pk > pk).order_by(canaries.c.pk)
    return connection.execute(query).mappings().all()


def by_tokens(connection: Connection, tokens: Iterable[str]) -> Sequence[RowMapping]:
    query = select(canaries).where(canaries.c.token.in_(list(tokens)))
    return connection.execute(query).mappings().all()


def by_id(connection: Connection, canary_id: str) -> RowMapping | None:
    return connection.execute(select(canaries).where(canaries.c.id == canary_id)).mappings().first()


def listing(
    connection: Connection, sandbox: str | None = None, kind: str | None = None
) -> Sequence[RowMapping]:
    query = select(canaries).order_by(canaries.c.pk)
    if sandbox is not None:
        query = query.where(canaries.c.sandbox == sandbox)
    if kind is not None:
        query = query.where(canaries.c.kind == kind)
    return connection.execute(query).mappings().all()


def hit_counts(connection: Connection, canary_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Hits and the last hit's time of each canary in `canary_ids` that has any."""
    if not canary_ids:
        return {}
    of_these = (ledger.c.type == "hit", ledger.c.canary_id.in_(list(canary_ids)))
    query = (
        select(ledger.c.canary_id, func.count(), func.max(ledger.c.time_us))
        .where(*of_these)
        .group_by(ledger.c.canary_id)
    )
    counts = {row[0]: [int(row[1]), int(row[2])] for row in connection.execute(query)}
    # An aggregate row counts the hits it accounts for; there are few of them (a handful a
    # second per canary in a burst), so they are read and added up here.
    aggregates = select(ledger.c.canary_id, ledger.c.data).where(
        *of_these, ledger.c.data.contains(bursts.MARKER, autoescape=True)
    )
    for canary_id, data in connection.execute(aggregates):
        counts[canary_id][0] += bursts.hits_in(json.loads(data)) - 1
    return {canary_id: (hits, last) for canary_id, (hits, last) in counts.items()}


def retire(connection: Connection, canary_id: str, when_us: int) -> tuple[RowMapping, bool] | None:
    """Mark a canary retired (it still matches and pages), once.

    Returns its row and whether it was retired already, or None if there is none.
    """
    changed = connection.execute(
        update(canaries)
        .where(canaries.c.id == canary_id, canaries.c.retired_us.is_(None))
        .values(retired_us=when_us)
    ).rowcount
    row = by_id(connection, canary_id)
    return None if row is None else (row, changed == 0)
