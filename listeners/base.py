"""What every listener shares: the Listener interface and how a hit becomes a ledger event."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from canaries.index import TokenIndex
from canaries.model import Canary
from store.clock import now_us
from store.ledger import Event
from store.writer import LedgerWriter


class Listener(Protocol):
    """A protocol server bound to its own sockets."""

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
    """What a listener needs from the rest of the process."""

    index: TokenIndex
    writer: LedgerWriter
    node: str
    counters: Counters = field(default_factory=Counters)


def format_peer(peer: tuple[Any, ...]) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def hit_event(
    canary: Canary, *, protocol: str, source: str, node: str, evidence: Mapping[str, Any]
) -> Event:
    """The ledger event for one observation of `canary`'s token."""
    data = {
        "kind": canary.kind,
        "location": canary.location,
        "labels": dict(canary.labels),
        "severity": canary.severity,
        **evidence,
    }
    return Event(
        type="hit",
        time_us=now_us(),
        node=node,
        canary_id=canary.id,
        sandbox=canary.sandbox,
        protocol=protocol,
        source=source,
        data=data,
    )
