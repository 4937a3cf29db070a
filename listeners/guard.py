"""Connection limits every stream listener shares: a total cap, a per-source cap, a fair share.

An unauthenticated client can hold a connection open; these bounds make sure
no client, and no set of clients, can hold them all. A real client keeps
sending until it is answered, so a connection that has sent nothing for more
than `eviction_grace` seconds is the one to close when a newcomer needs room:
a source at its cap loses its own idlest connection (an intruder that stalls
connections and then uses a canary from the same address still leaves its
hit), and at the total cap the busiest source yields first (one source's
flood cannot keep another's real hit out), then the idlest connection of all
(many sources holding one stalled connection each cannot either). A newcomer
is refused only when the connections it would replace have all been active
within the grace, so a neighbour behind the same address is never cut off
while it is talking.

A source is an IPv4 address or an IPv6 /64 (one host is usually given a
whole /64). Sources add up to networks, an IPv4 /24 or an IPv6 /48 (what one
site or one cloud tenant is routed): a network has a cap of its own and is
what yields first at the total cap, so 65,536 /64s of one /48 hold no more
than one address would.

Every admission, refusal, eviction and timeout is counted for `/metrics`.
"""

import math
import socket
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv6Address, ip_address, ip_network
from typing import Annotated

from pydantic import Field, model_validator

from listeners.base import ListenerOptions

Seconds = Annotated[float, Field(gt=0, le=3600)]


class StreamOptions(ListenerOptions):
    """The bounds of a listener that takes connections."""

    max_connections: Annotated[int, Field(ge=1, le=65536)] = 512
    max_connections_per_source: Annotated[int, Field(ge=1, le=65536)] = 32
    # Per IPv4 /24 or IPv6 /48; None: four times the per-source cap (within the total).
    max_connections_per_network: Annotated[int, Field(ge=1, le=65536)] | None = None
    # How long one step may take: a request's head, its body, a reply's write.
    timeout: Seconds = 10.0
    # A connection that sent something this recently is never closed to make room.
    eviction_grace: Annotated[float, Field(ge=0, le=60)] = 1.0

    @model_validator(mode="after")
    def _per_source_within_total(self) -> "StreamOptions":
        if self.max_connections_per_source > self.max_connections:
            raise ValueError("max_connections_per_source cannot exceed max_connections")
        network = self.max_connections_per_network
        if network is not None and not (
            self.max_connections_per_source <= network <= self.max_connections
        ):
            raise ValueError(
                "max_connections_per_network must lie between max_connections_per_source"
                " and max_connections"
            )
        return self

    @property
    def per_network(self) -> int:
        """The network cap in force."""
        if self.max_connections_per_network is not None:
            return self.max_connections_per_network
        return min(4 * self.max_connections_per_source, self.max_connections)


# The listen queue, and how many queued connections asyncio accepts per wake-up: each is a
# descriptor until it is refused, a few turns of the loop later.
BACKLOG = 256


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def dual_stack(sock: socket.socket) -> None:
    """An IPv6 socket takes IPv4 too (`listen = "::"` means every address), whatever the
    host's default; asyncio's own servers would make it IPv6 only."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def listening_socket(options: StreamOptions, port: int | None = None) -> socket.socket:
    """A non-blocking TCP socket listening where `options` say (on `port`, if given)."""
    listening = socket.socket(family_of(options.listen), socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        dual_stack(listening)
        listening.bind((options.listen, options.port if port is None else port))
    except OSError:
        listening.close()
        raise
    listening.listen(BACKLOG)
    listening.setblocking(False)
    return listening


def addresses_of(listening: socket.socket | None) -> list[tuple[str, int]]:
    """Where a listening socket is bound; none before it is."""
    if listening is None:
        return []
    host, port = listening.getsockname()[:2]
    return [(host, port)]


def source_of(address: str) -> tuple[str, str]:
    """The source a connection counts against (its IPv4 address or its IPv6 /64) and the
    network that source is in (its IPv4 /24 or its IPv6 /48)."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address, address
    if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if isinstance(parsed, IPv6Address):
        return (
            str(ip_network(f"{parsed}/64", strict=False)),
            str(ip_network(f"{parsed}/48", strict=False)),
        )
    return str(parsed), str(ip_network(f"{parsed}/24", strict=False))


