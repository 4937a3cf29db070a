"""Pages about oobwatch itself: a listener failing its self-test or recovering, ledger heads
sent away as anchors, a ledger that fails verification.

Each notice is queued in the outbox like an alert's page, so it is retried
and recorded the same way; it has no alert of its own.
"""

from sqlalchemy import Connection

from alerts.outbox import delivery_payload, enqueue
from alerts.policy import Route
from alerts.render import Line, Message
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
