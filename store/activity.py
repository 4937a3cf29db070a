"""What each sandbox's hits add up to: counted by the database, not by reading the ledger.

A sandbox's summary (hits, incidents, channels, sources, last hit) stays one
query's worth of work however long its timeline grows; only aggregate rows,
a few a second of a burst, and the distinct sources are read here.
"""

import json
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Connection, func, or_, select

from store import bursts
from store.ledger import Entry, split_source
from store.schema import ledger
from store.timeline import (
    Incident,
    TimelineQuery,
    conditions,
    span_of,
    starts,
)

# A sandbox's sources named in its summary; the rest are counted.
SOURCES_NAMED = 20


@dataclass(slots=True)
class Activity:
    """One sandbox's hits, summed."""

    sandbox: str
    hits: int
    last_us: int
    incidents: int = 0
    channels: set[str] = field(default_factory=set)
    sources: dict[str, None] = field(default_factory=dict)
    canaries: dict[str, None] = field(default_factory=dict)

    @property
    def named_sources(self) -> list[str]:
        return list(self.sources)[:SOURCES_NAMED]


def activity(
    connection: Connection, gap_us: int, *where: ColumnElement[bool], exclude: str | None = None
) -> dict[str, Activity]:
    """Every sandbox with a hit among the rows `where` picks (but `exclude`), by name."""
    hits = (ledger.c.type == "hit", ledger.c.sandbox.is_not(None), *where)
    if exclude is not None:
        hits += (ledger.c.sandbox != exclude,)
    found = {
        sandbox: Activity(sandbox, int(count), int(last))
        for sandbox, count, last in connection.execute(
            select(ledger.c.sandbox, func.count(), func.max(ledger.c.time_us))
            .where(*hits)
            .group_by(ledger.c.sandbox)
        )
    }
    opened = starts(gap_us, *hits)
    for sandbox, count in connection.execute(
        select(opened.c.sandbox, func.count()).where(opened.c.opens).group_by(opened.c.sandbox)
    ):
        found[sandbox].incidents = int(count)
    for sandbox, protocol in connection.execute(
        select(ledger.c.sandbox, ledger.c.protocol).where(*hits).distinct()
    ):
        if protocol:
            found[sandbox].channels.add(protocol)
    for sandbox, source in connection.execute(
        select(ledger.c.sandbox, ledger.c.source).where(*hits).distinct()
    ):
        address = split_source(source)[0]
        if address is not None:
            found[sandbox].sources[address] = None
    first_hit = func.min(ledger.c.seq)
    for sandbox, canary_id, _ in connection.execute(
        select(ledger.c.sandbox, ledger.c.canary_id, first_hit)
        .where(*hits, ledger.c.canary_id.is_not(None))
        .group_by(ledger.c.sandbox, ledger.c.canary_id)
        .order_by(first_hit)
    ):
        found[sandbox].canaries[canary_id] = None
    aggregates = select(ledger.c.sandbox, ledger.c.data).where(
        *hits, ledger.c.data.contains(bursts.MARKER, autoescape=True)
    )
    for sandbox, data in connection.execute(aggregates):
        loaded = json.loads(data)
        summed = found[sandbox]
        summed.hits += bursts.hits_in(loaded) - 1
        summed.channels.update(bursts.protocols_of(loaded))
        summed.sources.update(dict.fromkeys(bursts.sources_of(loaded)))
    return found


def newest_incidents(
    connection: Connection, query: TimelineQuery, gap_us: int, count: int
) -> list[tuple[Incident, Activity]]:
    """The newest `count` incidents of the entries `query` picks (filters SQL expresses),
    oldest first: each with its first hit and alert events, and its hits summed by the
    database, so a long incident costs its summary, not its rows."""
    where = conditions(query)
    opened = starts(gap_us, *where)
    heads = connection.execute(
        select(opened.c.seq, opened.c.sandbox, opened.c.time_us)
        .where(opened.c.opens)
        .order_by(opened.c.time_us.desc(), opened.c.seq.desc())
        .limit(count)
    ).all()
    # Newest first: a sandbox's next incident, which ends this one, was seen already.
    following: dict[str, tuple[int, int]] = {}
    found = []
    for seq, sandbox, time_us in heads:
        span = span_of(
            *where,
            ledger.c.sandbox == sandbox,
            start=(time_us, seq),
            following=following.get(sandbox),
        )
        following[sandbox] = (time_us, seq)
        rows = (
            select(ledger)
            .where(
                *span,
                or_(ledger.c.seq == seq, ledger.c.type.startswith("alert_", autoescape=True)),
            )
            .order_by(ledger.c.time_us, ledger.c.seq)
        )
        incident = Incident(sandbox, span=span)
        for row in connection.execute(rows):
            incident.add(Entry(**row._mapping))
        found.append((incident, activity(connection, gap_us, *span)[sandbox]))
    return found[::-1]
