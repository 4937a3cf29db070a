"""The outbox: deliveries are written here in the transaction that decides them, then sent.

`enqueue` writes one pending delivery per sink of a route, inside the
caller's transaction; the `Outbox` sender works them until each is sent or
given up.

Deliveries are claimed with a lease, so a second node (or a restarted one)
never sends a delivery another is sending. Each attempt is a ledger event.
A failed attempt is retried with exponential backoff and full jitter; one
that fails `max_attempts` times is recorded as failed and escalated. Each
sink is called on its own, so one failing never holds up the others.

Delivery is at least once: a crash between a sink accepting a delivery and
its row being marked sent sends it again after restart. PagerDuty folds
such repeats by dedup_key; webhook receivers get the delivery id to do the same.
"""

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, RowMapping, func, insert, select, update

from alerts import sinks
from alerts.policy import DEFAULT_ROUTE, Policy, Route
from alerts.render import Message
from alerts.sinks import DeliveryFailed, Sender
from store import ledger
from store.ledger import Event
from store.schema import deliveries

log = logging.getLogger(__name__)

LEASE_US = 30_000_000
BATCH = 50


def delivery_payload(
    purpose: str,
    *,
    node: str,
    dedup_key: str,
    message: Message | None,
    severity: Any = None,
    alert_id: str | None = None,
    canary_id: str | None = None,
    sandbox: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What an outbox row carries to its sink (the webhook body documents these keys)."""
    return {
        "purpose": purpose,
        "alert_id": alert_id,
        "canary_id": canary_id,
        "dedup_key": dedup_key,
        "sandbox": sandbox,
        "node": node,
        "severity": severity,
        "message": None if message is None else message.as_json(),
        **extra,
    }


def enqueue(
    connection: Connection,
    route: Route,
    payload: dict[str, Any],
    now_us: int,
    kinds: Collection[str] = ("apprise", "pagerduty", "webhook"),
) -> int:
    """Write one pending delivery per sink of `route` into the outbox."""
    rows = [
        {
            "alert_id": payload.get("alert_id"),
            "purpose": payload["purpose"],
            "route": route.name,
            "sink": sink.key,
            "payload": json.dumps({**payload, "route": route.name}),
            "status": "pending",
            "attempts": 0,
            "next_attempt_us": now_us,
            "lease_until_us": 0,
            "created_us": now_us,
        }
        for sink in route.sinks
        if sink.kind in kinds
    ]
    if rows:
        connection.execute(insert(deliveries), rows)
    return len(rows)


def escalation_route(policy: Policy, failed_route: str) -> Route | None:
    """Where a delivery that keeps failing is escalated: its route's escalate_to, else the default route."""
    route = policy.routes.get(failed_route)
    target = route.escalate_to if route is not None and route.escalate_to else DEFAULT_ROUTE
    return None if target == failed_route else policy.routes.get(target)


@dataclass(frozen=True, slots=True)
class Retry:
    """How failed deliveries are retried."""

    base_us: int
    max_us: int
    max_attempts: int

    def delay_us(self, attempts: int) -> int:
        ceiling = min(self.max_us, self.base_us * 2 ** (attempts - 1))
        # Full jitter: retries from many alerts do not arrive at a recovering sink together.
        return random.randint(ceiling // 2, ceiling)  # noqa: S311 - spreading load, not secrecy


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery: RowMapping
    error: str | None


def _running(owner: str) -> bool:
    """Whether the process named in a lease owner `node:pid` is alive on this host."""
    try:
        os.kill(int(owner.rsplit(":", 1)[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class Outbox:
    """Sends due deliveries through their sinks and records every attempt."""

    def __init__(
        self, engine: Engine, policy: Policy, retry: Retry, node: str, clock: Callable[[], int]
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._retry = retry
        self._node = node
        self._clock = clock
        self._client = httpx.AsyncClient(follow_redirects=False)
        self._senders: dict[tuple[str, str], Sender] = {}
        self._lock = asyncio.Lock()
        # Several processes on one host may share a node name: leases name the process.
        self._owner = f"{node}:{os.getpid()}"
        self.sent = 0
        self.failed = 0

    async def close(self) -> None:
        await self._client.aclose()

    def release_own_leases(self) -> int:
        """At start: leases held by this node's processes that are no longer running are free."""
        released = 0
        with self._engine.begin() as connection:
            owners = connection.execute(
                select(deliveries.c.lease_owner)
                .where(
                    deliveries.c.status == "pending",
                    deliveries.c.lease_owner.like(f"{self._node}:%"),
                )
                .distinct()
            ).scalars()
            for owner in [owner for owner in owners if not _running(owner)]:
                released += connection.execute(
                    update(deliveries)
                    .where(deliveries.c.status == "pending", deliveries.c.lease_owner == owner)
                    .values(lease_until_us=0, lease_owner=None)
                ).rowcount
        return released

    def depth(self) -> int:
        """Deliveries not yet sent or given up."""
        with self._engine.connect() as connection:
            query = (
                select(func.count()).select_from(deliveries).where(deliveries.c.status == "pending")
            )
            return int(connection.execute(query).scalar_one())

    async def work(self) -> int:
        """Send every due delivery once; returns how many were attempted."""
        async with self._lock:
            attempted = 0
            while due := await asyncio.to_thread(self._claim, self._clock()):
                outcomes = await asyncio.gather(*(self._attempt(row) for row in due))
                await asyncio.to_thread(self._record, outcomes, self._clock())
                attempted += len(due)
            return attempted

    def _claim(self, now_us: int) -> list[RowMapping]:
        claimed = []
        with self._engine.begin() as connection:
            rows = (
                connection.execute(
                    select(deliveries)
                    .where(
                        deliveries.c.status == "pending",
                        deliveries.c.next_attempt_us <= now_us,
                        deliveries.c.lease_until_us <= now_us,
                    )
                    .order_by(deliveries.c.id)
                    .limit(BATCH)
                )
                .mappings()
                .all()
            )
            for row in rows:
                # Re-check everything: another sender may have tried it since the SELECT.
                taken = connection.execute(
                    update(deliveries)
                    .where(
                        deliveries.c.id == row["id"],
                        deliveries.c.status == "pending",
                        deliveries.c.next_attempt_us <= now_us,
                        deliveries.c.lease_until_us <= now_us,
                    )
                    .values(lease_until_us=now_us + LEASE_US, lease_owner=self._owner)
                )
                if taken.rowcount == 1:
                    claimed.append(row)
        return claimed

    async def _attempt(self, row: RowMapping) -> Outcome:
        sender = self._sender(row["route"], row["sink"])
        if sender is None:
            return Outcome(row, f"sink {row['route']}/{row['sink']} is no longer configured")
        try:
            await sender.send(row["id"], json.loads(row["payload"]))
        except DeliveryFailed as failure:
            return Outcome(row, str(failure))
        except Exception as failure:
            log.exception("delivery %d to %s/%s crashed", row["id"], row["route"], row["sink"])
            return Outcome(row, f"{type(failure).__name__}")
        return Outcome(row, None)

    def _sender(self, route_name: str, key: str) -> Sender | None:
        if (route_name, key) not in self._senders:
            route = self._policy.routes.get(route_name)
            sink = None if route is None else next((s for s in route.sinks if s.key == key), None)
            if sink is None:
                return None
            self._senders[(route_name, key)] = sinks.build(sink, self._client)
        return self._senders[(route_name, key)]

    def _record(self, outcomes: list[Outcome], now_us: int) -> None:
        with self._engine.begin() as connection:
            events = []
            for outcome in outcomes:
                row = outcome.delivery
                attempt = row["attempts"] + 1
                payload: dict[str, Any] = json.loads(row["payload"])
                data = {
                    "delivery": row["id"],
                    "alert_id": row["alert_id"],
                    "purpose": row["purpose"],
                    "route": row["route"],
                    "target": row["sink"],
                    "attempt": attempt,
                    "error": outcome.error,
                }
                if outcome.error is None:
                    self.sent += 1
                    values: dict[str, Any] = {
                        "status": "sent",
                        "sent_us": now_us,
                        "attempts": attempt,
                    }
                    events.append(self._event("alert_sent", payload, now_us, data))
                elif attempt >= self._retry.max_attempts:
                    self.failed += 1
                    values = {"status": "failed", "attempts": attempt, "last_error": outcome.error}
                    events.append(
                        self._event("alert_failed", payload, now_us, {**data, "final": True})
                    )
                    log.error(
                        "delivery %d to %s/%s given up: %s",
                        row["id"],
                        row["route"],
                        row["sink"],
                        outcome.error,
                    )
                    target = escalation_route(self._policy, row["route"])
                    if target is not None and row["purpose"] not in ("ack", "resolve"):
                        enqueue(connection, target, {**payload, "purpose": "escalation"}, now_us)
                else:
                    values = {
                        "attempts": attempt,
                        "last_error": outcome.error,
                        "next_attempt_us": now_us + self._retry.delay_us(attempt),
                        "lease_until_us": 0,
                    }
                    events.append(
                        self._event("alert_failed", payload, now_us, {**data, "final": False})
                    )
                connection.execute(
                    update(deliveries).where(deliveries.c.id == row["id"]).values(**values)
                )
            ledger.append(connection, events)

    def _event(
        self, type_: str, payload: dict[str, Any], now_us: int, data: dict[str, Any]
    ) -> Event:
        return Event(
            type=type_,
            time_us=now_us,
            node=self._node,
            canary_id=payload.get("canary_id"),
            sandbox=payload.get("sandbox"),
            data=data,
        )
