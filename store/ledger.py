"""The ledger: one append-only, hash-chained table of everything that happened.

Each entry's hash is SHA-256 over a canonical JSON encoding of its fields and
the previous entry's hash, so changing, deleting, inserting or reordering a
row breaks the chain from that row on. Appending locks the single head row
first: on SQLite that takes the database write lock, on PostgreSQL a row
lock, so writers in several processes or on several nodes extend one chain.
"""

import hashlib
import json
import re
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from store import bursts
from store.clock import to_iso as _iso
from store.prepared import Prepared
from store.schema import ledger, ledger_head

GENESIS = "0" * 64
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class Event:
    """Something to append: its type, when, where, and its evidence."""

    type: str
    time_us: int
    node: str
    canary_id: str | None = None
    sandbox: str | None = None
    protocol: str | None = None
    source: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    """A committed ledger row."""

    seq: int
    time_us: int
    type: str
    canary_id: str | None
    sandbox: str | None
    protocol: str | None
    source: str | None
    node: str
    data: str
    prev_hash: str
    hash: str

    @property
    def evidence(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.data)
        return loaded

    @property
    def aggregate(self) -> bool:
        """Whether this row may be an aggregate hit, told without parsing its data: sandbox
        text cannot hold the marker unescaped, and readers of an aggregate's fields take them
        from the data's top level."""
        return self.type == "hit" and bursts.MARKER in self.data

    @property
    def hits(self) -> int:
        """How many hits this row accounts for: none, one, or an aggregate's count."""
        if self.type != "hit":
            return 0
        return bursts.hits_in(self.evidence) if self.aggregate else 1

    @property
    def source_ip(self) -> str | None:
        return split_source(self.source)[0]

    @property
    def source_port(self) -> int | None:
        port = self.evidence.get("source_port") if self.source else None
        if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535:
            return port
        return split_source(self.source)[1]


def split_source(source: str | None) -> tuple[str | None, int | None]:
    """Address and port of a `source` column: an address (the port is in the data), or
    `ip:port` / `[ipv6]:port` as rows written before the port had its own field."""
    if not source:
        return None, None
    if source.startswith("["):
        host, _, port = source[1:].partition("]:")
        return host, _port(port)
    if source.count(":") == 1:
        host, _, port = source.partition(":")
        return host, _port(port)
    return source, None


def _port(text: str) -> int | None:
    return int(text) if _PORT.fullmatch(text) and int(text) <= 65535 else None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of walking the chain."""

    count: int
    head_seq: int
    head_hash: str
    bad_seq: int | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


def canonical(data: Mapping[str, Any]) -> str:
    # ASCII: sandbox-controlled text may hold lone surrogates (aiosmtpd's surrogateescape),
    # which no database encoding accepts; as \u escapes they store, hash and round-trip.
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(
    seq: int,
    time_us: int,
    type_: str,
    canary_id: str | None,
    sandbox: str | None,
    protocol: str | None,
    source: str | None,
    node: str,
    data: str,
    prev_hash: str,
) -> str:
    fields = [seq, time_us, type_, canary_id, sandbox, protocol, source, node, data, prev_hash]
    encoded = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()


# Every hit's commit runs these, in front of its answer: compiled once and run by the
# driver (`store.prepared`). The first is a no-op write that returns the head: it takes
# the write lock (SQLite) or the head's row lock (PostgreSQL) before the head is read,
# so two writers can never both extend the same head.
_TAKE_HEAD = Prepared(
    update(ledger_head)
    .where(ledger_head.c.id == 1)
    .values(seq=ledger_head.c.seq)
    .returning(ledger_head.c.seq, ledger_head.c.hash)
)
_READ_HEAD = select(ledger_head.c.seq, ledger_head.c.hash).where(ledger_head.c.id == 1)
_INSERT = Prepared(ledger.insert())
_MOVE_HEAD = Prepared(
    update(ledger_head)
    .where(ledger_head.c.id == 1)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)


def append(connection: Connection, events: Sequence[Event]) -> list[Entry]:
    """Chain `events` onto the ledger inside the caller's transaction."""
    if not events:
        return []
    [(head_seq, prev)] = _TAKE_HEAD.execute(connection)
    entries = []
    for offset, event in enumerate(events, start=1):
        seq = head_seq + offset
        data = canonical(event.data)
        digest = entry_hash(
            seq,
            event.time_us,
            event.type,
            event.canary_id,
            event.sandbox,
            event.protocol,
            event.source,
            event.node,
            data,
            prev,
        )
        entries.append(entry_of(event, seq, data, prev, digest))
        prev = digest
    _INSERT.execute_many(connection, [_as_row(entry) for entry in entries])
    _MOVE_HEAD.execute(connection, {"new_seq": entries[-1].seq, "new_hash": entries[-1].hash})
    return entries


