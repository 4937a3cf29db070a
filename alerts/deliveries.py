"""What a delivery is: the payload a sink receives, its rows in the outbox, where it escalates.

Whoever decides a delivery (alert state, notices) writes it here, in its own
transaction; `alerts.outbox` sends what was written.
"""

import json
from collections.abc import Collection
from typing import Any

from sqlalchemy import Connection, insert

from alerts.policy import DEFAULT_ROUTE, Policy, Route
from alerts.render import Message
from store.schema import deliveries

_QUEUE = insert(deliveries)


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
        connection.execute(_QUEUE, rows)
    return len(rows)


def escalation_route(policy: Policy, failed_route: str) -> Route | None:
    """Where a delivery that exhausted its attempts goes: its route's escalate_to, else the
    default route, whichever first is another route with sinks; None if neither is."""
    route = policy.routes.get(failed_route)
    for name in (None if route is None else route.escalate_to, DEFAULT_ROUTE):
        target = None if name is None or name == failed_route else policy.routes.get(name)
        if target is not None and target.sinks:
            return target
    return None
