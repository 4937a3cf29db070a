"""The record of integrity checks: every verify and every anchor, by node, as they ran.

Shown by the console's ledger page and overview ("last verify", "last
anchor"); the chain itself is not touched, so checking it does not grow it.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, insert, select

from store.schema import ledger_checks

Kind = Literal["verify", "anchor"]
# Rows kept per kind: an hourly check over months, and the listing stays short.
KEEP = 1000


@dataclass(frozen=True, slots=True)
class Check:
    kind: str
    node: str
    time_us: int
    seq: int
    hash: str
    problem: str | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> "Check":
        return cls(
            row["kind"], row["node"], row["time_us"], row["seq"], row["hash"], row["problem"]
        )


def record(
    connection: Connection,
    kind: Kind,
    node: str,
    time_us: int,
    seq: int,
    digest: str,
    problem: str | None = None,
) -> None:
    connection.execute(
        insert(ledger_checks).values(
            kind=kind, node=node, time_us=time_us, seq=seq, hash=digest, problem=problem
        )
    )
    oldest_kept = (
        select(ledger_checks.c.id)
        .where(ledger_checks.c.kind == kind)
        .order_by(ledger_checks.c.id.desc())
        .offset(KEEP)
        .limit(1)
    )
    cut = connection.execute(oldest_kept).scalar()
    if cut is not None:
        connection.execute(
            ledger_checks.delete().where(ledger_checks.c.kind == kind, ledger_checks.c.id <= cut)
        )


def recent(connection: Connection, kind: Kind, limit: int = 50) -> list[Check]:
    """The newest checks of a kind, newest first."""
    rows = connection.execute(
        select(ledger_checks)
        .where(ledger_checks.c.kind == kind)
        .order_by(ledger_checks.c.id.desc())
        .limit(limit)
    ).mappings()
    return [Check.from_row(row) for row in rows]
