"""The ACME state every node on a store shares: the certificate, and the one order in progress.

One node orders at a time: it claims the order (a lease in the store, taken
over only once it has expired), publishes the DNS-01 answers for every node's
DNS listener to serve, and on success stores the key and chain for every node
to load. A failure is kept, with its error, so no node retries at once.
"""

import contextlib
import json
from dataclasses import dataclass

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from store.schema import acme_orders

_ROW = "acme"


@dataclass(frozen=True, slots=True)
class OrderState:
    """The shared row: what was issued, who orders now, and how the last attempt ended."""

    pem: bytes | None
    issued_us: int | None
    holder: str | None
    held_until_us: int | None
    challenges: tuple[str, ...]
    renew_asked_us: int | None
    failed_us: int | None
    error: str | None

    def pending(self, now: int) -> tuple[str, ...]:
        """The DNS-01 answers to serve now: only while an unexpired order holds them."""
        if self.holder is None or (self.held_until_us or 0) <= now:
            return ()
        return self.challenges


def state(engine: Engine) -> OrderState:
    with engine.connect() as connection:
        row = connection.execute(select(acme_orders).where(acme_orders.c.name == _ROW)).first()
    if row is None:
        return OrderState(None, None, None, None, (), None, None, None)
    return OrderState(
        row.pem,
        row.issued_us,
        row.holder,
        row.held_until_us,
        tuple(json.loads(row.challenges)) if row.challenges else (),
        row.renew_asked_us,
        row.failed_us,
        row.error,
    )


def claim(engine: Engine, node: str, now: int, lease_us: int, seen: bytes | None) -> bool:
    """Take the order for `node` until `now + lease_us`, unless another node holds it, or the
    certificate is no longer `seen`, the one the claimer found due: an order another node
    finished since it looked is not ordered again.

    A renewal asked for is taken with it: whatever the order's outcome, it was answered.
    """
    _ensure_row(engine)
    with engine.begin() as connection:
        taken = connection.execute(
            update(acme_orders)
            .where(acme_orders.c.name == _ROW)
            .where(acme_orders.c.pem.is_(None) if seen is None else acme_orders.c.pem == seen)
            .where(
                or_(
                    acme_orders.c.holder.is_(None),
                    acme_orders.c.held_until_us <= now,
                    acme_orders.c.holder == node,
                )
            )
            .values(holder=node, held_until_us=now + lease_us, challenges=None, renew_asked_us=None)
        )
    return taken.rowcount == 1


def extend(engine: Engine, node: str, until: int) -> None:
    """`node` still orders: its lease runs until `until` (its answers stay as published)."""
    with engine.begin() as connection:
        connection.execute(
            update(acme_orders)
            .where(acme_orders.c.name == _ROW, acme_orders.c.holder == node)
            .values(held_until_us=until)
        )


def publish(engine: Engine, node: str, values: list[str]) -> None:
    """The DNS-01 answers of `node`'s order, for every node to serve while it holds it."""
    with engine.begin() as connection:
        connection.execute(
            update(acme_orders)
            .where(acme_orders.c.name == _ROW, acme_orders.c.holder == node)
            .values(challenges=json.dumps(values))
        )


def succeeded(engine: Engine, node: str, pem: bytes, now: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(acme_orders)
            .where(acme_orders.c.name == _ROW, acme_orders.c.holder == node)
            .values(
                pem=pem,
                issued_us=now,
                holder=None,
                held_until_us=None,
                challenges=None,
                renew_asked_us=None,
                failed_us=None,
                error=None,
            )
        )


def failed(engine: Engine, node: str, error: str, now: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(acme_orders)
            .where(acme_orders.c.name == _ROW, acme_orders.c.holder == node)
            .values(
                holder=None, held_until_us=None, challenges=None, failed_us=now, error=error[:2000]
            )
        )


def ask_renewal(engine: Engine, now: int) -> None:
    """Ask the serving nodes to order now, whatever the expiry and any recent failure."""
    _ensure_row(engine)
    with engine.begin() as connection:
        connection.execute(
            update(acme_orders).where(acme_orders.c.name == _ROW).values(renew_asked_us=now)
        )


def _ensure_row(engine: Engine) -> None:
    # Two nodes may insert at once: the second insert fails on the name, and the row stands.
    with contextlib.suppress(IntegrityError), engine.begin() as connection:
        if (
            connection.execute(select(acme_orders.c.name).where(acme_orders.c.name == _ROW)).first()
            is None
        ):
            connection.execute(insert(acme_orders).values(name=_ROW))