def entry_of(event: Event, seq: int, data: str, prev_hash: str, digest: str) -> Entry:
    """The entry `event` becomes at `seq`, with its canonical `data` and its place in the chain."""
    return Entry(
        seq,
        event.time_us,
        event.type,
        event.canary_id,
        event.sandbox,
        event.protocol,
        event.source,
        event.node,
        data,
        prev_hash,
        digest,
    )


def _as_row(entry: Entry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in Entry.__slots__}


def head(connection: Connection) -> tuple[int, str]:
    seq, digest = connection.execute(_READ_HEAD).one()
    return int(seq), str(digest)


def entries(connection: Connection, upto: int | None = None) -> Generator[Entry]:
    """Every entry in chain order (up to seq `upto`), streamed."""
    query = select(ledger).order_by(ledger.c.seq)
    if upto is not None:
        query = query.where(ledger.c.seq <= upto)
    with connection.execution_options(yield_per=2000).execute(query) as result:
        for row in result:
            yield Entry(**row._mapping)


def chunk(connection: Connection, after: int, upto: int, size: int) -> list[Entry]:
    """Up to `size` entries after seq `after` and none past `upto`, in chain order."""
    query = (
        select(ledger)
        .where(ledger.c.seq > after, ledger.c.seq <= upto)
        .order_by(ledger.c.seq)
        .limit(size)
    )
    return [Entry(**row._mapping) for row in connection.execute(query)]


def verify(connection: Connection) -> Verdict:
    """Walk the whole chain; name the first row that does not follow from its predecessor.

    The walk stops at the head read before it, so rows appended meanwhile are
    not mistaken for tampering; rows beyond that head which no append put
    there (an append moves the head in the same transaction) are.
    """
    last = select(func.max(ledger.c.seq)).scalar_subquery()
    head_seq, head_hash, last_seq = connection.execute(
        select(ledger_head.c.seq, ledger_head.c.hash, last).where(ledger_head.c.id == 1)
    ).one()
    with closing(entries(connection, upto=head_seq)) as chain:
        verdict = walk(chain, (head_seq, head_hash))
    if verdict.intact and (last_seq or 0) > head_seq:
        return _broken(
            head_seq, head_hash, head_seq + 1, f"row {head_seq + 1} lies beyond the head"
        )
    return verdict


def export_line(entry: Entry) -> str:
    """One entry as a JSON line: every hashed field as stored, and the time for people."""
    row = _as_row(entry)
    return json.dumps({**row, "time": _iso(entry.time_us)}, ensure_ascii=False)


def read_export(lines: Iterable[str]) -> Iterator[Entry]:
    """Entries back from `export_line` output; raises ValueError naming a malformed line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            yield Entry(**{name: fields[name] for name in Entry.__slots__})
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"line {number} is not a ledger entry: {error}") from None


def missed_anchor(connection: Connection, anchors: Iterable[tuple[int, str]]) -> str | None:
    """The first saved head the ledger no longer contains, described; None if all are there."""
    for seq, digest in anchors:
        if (seq, digest) == (0, GENESIS):  # the empty chain's head: every chain holds it
            continue
        found = connection.execute(select(ledger.c.hash).where(ledger.c.seq == seq)).scalar()
        if found != digest:
            state = "missing" if found is None else f"has hash {found[:16]}…"
            return f"anchored head {seq} ({digest[:16]}…) is not in the ledger: row {seq} {state}"
    return None


def walk(chain: Iterable[Entry], expected_head: tuple[int, str] | None = None) -> Verdict:
    """Check `chain` links from the genesis; with `expected_head`, that it ends there."""
    prev = GENESIS
    expected = 1
    for entry in chain:
        if entry.seq != expected:
            kind = "missing" if entry.seq > expected else "out of order"
            return _broken(expected - 1, prev, entry.seq, f"row {expected} is {kind}")
        if entry.prev_hash != prev:
            return _broken(expected - 1, prev, entry.seq, "prev_hash does not match the row before")
        recomputed = entry_hash(
            entry.seq,
            entry.time_us,
            entry.type,
            entry.canary_id,
            entry.sandbox,
            entry.protocol,
            entry.source,
            entry.node,
            entry.data,
            entry.prev_hash,
        )
        if recomputed != entry.hash:
            return _broken(expected - 1, prev, entry.seq, "contents do not match its hash")
        prev = entry.hash
        expected += 1
    count = expected - 1
    if expected_head is None:
        return Verdict(count, count, prev)
    head_seq, head_hash = expected_head
    if (head_seq, head_hash) != (count, prev):
        return _broken(
            count,
            prev,
            count + 1 if head_seq > count else head_seq,
            f"chain ends at row {count} but the head says row {head_seq}",
        )
    return Verdict(count, count, prev)


def _broken(count: int, prev: str, bad_seq: int, problem: str) -> Verdict:
    return Verdict(count, count, prev, bad_seq=bad_seq, problem=problem)
