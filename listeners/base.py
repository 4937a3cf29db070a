"""What every listener shares: the Listener interface, its options, and the one way to record a hit.

A listener answers the step that carries a token only after the hit is
committed. It records through its `Context`: `record()` for a coroutine that
waits for the commit (raising `NotDurable` if there is none, so the caller
answers with a temporary failure), or `record_then()` for a hot path that
hands over what to send once committed. Either way the hit goes through the
node's `BurstFolder`, so one canary's flood folds into aggregate rows
(`listeners/burst.py`), and the counters mean the same on every listener:
`hits` counts committed hits, `record_failures` hits the store could not take.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from canaries.index import TokenIndex
from canaries.model import Canary
from store.clock import now_us
from store.ledger import Entry, Event
from store.writer import NotDurable

if TYPE_CHECKING:
    from listeners.burst import BurstFolder
    from listeners.certificates import Challenges, NodeCertificate
    from listeners.guard import ConnectionGuard

__all__ = ["NotDurable"]

Port = Annotated[int, Field(ge=0, le=65535)]
Peer = tuple[Any, ...]


def _check_listen(address: str) -> str:
    try:
        ip_address(address)
    except ValueError:
        raise ValueError("must be an IP address to bind, such as 127.0.0.1 or ::") from None
    return address


ListenAddress = Annotated[str, AfterValidator(_check_listen)]
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _check_name(name: str) -> str:
    normal = name.rstrip(".").lower()
    if not normal or not all(_LABEL.match(label) for label in normal.split(".")):
        raise ValueError(f"{name!r} is not a valid DNS name")
    return normal


DnsName = Annotated[str, AfterValidator(_check_name)]


class ListenerOptions(BaseModel):
    """The keys every listener's config section has; each listener adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    listen: ListenAddress = "127.0.0.1"
    port: Port = 0


class Listener(Protocol):
    """A protocol server bound to its own sockets, built as `Kind(context, options)`."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def addresses(self) -> list[tuple[str, int]]: ...


@dataclass(slots=True)
class Counters:
    """Traffic a listener saw; junk is counted here and never stored row by row."""

    received: int = 0
    hits: int = 0
    junk: int = 0
    refused: int = 0
    malformed: int = 0
    record_failures: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Context:
    """What a listener needs from the rest of the process, and how it records."""

    index: TokenIndex
    # Shared by a node's listeners: a canary's burst folds across protocols.
    folder: "BurstFolder"
    node: str
    zone: str
    counters: Counters = field(default_factory=Counters)
    # The connection bounds of a listener that takes connections, for /metrics.
    connections: "ConnectionGuard | None" = None
    # SMTP: the bounds on messages being received at once (`listeners.smtp.MessagePlaces`).
    messages: "ConnectionGuard | None" = None
    # The node's certificate, for listeners that speak TLS.
    tls: "NodeCertificate | None" = None
    # Shared by a node's listeners: what the DNS listener answers for an ACME order.
    challenges: "Challenges | None" = None
    # The SSH host key every node on the store serves (OpenSSH private key format).
    ssh_host_key: bytes | None = None

    def hit(self, canary: Canary, protocol: str, peer: Peer, evidence: Mapping[str, Any]) -> Event:
        return hit_event(canary, protocol=protocol, peer=peer, node=self.node, evidence=evidence)

    def observation(
        self, type_: str, canary: Canary, protocol: str, peer: Peer, data: Mapping[str, Any]
    ) -> Event:
        """A non-hit event about `canary` (such as a message's evidence) from `peer`."""
        return Event(
            type=type_,
            time_us=now_us(),
            node=self.node,
            canary_id=canary.id,
            sandbox=canary.sandbox,
            protocol=protocol,
            source=source_address(peer),
            data={"source_port": int(peer[1]), **data},
        )

    async def record(self, *events: Event) -> list[Entry]:
        """Commit `events`; their entries, or NotDurable (then answer with a temporary failure)."""
        try:
            entries = await self.folder.append(*events)
        except NotDurable:
            self.counters.record_failures += 1
            raise
        self.counters.hits += sum(1 for event in events if event.type == "hit")
        return entries

    def record_then(self, event: Event, answer: Callable[[bool], None]) -> None:
        """Commit a hit, then call `answer(True)`; `answer(False)` when it could not be.

        The caller must not answer the client on False: the client's retry gets
        another chance.
        """
        counters = self.counters

        def committed(entry: Entry | None) -> None:
            if entry is None:
                counters.record_failures += 1
            else:
                counters.hits += 1
            answer(entry is not None)

        self.folder.submit(event, committed)


def hit_event(
    canary: Canary, *, protocol: str, peer: Peer, node: str, evidence: Mapping[str, Any]
) -> Event:
    """The ledger event for one observation of `canary`'s token from `peer` (address, port)."""
    data = {
        "kind": canary.kind,
        "location": canary.location,
        "labels": dict(canary.labels),
        "severity": canary.severity,
        "source_port": int(peer[1]),
        **evidence,
    }
    return Event(
        type="hit",
        time_us=now_us(),
        node=node,
        canary_id=canary.id,
        sandbox=canary.sandbox,
        protocol=protocol,
        source=source_address(peer),
        data=data,
    )


def source_address(peer: Peer) -> str:
    """The address a hit came from, as recorded: an IPv4 client of a dual-stack listener
    (`listen = "::"`) arrives as ::ffff:a.b.c.d, and is recorded as a.b.c.d, so that ignore
    rules and timeline filters for IPv4 match it."""
    address = str(peer[0])
    try:
        mapped = ip_address(address)
    except ValueError:
        return address
    if isinstance(mapped, IPv6Address) and mapped.ipv4_mapped is not None:
        return str(mapped.ipv4_mapped)
    return address


def printable(text: str, limit: int) -> str:
    """`text` cut to `limit`, each character that is not printable shown as `?`: a value a
    client chose, kept as evidence, cannot move a cursor or forge a line wherever it is shown."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def format_peer(peer: Peer) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
