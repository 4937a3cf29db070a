"""Timelines and incidents: what a sandbox did that reached the outside, in order.

A timeline is ledger entries matching a responder's filters, oldest first.
An incident groups one sandbox's hits that follow each other with no quiet
gap longer than `gap_us`, with the alert events (pages, acks, escalations)
that followed them.
"""

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from sqlalchemy import ColumnElement, Connection, Subquery, and_, func, or_, select

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


def conditions(query: TimelineQuery) -> list[ColumnElement[bool]]:
    """The filters expressed in SQL."""
    where = []
    if query.sandbox is not None:
        where.append(ledger.c.sandbox == query.sandbox)
    if query.canary_id is not None:
        where.append(ledger.c.canary_id == query.canary_id)
    if query.since_us is not None:
        where.append(ledger.c.time_us >= query.since_us)
    if query.until_us is not None:
        where.append(ledger.c.time_us < query.until_us)
    if query.exclude_sandbox is not None:
        where.append((ledger.c.sandbox.is_(None)) | (ledger.c.sandbox != query.exclude_sandbox))
    if query.types is not None:
        where.append(ledger.c.type.in_(list(query.types)))
    if query.protocol is not None:
        where.append(ledger.c.protocol == query.protocol)
    if query.after_seq is not None:
        where.append(ledger.c.seq > query.after_seq)
    return where


def in_sql(query: TimelineQuery) -> bool:
    return query.kind is None and query.source is None


def timeline(connection: Connection, query: TimelineQuery) -> list[Entry]:
    statement = select(ledger).where(*conditions(query)).order_by(ledger.c.time_us, ledger.c.seq)
    if query.newest is not None and in_sql(query):
        # Rows after a seq (a live view's poll) are newest by seq: a range of the primary
        # key, not a walk down the time index past every older row.
        newest_first = (
            (ledger.c.seq.desc(),)
            if query.after_seq is not None
            else (ledger.c.time_us.desc(), ledger.c.seq.desc())
        )
        statement = statement.order_by(None).order_by(*newest_first)
        newest = [
            Entry(**row._mapping) for row in connection.execute(statement.limit(query.newest))
        ]
        return newest[::-1]
    found = (Entry(**row._mapping) for row in connection.execute(statement))
    kept = [entry for entry in found if query.keeps(entry)]
    return kept if query.newest is None else kept[-query.newest :]


def timeline_page(
    connection: Connection, query: TimelineQuery, after: tuple[int, int] | None, size: int
) -> tuple[list[Entry], tuple[int, int] | None]:
    """The next `size` rows in timeline order after the (time, seq) key `after`: the kept
    entries, and the key to go on from (None at the end)."""
    statement = select(ledger).where(*conditions(query))
    if after is not None:
        time_us, seq = after
        statement = statement.where(at_or_after(time_us, seq + 1))
    read = [
        Entry(**row._mapping)
        for row in connection.execute(
            statement.order_by(ledger.c.time_us, ledger.c.seq).limit(size)
        )
    ]
    onward = (read[-1].time_us, read[-1].seq) if len(read) == size else None
    return [entry for entry in read if query.keeps(entry)], onward


@dataclass(slots=True)
class Incident:
    """A burst of one sandbox's hits and what followed them."""

    sandbox: str
    entries: list[Entry] = field(default_factory=list)
    hits: list[Entry] = field(default_factory=list)
    # Set when read by `find_incident`: the rows of the whole incident, and whether only
    # its first rows (and its alert events) were read.
    span: list[ColumnElement[bool]] = field(default_factory=list)
    cut: bool = False

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        if entry.type == "hit":
            self.hits.append(entry)

    @property
    def id(self) -> str:
        return f"in-{self.hits[0].seq}"

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
        found += [
            source
            for e in self.hits
            if bursts.MARKER in e.data
            for source in bursts.sources_of(e.evidence)
        ]
        return list(dict.fromkeys(found))

    @property
    def canaries(self) -> list[str]:
        return list(dict.fromkeys(entry.canary_id for entry in self.hits if entry.canary_id))

    @property
    def follow_up(self) -> list[Entry]:
        """Alert events after the first hit: pages, failures, digests, escalations, acks."""
        return [entry for entry in self.entries if entry.type.startswith("alert_")]


def opens(incident: Incident | None, hit: Entry, gap_us: int) -> bool:
    """Whether `hit` starts a new incident after `incident` (its sandbox's open one)."""
    return incident is None or hit.time_us - incident.last_us > gap_us


def incidents(entries: Iterable[Entry], gap_us: int) -> list[Incident]:
    """Group time-ordered entries into incidents per sandbox, split by quiet gaps.

    `starts` is the same rule in SQL.
    """
    current: dict[str, Incident] = {}
    found: list[Incident] = []
    for entry in entries:
        sandbox = entry.sandbox
        if sandbox is None:
            continue
        open_incident = current.get(sandbox)
        if entry.type == "hit" and opens(open_incident, entry, gap_us):
            open_incident = current[sandbox] = Incident(sandbox)
            found.append(open_incident)
        if open_incident is not None:
            open_incident.add(entry)
    return found


