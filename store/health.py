"""Listener health as the heartbeat recorded it: each node's listeners, last landed probe,
and whether its last state change was a failure.

Read from the ledger, so every node's listeners show from any node: the
heartbeat's hits (sandbox `oobwatch-heartbeat`) say when a probe last
landed; its `heartbeat_failed`/`heartbeat_recovered` rows, written only on a
change, say whether a listener is failing now and since when.
"""

from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from canaries.model import HEARTBEAT_SANDBOX
from store.ledger import Entry
from store.schema import ledger

# The protocol the heartbeat's hit carries, by the listener it probes.
PROTOCOL_OF = {
    "dns": "dns",
    "smtp": "smtp",
    "http": "http",
    "https": "tls",
    "postgres": "postgres",
    "ssh": "ssh",
}
_LISTENER = {protocol: name for name, protocol in PROTOCOL_OF.items()}


@dataclass(frozen=True, slots=True)
class ListenerHealth:
    node: str
    listener: str
    last_ok_us: int | None
    failing_since_us: int | None


def listener_health(connection: Connection) -> list[ListenerHealth]:
    last_ok: dict[tuple[str, str], int] = {}
    landed = connection.execute(
        select(ledger.c.node, ledger.c.protocol, func.max(ledger.c.time_us))
        .where(ledger.c.sandbox == HEARTBEAT_SANDBOX, ledger.c.type == "hit")
        .group_by(ledger.c.node, ledger.c.protocol)
    )
    for node, protocol, time_us in landed:
        last_ok[(node, _LISTENER.get(protocol, protocol))] = time_us
    failing: dict[tuple[str, str], int | None] = {}
    changes = connection.execute(
        select(ledger)
        .where(ledger.c.type.in_(("heartbeat_failed", "heartbeat_recovered")))
        .order_by(ledger.c.seq)
    )
    for row in changes:
        entry = Entry(**row._mapping)
        key = (entry.node, str(entry.evidence.get("listener")))
        failing[key] = entry.time_us if entry.type == "heartbeat_failed" else None
    keys = sorted({*last_ok, *failing})
    return [
        ListenerHealth(node, name, last_ok.get((node, name)), failing.get((node, name)))
        for node, name in keys
    ]
