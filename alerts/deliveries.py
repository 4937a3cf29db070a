"""What a delivery is: the payload a sink receives, its rows in the outbox, where it escalates.

Whoever decides a delivery (alert state, notices) writes it here, in its own
transaction; `alerts.outbox` sends what was written. A first page is written
leased to the node's own sender, which is handed the rows once committed: the
page leaves without a claim transaction of its own on the way.
"""

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, insert

from alerts.policy import DEFAULT_ROUTE, Policy, Route
from alerts.render import Message
from store.schema import deliveries

# How long a sender holds the deliveries it took: well beyond one attempt's time limit.
LEASE_US = 30_000_000

# The sink kinds a delivery is written for, unless its writer names fewer.
SINK_KINDS = ("apprise", "pagerduty", "webhook")

_QUEUE = insert(deliveries)
_QUEUE_RETURNING = insert(deliveries).returning(*deliveries.c, sort_by_parameter_order=True)


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
    kinds: Collection[str] = SINK_KINDS,
) -> int:
    """Write one pending delivery per sink of `route` into the outbox."""
    rows = _rows(route, payload, now_us, kinds)
    if rows:
        connection.execute(_QUEUE, rows)
    return len(rows)


@dataclass(frozen=True, slots=True)
class Lease:
    """Whom first pages may be written leased to (a sender's `owner`), and how many."""

    owner: str
    room: int


def enqueue_leased(
    connection: Connection, route: Route, payload: dict[str, Any], now_us: int, owner: str
) -> list[RowMapping]:
    """Like `enqueue`, but leased to the sender `owner` already: the rows written, for that
    sender to send once they are committed, with no claim of its own before the first attempt."""
    rows = [
        {**row, "lease_owner": owner, "lease_until_us": now_us + LEASE_US}
        for row in _rows(route, payload, now_us, SINK_KINDS)
    ]
    if not rows:
        return []
    return list(connection.execute(_QUEUE_RETURNING, rows).mappings())


def _rows(
    route: Route, payload: dict[str, Any], now_us: int, kinds: Collection[str]
) -> list[dict[str, Any]]:
    return [
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


def escalation_route(policy: Policy, failed_route: str) -> Route | None:
    """Where a delivery that exhausted its attempts goes: its route's escalate_to, else the
    default route, whichever first is another route with sinks; None if neither is."""
    route = policy.routes.get(failed_route)
    for name in (None if route is None else route.escalate_to, DEFAULT_ROUTE):
        target = None if name is None or name == failed_route else policy.routes.get(name)
        if target is not None and target.sinks:
            return target
    return None
