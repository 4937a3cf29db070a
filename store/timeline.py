"""Timelines and incidents: what a sandbox did that reached the outside, in order.

A timeline is ledger entries matching a responder's filters, oldest first.
An incident groups one sandbox's hits that follow each other with no quiet
gap longer than `gap_us`, with the alert events (pages, acks, escalations)
that followed them.
"""

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, select

from store import bursts
from store.ledger import Entry
from store.schema import ledger

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TimelineQuery:
    """Which entries a responder asked for; None means no filter."""

    sandbox: str | None = None
    canary_id: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    types: Iterable[str] | None = None
    exclude_sandbox: str | None = None
    protocol: str | None = None
    kind: str | None = None
    source: IpNetwork | None = None
    after_seq: int | None = None
    # Only the newest this many (still oldest first).
    newest: int | None = None

    def keeps(self, entry: Entry) -> bool:
        """The filters not expressed in SQL: canary kind and source network."""
        if self.kind is not None and entry.evidence.get("kind") != self.kind:
            return False
        if self.source is not None:
            try:
                return ipaddress.ip_address(entry.source_ip or "") in self.source
            except ValueError:
                return False
        return True


def timeline(connection: Connection, query: TimelineQuery) -> list[Entry]:
    statement = select(ledger).order_by(ledger.c.time_us, ledger.c.seq)
    if query.sandbox is not None:
        statement = statement.where(ledger.c.sandbox == query.sandbox)
    if query.canary_id is not None:
        statement = statement.where(ledger.c.canary_id == query.canary_id)
    if query.since_us is not None:
        statement = statement.where(ledger.c.time_us >= query.since_us)
    if query.until_us is not None:
        statement = statement.where(ledger.c.time_us < query.until_us)
    if query.exclude_sandbox is not None:
        statement = statement.where(
            (ledger.c.sandbox.is_(None)) | (ledger.c.sandbox != query.exclude_sandbox)
        )
    if query.types is not None:
        statement = statement.where(ledger.c.type.in_(list(query.types)))
    if query.protocol is not None:
        statement = statement.where(ledger.c.protocol == query.protocol)
    if query.after_seq is not None:
        statement = statement.where(ledger.c.seq > query.after_seq)
    in_sql = query.kind is None and query.source is None
    if query.newest is not None and in_sql:
        statement = statement.order_by(None).order_by(ledger.c.time_us.desc(), ledger.c.seq.desc())
        newest = [
            Entry(**row._mapping) for row in connection.execute(statement.limit(query.newest))
        ]
        return newest[::-1]
    found = (Entry(**row._mapping) for row in connection.execute(statement))
    kept = [entry for entry in found if query.keeps(entry)]
    return kept if query.newest is None else kept[-query.newest :]


@dataclass(slots=True)
class Incident:
    """A burst of one sandbox's hits and what followed them."""

    sandbox: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"in-{self.hits[0].seq}"

    @property
    def hits(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.type == "hit"]

    @property
    def hit_count(self) -> int:
        """Hits, an aggregate counting as the hits it accounts for."""
        return sum(entry.hits for entry in self.hits)

    @property
    def first_us(self) -> int:
        return self.hits[0].time_us

    @property
    def last_us(self) -> int:
        return self.hits[-1].time_us

    @property
    def channels(self) -> list[str]:
        return sorted({entry.protocol for entry in self.hits if entry.protocol})

    @property
    def sources(self) -> list[str]:
        """Distinct source hosts (a resolver's changing ports are one source)."""
        found = [e.source_ip for e in self.hits if e.source_ip is not None]
        found += [source for e in self.hits for source in bursts.sources_of(e.evidence)]
        return list(dict.fromkeys(found))

    @property
    def canaries(self) -> list[str]:
        return list(dict.fromkeys(entry.canary_id for entry in self.hits if entry.canary_id))

    @property
    def follow_up(self) -> list[Entry]:
        """Alert events after the first hit: pages, failures, digests, escalations, acks."""
        return [entry for entry in self.entries if entry.type.startswith("alert_")]


def incidents(entries: Sequence[Entry], gap_us: int) -> list[Incident]:
    """Group time-ordered entries into incidents per sandbox, split by quiet gaps."""
    current: dict[str, Incident] = {}
    found: list[Incident] = []
    for entry in entries:
        sandbox = entry.sandbox
        if sandbox is None:
            continue
        open_incident = current.get(sandbox)
        if entry.type == "hit":
            if open_incident is None or entry.time_us - open_incident.last_us > gap_us:
                open_incident = current[sandbox] = Incident(sandbox)
                found.append(open_incident)
            open_incident.entries.append(entry)
        elif open_incident is not None:
            open_incident.entries.append(entry)
    return found


def find_incident(connection: Connection, incident_id: str, gap_us: int) -> Incident | None:
    """The incident `in-<seq>` whose first hit is ledger row seq, or None."""
    try:
        first_seq = int(incident_id.removeprefix("in-"))
    except ValueError:
        return None
    if not 0 < first_seq < 2**63:
        return None
    first = connection.execute(
        select(ledger.c.sandbox, ledger.c.type).where(ledger.c.seq == first_seq)
    ).first()
    if first is None or first.type != "hit" or first.sandbox is None:
        return None
    found = incidents(timeline(connection, TimelineQuery(sandbox=first.sandbox)), gap_us)
    return next((incident for incident in found if incident.id == incident_id), None)