class Slot:
    """One admitted connection; `release()` it when the connection ends."""

    __slots__ = (
        "_guard",
        "_released",
        "active",
        "close",
        "network",
        "opened",
        "pinned",
        "source",
    )

    def __init__(
        self, guard: "ConnectionGuard", source: str, network: str, close: Callable[[], None]
    ) -> None:
        self._guard = guard
        self._released = False
        self.opened = self.active = time.monotonic()
        self.pinned = math.inf
        self.source = source
        self.network = network
        self.close = close

    def touch(self) -> None:
        """The client sent something: this connection is in use, the last to be closed for room."""
        if not self._released:
            self._guard.touch(self)

    def pin(self) -> None:
        """Never close this one to make room. For guards whose slots are never touched
        otherwise: a pinned slot goes last, behind every one that can still be closed."""
        if not self._released:
            self._guard.touch(self)
            self.pinned = self.active
            self.active = math.inf

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._guard.release(self)


class ConnectionGuard:
    """Admits connections within the caps, evicting for fairness; counts what it does."""

    def __init__(
        self, total: int, per_source: int, grace: float = 1.0, per_network: int | None = None
    ) -> None:
        self.total = total
        self.per_source = per_source
        self.per_network = per_network if per_network is not None else min(4 * per_source, total)
        self.grace = grace
        # Newcomers turned away: their source or network held its cap of young connections
        # ("source", "network"), or every slot was young ("total").
        self.refused: Counter[str] = Counter()
        # Connections closed for a newcomer: of its own source or network at its cap ("source",
        # "network"), of a network holding more than the newcomer's ("fair"), the oldest of
        # all ("oldest").
        self.evicted: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        # Ordered by last activity: the first slot of each is the one idle longest.
        self._sources: dict[str, dict[Slot, None]] = {}
        self._networks: dict[str, dict[Slot, None]] = {}
        self._all: dict[Slot, None] = {}

    @classmethod
    def of(cls, options: StreamOptions) -> "ConnectionGuard":
        return cls(
            options.max_connections,
            options.max_connections_per_source,
            options.eviction_grace,
            options.per_network,
        )

    @property
    def open(self) -> int:
        return len(self._all)

    def admit(self, address: str, close: Callable[[], None]) -> Slot | None:
        """A slot for a new connection from `address`, or None: refuse it with the protocol's answer."""
        source, network = source_of(address)
        held = self._sources.get(source, {})
        in_network = self._networks.get(network, {})
        now = time.monotonic()
        if len(held) >= self.per_source:
            if not self._evict(held, now, "source"):
                self.refused["source"] += 1
                return None
        elif len(in_network) >= self.per_network:
            if not self._evict(in_network, now, "network"):
                self.refused["network"] += 1
                return None
        elif len(self._all) >= self.total and not self._make_room(network, now):
            self.refused["total"] += 1
            return None
        slot = Slot(self, source, network, close)
        self._sources.setdefault(source, {})[slot] = None
        self._networks.setdefault(network, {})[slot] = None
        self._all[slot] = None
        return slot

    def release(self, slot: Slot) -> None:
        if slot not in self._all:
            return
        del self._all[slot]
        _remove(self._sources, slot.source, slot)
        _remove(self._networks, slot.network, slot)

    def touch(self, slot: Slot) -> None:
        slot.active = time.monotonic()
        for held in (self._sources[slot.source], self._networks[slot.network], self._all):
            del held[slot]
            held[slot] = None

    def _make_room(self, network: str, now: float) -> bool:
        """At the total cap, for a newcomer from `network`: the busiest network yields first,
        else the idlest connection of all."""
        busiest = max(self._networks.values(), key=len)
        count = len(self._networks.get(network, ()))
        if len(busiest) > count + 1 and self._evict(busiest, now, "fair"):
            return True
        return self._evict(self._all, now, "oldest")

    def _evict(self, held: dict[Slot, None], now: float, reason: str) -> bool:
        """Close the idlest of `held`, unless it sent something within the grace (its request
        may be on the way: a real client keeps sending, only a stalled one stays silent)."""
        idlest = next(iter(held))
        if now - idlest.active < self.grace:
            return False
        self._close(idlest, reason)
        return True

    def _close(self, slot: Slot, reason: str) -> None:
        slot.release()
        self.evicted[reason] += 1
        slot.close()


def _remove(groups: dict[str, dict[Slot, None]], key: str, slot: Slot) -> None:
    held = groups[key]
    del held[slot]
    if not held:
        del groups[key]
