"""Bursts: past a threshold, one canary's hits fold into aggregate rows.

A leaked token makes every query a genuine hit, so no junk defence applies.
Recorded one by one, a flood of them would grow the ledger without bound and
queue in front of every other canary's first hit. So the first `threshold`
hits of a canary in each `window` are recorded one by one, and the rest of
that window's hits (and the evidence that follows them) join the canary's
pending aggregate: one row committed every `interval`, that counts them (the
format is `store.bursts`). Nothing is dropped, and record-then-answer holds:
a folded hit is answered when the row that counts it is committed.

Bounds: at most `max_waiting` answers are held at once for folded hits whose
row is not yet committed, across all canaries (a slow store cannot make the
node hold more); a hit past that is still counted, as unanswered, and
answered as not recorded (the client's retry gets another chance). The data
hits carried is kept up to `keep_bytes` per window for each protocol, and as
much again for the evidence that followed them, so a cheap DNS flood cannot
crowd out a mail's subject; a digest and the size of all of it are kept too.
Sources, kinds and facts are listed up to a cap, each value cut short.

An aggregate names no single source or client: routing and ignore rules see
its `facts`, every (source, protocol, user agent) it counts, so one hit from
an ignored monitor cannot carry a burst from elsewhere into silence.
"""

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from store import bursts
from store.clock import now_us
from store.ledger import Entry, Event
from store.writer import Done, LedgerWriter, append_through

# Sources, kinds (qtypes, methods) and facts listed by name in one row; the rest are counted.
MAX_LISTED = 32
# How much of a kind, a user agent or one piece of evidence a row keeps.
MAX_VALUE = 64
MAX_EVIDENCE = 1024
# Distinct sources counted exactly per window; past it the count is a lower bound.
MAX_SOURCES_COUNTED = 4096
# Where each listener's hit evidence keeps the data a hit carried, and what kind of hit it is.
_CARRIED = ("left_labels", "target", "subject", "rcpt")
_KINDS = ("qtype", "method", "trigger")
# What an evidence event (a message, a body) says, kept as one line.
_EVIDENCE = ("subject", "mail_from", "rcpt_tos", "size", "sha256", "body_size", "body_sha256")
# The canary's own fields, as every hit of it carries them.
_CANARY_KEYS = ("kind", "location", "labels", "severity")


class BurstOptions(BaseModel):
    """`[bursts]`: when one canary's hits fold into aggregate rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    window: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    interval: Annotated[float, Field(ge=0.001, le=10)] = 0.1
    keep_bytes: Annotated[int, Field(ge=0, le=16 << 20)] = 64 << 10
    max_waiting: Annotated[int, Field(ge=1, le=1 << 20)] = 4096


Fact = tuple[str, str, str]


@dataclass(slots=True)
class _Aggregate:
    """The hits of one canary waiting for their row."""

    template: Event
    first_us: int
    last_us: int = 0
    hits: int = 0
    evidence: int = 0
    unanswered: int = 0
    evidence_unanswered: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    other_sources: int = 0
    protocols: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    facts: Counter[Fact] = field(default_factory=Counter)
    other_facts: int = 0
    data: list[dict[str, str]] = field(default_factory=list)
    data_bytes: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    waiting: list[Done] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Window:
    """One canary's hits since its window began."""

    started: float
    started_us: int
    recorded: int = 0
    folded: int = 0
    lost: int = 0
    parts: int = 0
    sources: set[str] = field(default_factory=set)
    data_bytes: int = 0
    # Bytes of carried data kept, per protocol and for evidence.
    kept: Counter[str] = field(default_factory=Counter)
    digest: Any = field(default_factory=hashlib.sha256)
    canary: dict[str, Any] = field(default_factory=dict)
    pending: _Aggregate | None = None

    @property
    def folding(self) -> bool:
        return self.pending is not None or self.folded > 0

    def count_source(self, source: str) -> None:
        if len(self.sources) < MAX_SOURCES_COUNTED:
            self.sources.add(source)


