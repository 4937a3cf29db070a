"""Connection limits every stream listener shares: a total cap, a per-source cap, a fair share.

An unauthenticated client can hold a connection open; these bounds make sure
no client, and no set of clients from one source, can hold them all. The
newest connection wins: a source at its cap loses its own oldest connection
to its new one (so an intruder that stalls connections and then uses a
canary from the same address still leaves its hit), and at the total cap a
newcomer whose source holds fewer connections than the busiest source takes
the place of that source's oldest one (so one source's flood cannot keep
another's real hit out). Only when every source holds its fair share is a
newcomer refused. A source is an IPv4 address or an IPv6 /64 (one host is
usually given a whole /64).

Every admission, refusal, eviction and timeout is counted for `/metrics`.
"""

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
    # How long one step may take: a request's head, its body, a reply's write.
    timeout: Seconds = 10.0

    @model_validator(mode="after")
    def _per_source_within_total(self) -> "StreamOptions":
        if self.max_connections_per_source > self.max_connections:
            raise ValueError("max_connections_per_source cannot exceed max_connections")
        return self


def source_of(address: str) -> str:
    """The source a connection counts against: its IPv4 address or its IPv6 /64."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class Slot:
    """One admitted connection; `release()` it when the connection ends."""

    __slots__ = ("_guard", "_released", "close", "source")

    def __init__(self, guard: "ConnectionGuard", source: str, close: Callable[[], None]) -> None:
        self._guard = guard
        self._released = False
        self.source = source
        self.close = close

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._guard.release(self)


class ConnectionGuard:
    """Admits connections within the caps, evicting for fairness; counts what it does."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.refused = 0
        # Connections closed for a newcomer: its source was at its cap ("source"), or
        # another source needed the room ("fair").
        self.evicted: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.admitted = 0
        # Insertion order is age: the first slot of a source is its oldest.
        self._sources: dict[str, dict[Slot, None]] = {}
        self._open = 0

    @classmethod
    def of(cls, options: StreamOptions) -> "ConnectionGuard":
        return cls(options.max_connections, options.max_connections_per_source)

    @property
    def open(self) -> int:
        return self._open

    def admit(self, address: str, close: Callable[[], None]) -> Slot | None:
        """A slot for a new connection from `address`, or None: refuse it with the protocol's answer."""
        source = source_of(address)
        held = self._sources.get(source)
        count = 0 if held is None else len(held)
        if held is not None and count >= self.per_source:
            self._evict(held, "source")
            count -= 1
        elif self._open >= self.total and not self._evict_for(count):
            self.refused += 1
            return None
        slot = Slot(self, source, close)
        self._sources.setdefault(source, {})[slot] = None
        self._open += 1
        self.admitted += 1
        return slot

    def release(self, slot: Slot) -> None:
        held = self._sources.get(slot.source)
        if held is None or slot not in held:
            return
        del held[slot]
        if not held:
            del self._sources[slot.source]
        self._open -= 1

    def _evict_for(self, count: int) -> bool:
        """Make room by closing the oldest connection of a source holding more than its share."""
        busiest = max(self._sources.values(), key=len, default=None)
        if busiest is None or len(busiest) <= count + 1:
            return False
        self._evict(busiest, "fair")
        return True

    def _evict(self, held: dict[Slot, None], reason: str) -> None:
        oldest = next(iter(held))
        oldest.release()
        self.evicted[reason] += 1
        oldest.close()
