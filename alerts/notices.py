"""Pages about oobwatch itself: a listener failing its self-test or recovering, ledger heads
sent away as anchors, a ledger that fails verification, a delivery given up undelivered,
the store away and hits spooled.

Each notice is queued in the outbox like an alert's page, so it is retried
and recorded the same way; it has no alert of its own. The store's own
notices cannot be: they are sent directly, once.
"""

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, RowMapping

from alerts.deliveries import delivery_payload, enqueue
from alerts.policy import Route
from alerts.render import Line, Message, plural
from store.clock import to_iso


def listener_health(
    connection: Connection,
    route: Route,
    *,
    node: str,
    listener: str,
    healthy: bool,
    since_us: int,
    now_us: int,
    canary_id: str,
    sandbox: str,
) -> int:
    """A listener started failing its self-test (`healthy` False) or recovered (True)."""
    label = listener.upper()
    if healthy:
        title = f"oobwatch self-test: {listener} recovered"
        headline = f"{label} listener on node {node} recovered (failing since {to_iso(since_us)})"
    else:
        title = f"oobwatch self-test: {listener} FAILING"
        headline = (
            f"{label} listener on node {node} is failing its self-test since {to_iso(since_us)}"
        )
    message = Message(
        title,
        headline,
        [Line("listener", listener), Line("node", node), Line("since", to_iso(since_us))],
    )
    payload = delivery_payload(
        "recovery" if healthy else "heartbeat",
        node=node,
        dedup_key=f"heartbeat-{node}-{listener}",
        message=message,
        severity="critical",
        canary_id=canary_id,
        sandbox=sandbox,
        listener=listener,
    )
    return enqueue(connection, route, payload, now_us)


def ledger_anchor(
    connection: Connection, route: Route, *, node: str, seq: int, digest: str, now_us: int
) -> int:
    """The ledger head, sent away so a rewritten chain cannot also rewrite this copy."""
    message = Message(
        f"oobwatch ledger head on {node}",
        f"Ledger head of node {node}: row {seq}, hash {digest}",
        [Line("seq", str(seq)), Line("hash", digest), Line("time", to_iso(now_us))],
    )
    payload = delivery_payload(
        "anchor",
        node=node,
        dedup_key=f"anchor-{node}",
        message=message,
        severity="low",
        head={"seq": seq, "hash": digest},
    )
    return enqueue(connection, route, payload, now_us)


def ledger_broken(
    connection: Connection,
    route: Route,
    *,
    node: str,
    problem: str,
    bad_seq: int | None,
    verified: int,
    now_us: int,
) -> int:
    """The ledger failed verification."""
    message = Message(
        f"oobwatch LEDGER BROKEN on {node}",
        f"The ledger failed verification on node {node}: {problem}",
        [Line("first bad row", str(bad_seq)), Line("verified before it", str(verified))],
    )
    payload = delivery_payload(
        "integrity",
        node=node,
        dedup_key=f"ledger-{node}",
        message=message,
        severity="critical",
    )
    return enqueue(connection, route, payload, now_us)


def undelivered(
    connection: Connection,
    route: Route,
    *,
    node: str,
    delivery: RowMapping,
    payload: Mapping[str, Any],
    attempts: int,
    error: str,
    now_us: int,
) -> int:
    """A delivery was given up with no other route to take it (dead-lettered)."""
    where = f"{delivery['route']}/{delivery['sink']}"
    alert_id = payload.get("alert_id")
    lines = [Line("delivery", str(delivery["id"]))]
    if alert_id:
        lines.append(Line("alert", alert_id))
    lines += [Line("queued", to_iso(delivery["created_us"])), Line("last error", error)]
    escalated_from = payload.get("escalated_from")
    if escalated_from:
        lines.append(Line("escalated from", f"{escalated_from['route']}/{escalated_from['sink']}"))
    if payload.get("message"):
        lines.append(Line("undelivered", payload["message"]["headline"]))
    about = f" of alert {alert_id}" if alert_id else ""
    minutes = (now_us - delivery["created_us"]) // 60_000_000
    message = Message(
        f"oobwatch: {delivery['purpose']} NOT DELIVERED via {where}",
        f"oobwatch gave up delivering the {delivery['purpose']}{about} via {where} after "
        f"{plural(attempts, 'attempt')} in {minutes} min, with no other route to take it: {error}",
        lines,
    )
    notice = delivery_payload(
        "undelivered",
        node=node,
        dedup_key=f"undelivered-{delivery['id']}",
        message=message,
        severity="critical",
        canary_id=payload.get("canary_id"),
        sandbox=payload.get("sandbox"),
        undelivered={
            "delivery": delivery["id"],
            "alert_id": alert_id,
            "purpose": delivery["purpose"],
            "route": delivery["route"],
            "sink": delivery["sink"],
            "attempts": attempts,
            "error": error,
        },
    )
    return enqueue(connection, route, notice, now_us)


def spool_change(change: str, *, node: str, count: int, path: str, now_us: int) -> dict[str, Any]:
    """The store went away and hits are spooled ("spooling"), the spool is full and hits go
    unrecorded ("full"), or the store is back and the spool replayed ("replayed")."""
    at = to_iso(now_us)
    if change == "spooling":
        title = f"oobwatch: store UNREACHABLE on node {node}, spooling hits"
        headline = (
            f"The store does not take hits on node {node} since {at}: they are spooled to "
            f"{path} and answered, and reach the ledger (and page) when it is back"
        )
        severity = "critical"
    elif change == "full":
        title = f"oobwatch: spool FULL on node {node}, hits NOT RECORDED"
        headline = (
            f"The spool at {path} on node {node} is full or cannot be written since {at}, and "
            "the store is still away: "
            f"{plural(count, 'event')} and every hit after them go unrecorded and unanswered"
        )
        severity = "critical"
    else:
        title = f"oobwatch: store back on node {node}"
        headline = f"{plural(count, 'spooled event')} reached the ledger on node {node} at {at}"
        severity = "low"
    message = Message(title, headline, [Line("node", node), Line("spool", path)])
    return delivery_payload(
        f"spool-{change}",
        node=node,
        dedup_key=f"spool-{node}",
        message=message,
        severity=severity,
    )