def starts(gap_us: int, *where: ColumnElement[bool]) -> Subquery:
    """Hits (of the rows `where` picks) with a column `opens`: whether the hit starts an
    incident, the rule of `incidents` computed by the database."""
    previous = func.lag(ledger.c.time_us).over(
        partition_by=ledger.c.sandbox, order_by=(ledger.c.time_us, ledger.c.seq)
    )
    return (
        select(
            ledger.c.seq,
            ledger.c.sandbox,
            ledger.c.time_us,
            or_(previous.is_(None), ledger.c.time_us - previous > gap_us).label("opens"),
        )
        .where(ledger.c.type == "hit", ledger.c.sandbox.is_not(None), *where)
        .subquery()
    )


def query_incidents(connection: Connection, query: TimelineQuery, gap_us: int) -> list[Incident]:
    """The incidents of the entries `query` picks, grouped from all of them; with `newest`,
    the newest that many (`activity.newest_incidents` reads only those, where SQL can pick
    the entries)."""
    found = incidents(timeline(connection, replace(query, newest=None)), gap_us)
    return found if query.newest is None else found[-query.newest :]


def find_incident(
    connection: Connection, incident_id: str, gap_us: int, rows: int | None = None
) -> Incident | None:
    """The incident `in-<seq>` holding hit seq (whose first hit it is, for its own id), or None.

    Reads only that incident's rows: the hits before it are counted by the
    database to find where it starts, and where the next one starts bounds it.
    With `rows`, only its first that many rows and its alert events are read;
    `Incident.span` then selects the whole incident for summing in SQL.
    """
    try:
        seq = int(incident_id.removeprefix("in-"))
    except ValueError:
        return None
    if not 0 < seq < 2**63:
        return None
    hit = connection.execute(
        select(ledger.c.sandbox, ledger.c.time_us).where(
            ledger.c.seq == seq, ledger.c.type == "hit", ledger.c.sandbox.is_not(None)
        )
    ).first()
    if hit is None:
        return None
    own = ledger.c.sandbox == hit.sandbox
    earlier = starts(gap_us, own, at_or_before(hit.time_us, seq))
    first_seq, first_us = connection.execute(
        select(earlier.c.seq, earlier.c.time_us)
        .where(earlier.c.opens)
        .order_by(earlier.c.time_us.desc(), earlier.c.seq.desc())
        .limit(1)
    ).one()
    later = starts(gap_us, own, at_or_after(first_us, first_seq))
    following = connection.execute(
        select(later.c.time_us, later.c.seq)
        .where(later.c.opens, later.c.seq != first_seq)
        .order_by(later.c.time_us, later.c.seq)
        .limit(1)
    ).first()
    span = span_of(
        own,
        start=(first_us, first_seq),
        following=None if following is None else (following.time_us, following.seq),
    )
    statement = select(ledger).where(*span).order_by(ledger.c.time_us, ledger.c.seq)
    incident = Incident(hit.sandbox, span=span)
    bound = None if rows is None else rows + 1
    read = [Entry(**row._mapping) for row in connection.execute(statement.limit(bound))]
    if rows is not None and len(read) > rows:
        incident.cut = True
        read = read[:rows]
        last = (read[-1].time_us, read[-1].seq)
        read += [
            Entry(**row._mapping)
            for row in connection.execute(
                statement.where(
                    ledger.c.type.startswith("alert_", autoescape=True),
                    at_or_after(last[0], last[1] + 1),
                )
            )
        ]
    for entry in read:
        incident.add(entry)
    return incident


def span_of(
    *where: ColumnElement[bool], start: tuple[int, int], following: tuple[int, int] | None
) -> list[ColumnElement[bool]]:
    """The rows `where` picks of an incident that starts at the (time, seq) `start`, up to
    the next one's `following` start, if there is one."""
    span = [*where, at_or_after(*start)]
    if following is not None:
        span.append(at_or_before(following[0], following[1] - 1))
    return span


def at_or_before(time_us: int, seq: int) -> ColumnElement[bool]:
    """Rows at or before (time, seq) in timeline order (the time bound alone is indexed)."""
    return and_(ledger.c.time_us <= time_us, or_(ledger.c.time_us < time_us, ledger.c.seq <= seq))


def at_or_after(time_us: int, seq: int) -> ColumnElement[bool]:
    """Rows at or after (time, seq) in timeline order."""
    return and_(ledger.c.time_us >= time_us, or_(ledger.c.time_us > time_us, ledger.c.seq >= seq))