class BurstFolder:
    """Where a node's listeners send what they record: single rows, or aggregates in a burst."""

    def __init__(
        self,
        writer: LedgerWriter,
        options: BurstOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writer = writer
        self._options = options or BurstOptions()
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._swept = clock()
        # Answers held for folded hits whose row is not committed yet, across all canaries.
        self.held = 0
        # For /metrics: hits counted in aggregates, aggregate rows, hits counted unanswered.
        self.folded = 0
        self.aggregates = 0
        self.unanswered = 0

    @property
    def active(self) -> int:
        """Canaries whose hits fold now."""
        return sum(1 for window in self._windows.values() if window.folding)

    def submit(self, event: Event, done: Done) -> None:
        """Record `event`: `done` gets the entry that accounts for it, or None."""
        canary_id = event.canary_id
        if canary_id is None:
            self._writer.submit(event, done)
            return
        window = self._window(canary_id)
        window.count_source(event.source or "")
        if event.type == "hit":
            window.canary = {key: event.data[key] for key in _CANARY_KEYS if key in event.data}
        if window.recorded >= self._options.threshold:
            self._fold(canary_id, window, event, done)
            return
        if event.type == "hit":
            window.recorded += 1
        self._writer.submit(event, done)

    async def append(self, *events: Event) -> list[Entry]:
        """Record `events`; the entries that account for them, or NotDurable."""
        return await append_through(self.submit, events)

    def close(self) -> None:
        """Submit every pending aggregate now (the node is stopping)."""
        for canary_id, window in list(self._windows.items()):
            self._flush(canary_id, window)

    def _window(self, canary_id: str) -> _Window:
        now = self._clock()
        window = self._windows.get(canary_id)
        if window is None or now - window.started >= self._options.window:
            if window is not None:
                self._flush(canary_id, window)
            window = self._windows[canary_id] = _Window(now, now_us())
            if now - self._swept >= self._options.window:
                self._sweep(now)
        return window

    def _sweep(self, now: float) -> None:
        self._swept = now
        for canary_id, window in list(self._windows.items()):
            if now - window.started >= self._options.window and window.pending is None:
                del self._windows[canary_id]

    def _fold(self, canary_id: str, window: _Window, event: Event, done: Done) -> None:
        aggregate = window.pending
        if aggregate is None:
            aggregate = window.pending = _Aggregate(event, event.time_us)
            aggregate.timer = asyncio.get_running_loop().call_later(
                self._options.interval, self._flush, canary_id, window
            )
        self._count(aggregate, window, event)
        if self.held < self._options.max_waiting:
            self.held += 1
            aggregate.waiting.append(done)
        elif event.type == "hit":
            aggregate.unanswered += 1
            self.unanswered += 1
            done(None)
        else:
            aggregate.evidence_unanswered += 1
            done(None)

    def _count(self, aggregate: _Aggregate, window: _Window, event: Event) -> None:
        aggregate.last_us = max(aggregate.last_us, event.time_us)
        if event.type == "hit":
            aggregate.hits += 1
            window.folded += 1
        else:
            aggregate.evidence += 1
        source = event.source or ""
        if not _count_listed(aggregate.sources, source):
            aggregate.other_sources += 1
        protocol = event.protocol or ""
        aggregate.protocols[protocol] += 1
        if event.type == "hit":
            kind = next((str(event.data[key]) for key in _KINDS if event.data.get(key)), "")
            _count_listed(aggregate.kinds, kind[:MAX_VALUE])
            agent = str(event.data.get("user_agent") or "")[:MAX_VALUE]
            if not _count_listed(aggregate.facts, (source, protocol, agent)):
                aggregate.other_facts += 1
            carried, budget = _carried(event.data), protocol
        else:
            carried, budget = _evidence(event.data), "evidence"
        if not carried:
            return
        raw = carried.encode("utf-8", "surrogatepass")
        window.digest.update(len(raw).to_bytes(4, "big") + raw)
        window.data_bytes += len(raw)
        aggregate.data_bytes += len(raw)
        sample = {"data": carried} if event.type == "hit" else {"evidence": carried}
        decoded = event.data.get("decoded")
        if isinstance(decoded, str) and decoded:
            sample["decoded"] = decoded
        cost = sum(len(text.encode("utf-8", "surrogatepass")) for text in sample.values())
        if window.kept[budget] + cost <= self._options.keep_bytes:
            window.kept[budget] += cost
            aggregate.kept[budget] += cost
            aggregate.data.append(sample)

    def _flush(self, canary_id: str, window: _Window) -> None:
        aggregate = window.pending
        if aggregate is None:
            return
        window.pending = None
        if aggregate.timer is not None:
            aggregate.timer.cancel()
        window.parts += 1
        self.aggregates += 1
        self.folded += aggregate.hits
        waiting = aggregate.waiting

        def committed(entry: Entry | None) -> None:
            self.held -= len(waiting)
            if entry is None:
                # Not in the ledger: later rows' totals must not count it.
                window.folded -= aggregate.hits
                window.lost += aggregate.hits
                window.data_bytes -= aggregate.data_bytes
                window.kept -= aggregate.kept
            for done in waiting:
                done(entry)

        self._writer.submit(_row(canary_id, aggregate, window), committed)


def _count_listed(counts: "Counter[Any]", value: Any) -> bool:
    """Count `value` if it is listed already or there is room for it; whether it was."""
    if value in counts or len(counts) < MAX_LISTED:
        counts[value] += 1
        return True
    return False


def _evidence(data: Mapping[str, Any]) -> str:
    parts = [f"{key}={data[key]}" for key in _EVIDENCE if data.get(key) not in (None, "", [])]
    return "; ".join(parts)[:MAX_EVIDENCE]


def _carried(data: Mapping[str, Any]) -> str:
    for key in _CARRIED:
        value = data.get(key)
        if isinstance(value, list):
            value = ".".join(str(part) for part in value)
        if isinstance(value, str) and value:
            return value
    return ""


def _row(canary_id: str, aggregate: _Aggregate, window: _Window) -> Event:
    template = aggregate.template
    data: dict[str, Any] = dict(window.canary)
    data["source_port"] = template.data.get("source_port", 0)
    data[bursts.KEY] = {
        "window_us": window.started_us,
        "part": window.parts,
        "count": aggregate.hits,
        "evidence": aggregate.evidence,
        "unanswered": aggregate.unanswered,
        "evidence_unanswered": aggregate.evidence_unanswered,
        "first_us": aggregate.first_us,
        "last_us": aggregate.last_us,
        "sources": dict(aggregate.sources.most_common()),
        "other_sources": aggregate.other_sources,
        "protocols": dict(aggregate.protocols.most_common()),
        "kinds": dict(aggregate.kinds.most_common()),
        "facts": [[*fact, count] for fact, count in aggregate.facts.most_common()],
        "other_facts": aggregate.other_facts,
        "data": aggregate.data,
        "data_bytes": aggregate.data_bytes,
        "total": {
            "first_us": window.started_us,
            "hits": window.recorded + window.folded,
            "recorded": window.recorded,
            "folded": window.folded,
            "lost": window.lost,
            "sources": len(window.sources),
            "data_bytes": window.data_bytes,
            "kept_bytes": window.kept.total(),
            "sha256": window.digest.hexdigest(),
        },
    }
    single = len(aggregate.protocols) == 1
    return Event(
        type="hit" if aggregate.hits else "evidence",
        time_us=aggregate.last_us,
        node=template.node,
        canary_id=canary_id,
        sandbox=template.sandbox,
        protocol=template.protocol if single else None,
        source=template.source,
        data=data,
    )
