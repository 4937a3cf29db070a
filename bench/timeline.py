"""Timeline benchmark: responder queries over a ledger of 1M synthetic events.

Fills a fresh store (a SQLite file in a temporary directory unless `--url`
names another, empty, database) through `store.ledger.append`, so every row
is hash-chained exactly as in production, in transactions of `--batch`
events. The synthetic ledger spans 30 days ending now: `--sandboxes`
sandboxes (`sbx-0001`...) with `--canaries` canaries each (`cn-<12 hex>`),
activity per sandbox skewed (log-normal weights), events mostly `hit`
(dns/http/smtp evidence shaped like the listeners' own) with some
`alert_opened`, `alert_sent` and `canary_minted`, times increasing overall
with a little per-node jitter. One "incident" sandbox holds exactly
`--incident-events` events: its canaries' mints early on, then a burst of hits
and their alerts, most of them inside one hour on day 20.

It then times `store.timeline.timeline` (the query responders run), each
query `--reps` times on one connection, every repetition its own read
transaction, and reports rows returned, p50 and max in milliseconds:

1. the incident sandbox's whole timeline;
2. the incident sandbox over the incident hour;
3. the incident's most-hit canary, whole timeline;
4. the whole ledger (every sandbox) over the incident hour;
5. the busiest sandbox's whole timeline (the worst case the skew produced);

and `store.ledger.verify` (the full chain walk) once. Also printed: fill time
and events/s (generating the events, hashing, inserting, committing), the
database size on disk (SQLite: main file + WAL) and the versions of SQLite,
SQLAlchemy and Python. The goal (issue): one sandbox's timeline over 1M events
in < 100 ms. `--plans` adds each query's SQL plan as the database reports it.

Usage: python bench/timeline.py [--events N] [--quick] [--url URL] [--plans]
"""

import argparse
import heapq
import platform
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import sqlalchemy
from dnsbench import markdown_table
from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.engine import make_url

from store import ledger
from store.clock import now_us, to_iso
from store.engine import migrate, open_engine
from store.schema import ledger_head
from store.timeline import TimelineQuery, timeline

DAY_US = 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
SPAN_DAYS = 30
INCIDENT_DAY = 20
INCIDENT_HITS_IN_HOUR = 0.8
INCIDENT_CANARIES_HIT = 6
NODES = ("node-a", "node-b", "node-c")
NODE_JITTER_US = 2_000
ZONE = "canary.example.net"
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
KINDS = ("dns", "dns", "dns", "http", "smtp")
LOCATIONS = (
    "/home/ci/.aws/credentials",
    "/etc/hosts",
    "/srv/app/.env",
    "/root/.ssh/config",
    "/var/www/html/wp-config.php",
    "/home/build/.npmrc",
)
# Background event mix (the incident sandbox has its own).
TYPE_WEIGHTS = {"hit": 0.91, "alert_opened": 0.03, "alert_sent": 0.04, "canary_minted": 0.02}
SEED = 20261124


@dataclass(frozen=True, slots=True)
class Canary:
    id: str
    token: str
    kind: str
    sandbox: str
    location: str


@dataclass(frozen=True, slots=True)
class Fleet:
    """The synthetic world: canaries by sandbox, and activity weights."""

    sandboxes: list[str]
    canaries: dict[str, list[Canary]]
    weights: list[float]


@dataclass(frozen=True, slots=True)
class Incident:
    sandbox: str
    hour_since_us: int
    events: list[ledger.Event]
    top_canary: str


@dataclass(frozen=True, slots=True)
class Timing:
    name: str
    rows: int
    p50_ms: float
    max_ms: float
    sql: str | None = None
    parameters: Any = None


# --- synthetic data ----------------------------------------------------------------------


def make_fleet(rng: random.Random, sandboxes: int, per_sandbox: int) -> Fleet:
    names = [f"sbx-{number:04d}" for number in range(1, sandboxes + 1)]
    canaries: dict[str, list[Canary]] = {}
    for sandbox in names:
        canaries[sandbox] = [
            Canary(
                id=f"cn-{rng.getrandbits(48):012x}",
                token="".join(rng.choices(BASE32, k=26)),
                kind=rng.choice(KINDS),
                sandbox=sandbox,
                location=rng.choice(LOCATIONS),
            )
            for _ in range(per_sandbox)
        ]
    weights = [rng.lognormvariate(0.0, 1.0) for _ in names]
    return Fleet(names, canaries, weights)


def source(rng: random.Random) -> str:
    net = "198.51.100" if rng.random() < 0.7 else "203.0.113"
    return f"{net}.{rng.randint(1, 254)}:{rng.randint(1024, 65535)}"


def hit(rng: random.Random, canary: Canary, time_us: int, peer: str | None = None) -> ledger.Event:
    """A hit shaped like `listeners.base.hit_event` with its listener's evidence."""
    data: dict[str, Any] = {
        "kind": canary.kind,
        "location": canary.location,
        "labels": {},
        "severity": "high",
    }
    protocol = canary.kind
    if canary.kind == "dns":
        left = [f"{rng.getrandbits(32):08x}"] if rng.random() < 0.3 else []
        data |= {
            "qname": ".".join([*left, canary.token, ZONE]),
            "qtype": rng.choice(("A", "A", "AAAA", "TXT")),
            "transport": "udp",
            "left_labels": left,
            "decoded": None,
        }
    elif canary.kind == "http":
        data |= {
            "method": "GET",
            "target": f"/{canary.token}/index.html",
            "http_version": "1.1",
            "host": f"{canary.token}.{ZONE}",
            "headers": [["user-agent", "curl/8.5.0"], ["accept", "*/*"]],
            "found_in": "path",
        }
    else:
        protocol = "smtp"
        data |= {
            "mail_from": "build@ci.internal",
            "rcpt_tos": [f"{canary.token}@{ZONE}"],
            "helo": "ci-runner",
            "tls": False,
        }
    return ledger.Event(
        type="hit",
        time_us=time_us,
        node=rng.choice(NODES),
        canary_id=canary.id,
        sandbox=canary.sandbox,
        protocol=protocol,
        source=peer or source(rng),
        data=data,
    )


def other(rng: random.Random, type_: str, canary: Canary, time_us: int) -> ledger.Event:
    """A non-hit event shaped like the minting and alerting code writes."""
    alert_id = f"al-{rng.getrandbits(48):012x}"
    if type_ == "canary_minted":
        data: dict[str, Any] = {
            "kind": canary.kind,
            "format": "",
            "value": f"{canary.token}.{ZONE}",
            "location": canary.location,
            "labels": {},
            "severity": "high",
        }
    elif type_ == "alert_opened":
        data = {"alert_id": alert_id, "hit_seq": rng.randint(1, 1_000_000), "routes": ["default"]}
    else:
        data = {
            "delivery": rng.randint(1, 100_000),
            "alert_id": alert_id,
            "purpose": "page",
            "route": "default",
            "target": "apprise:0",
            "attempt": 1,
            "error": None,
        }
    return ledger.Event(
        type=type_,
        time_us=time_us,
        node=rng.choice(NODES),
        canary_id=canary.id,
        sandbox=canary.sandbox,
        data=data,
    )


def background(
    rng: random.Random, fleet: Fleet, exclude: str, count: int, start_us: int
) -> Iterator[ledger.Event]:
    """`count` events over SPAN_DAYS from `start_us`, a Poisson stream with node jitter."""
    pool = [sandbox for sandbox in fleet.sandboxes if sandbox != exclude]
    weights = [
        w for sandbox, w in zip(fleet.sandboxes, fleet.weights, strict=True) if sandbox != exclude
    ]
    types = list(TYPE_WEIGHTS)
    type_weights = list(TYPE_WEIGHTS.values())
    mean_gap = SPAN_DAYS * DAY_US / max(count, 1)
    # Draw in chunks: choices() with weights is much cheaper per call than per event.
    chunk = 10_000
    clock = float(start_us)
    for first in range(0, count, chunk):
        size = min(chunk, count - first)
        sandboxes = rng.choices(pool, weights, k=size)
        kinds = rng.choices(types, type_weights, k=size)
        for sandbox, type_ in zip(sandboxes, kinds, strict=True):
            clock += rng.expovariate(1.0 / mean_gap)
            time_us = int(clock) + rng.randint(0, NODE_JITTER_US)
            canary = rng.choice(fleet.canaries[sandbox])
            if type_ == "hit":
                yield hit(rng, canary, time_us)
            else:
                yield other(rng, type_, canary, time_us)


def incident(rng: random.Random, fleet: Fleet, size: int, start_us: int) -> Incident:
    """Exactly `size` events for one sandbox: mints, then a burst of hits and their alerts."""
    sandbox = fleet.sandboxes[len(fleet.sandboxes) // 2]
    canaries = fleet.canaries[sandbox]
    hit_canaries = canaries[: min(INCIDENT_CANARIES_HIT, len(canaries))]
    hits = size - len(canaries) - 2 * len(hit_canaries)
    events = [
        other(rng, "canary_minted", canary, start_us + rng.randint(0, DAY_US))
        for canary in canaries
    ]
    hour = start_us + INCIDENT_DAY * DAY_US
    attackers = [f"203.0.113.{rng.randint(1, 254)}" for _ in range(3)]
    # Most hits land on the first canaries: the attacker found them first.
    focus = [1.0 / (rank + 1) for rank in range(len(hit_canaries))]
    in_hour = int(hits * INCIDENT_HITS_IN_HOUR)
    first_hit: dict[str, int] = {}
    picked = Counter[str]()
    for number in range(hits):
        # Every hit canary gets at least one hit; after that the focus decides.
        if number < len(hit_canaries):
            canary = hit_canaries[number]
        else:
            canary = rng.choices(hit_canaries, focus)[0]
        if number < in_hour:
            time_us = hour + rng.randint(0, HOUR_US - 1)
        else:
            time_us = hour + HOUR_US + rng.randint(0, 3 * DAY_US)
        peer = f"{rng.choice(attackers)}:{rng.randint(1024, 65535)}"
        events.append(hit(rng, canary, time_us, peer))
        first_hit[canary.id] = min(first_hit.get(canary.id, time_us), time_us)
        picked[canary.id] += 1
    for canary in hit_canaries:
        opened = first_hit[canary.id] + rng.randint(1_000, 50_000)
        events.append(other(rng, "alert_opened", canary, opened))
        events.append(other(rng, "alert_sent", canary, opened + rng.randint(100_000, 900_000)))
    events.sort(key=lambda item: item.time_us)
    assert len(events) == size
    return Incident(sandbox, hour, events, picked.most_common(1)[0][0])


# --- fill and measure --------------------------------------------------------------------


def fill(engine: Engine, stream: Iterator[ledger.Event], total: int, batch: int) -> float:
    """Append `total` events from `stream` in transactions of `batch`; return seconds taken."""
    started = time.perf_counter()
    appended = 0
    for _ in range(-(-total // batch)):
        events = list(islice(stream, batch))
        if not events:
            break
        with engine.begin() as connection:
            ledger.append(connection, events)
        appended += len(events)
    assert appended == total, f"appended {appended}, expected {total}"
    return time.perf_counter() - started


def ms(seconds: float) -> float:
    return seconds * 1000.0


def measure(
    connection: Connection,
    captured: list[tuple[str, Any]],
    name: str,
    query: TimelineQuery,
    reps: int,
) -> Timing:
    times: list[float] = []
    rows = 0
    for _ in range(reps):
        captured.clear()
        started = time.perf_counter()
        entries = timeline(connection, query)
        times.append(time.perf_counter() - started)
        connection.rollback()
        rows = len(entries)
    sql, parameters = captured[-1] if captured else (None, None)
    return Timing(name, rows, ms(statistics.median(times)), ms(max(times)), sql, parameters)


def plan(connection: Connection, timing: Timing) -> list[str]:
    if timing.sql is None:
        return []
    explain = "EXPLAIN QUERY PLAN " if connection.dialect.name == "sqlite" else "EXPLAIN "
    result = connection.exec_driver_sql(explain + timing.sql, timing.parameters)
    lines = [str(row[-1]) for row in result]
    connection.rollback()
    return lines


def size_on_disk(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        main = Path(str(url.database))
        wal = main.with_name(main.name + "-wal")
        total = main.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        return f"{total / 2**20:,.0f} MiB (SQLite file + WAL)"
    if url.get_backend_name() == "postgresql":
        with engine.connect() as connection:
            found = connection.exec_driver_sql("SELECT pg_total_relation_size('ledger')").scalar()
        return f"{int(found or 0) / 2**20:,.0f} MiB (ledger table + indexes)"
    return "n/a"


def print_table(timings: Sequence[Timing]) -> None:
    markdown_table(
        ["query", "rows returned", "p50 ms", "max ms"],
        [[t.name, f"{t.rows:,}", f"{t.p50_ms:.1f}", f"{t.max_ms:.1f}"] for t in timings],
    )


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000, help="ledger events to fill")
    parser.add_argument("--quick", action="store_true", help="100k events")
    parser.add_argument("--url", help="SQLAlchemy URL of an empty store (default: temp SQLite)")
    parser.add_argument("--sandboxes", type=int, default=2000, help="sandboxes")
    parser.add_argument("--canaries", type=int, default=10, help="canaries per sandbox")
    parser.add_argument("--incident-events", type=int, default=500, help="incident sandbox size")
    parser.add_argument("--reps", type=int, default=20, help="repetitions per query")
    parser.add_argument("--batch", type=int, default=10_000, help="events per append transaction")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    parser.add_argument("--plans", action="store_true", help="print each query's plan")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.events = min(args.events, 100_000)
    minimum = args.canaries + 3 * min(INCIDENT_CANARIES_HIT, args.canaries)
    if args.sandboxes < 2 or args.canaries < 1 or args.reps < 1 or args.batch < 1:
        parser.error("--sandboxes >= 2, --canaries >= 1, --reps >= 1 and --batch >= 1")
    if not minimum <= args.incident_events < args.events:
        parser.error(f"--incident-events must be at least {minimum} and below --events")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="oobwatch-timeline-"))
    url = args.url or f"sqlite:///{work / 'ledger.db'}"
    engine = open_engine(url)
    captured: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool
    ) -> None:
        if not many:
            captured.append((statement, parameters))

    try:
        migrate(engine)
        with engine.connect() as connection:
            if connection.execute(select(ledger_head.c.seq)).scalar():
                print(
                    f"{make_url(url).render_as_string()} already has a ledger; pass an empty store"
                )
                return 2

        rng = random.Random(args.seed)
        fleet = make_fleet(rng, args.sandboxes, args.canaries)
        start_us = now_us() - SPAN_DAYS * DAY_US
        burst = incident(rng, fleet, args.incident_events, start_us)
        rest = background(rng, fleet, burst.sandbox, args.events - args.incident_events, start_us)
        stream = heapq.merge(rest, burst.events, key=lambda item: item.time_us)
        fill_s = fill(engine, stream, args.events, args.batch)

        with engine.connect() as connection:
            busiest, busiest_rows = connection.exec_driver_sql(
                "SELECT sandbox, count(*) FROM ledger GROUP BY sandbox ORDER BY 2 DESC LIMIT 1"
            ).one()
            connection.rollback()
            hour = (burst.hour_since_us, burst.hour_since_us + HOUR_US)
            queries = [
                ("incident sandbox, whole timeline", TimelineQuery(sandbox=burst.sandbox)),
                (
                    "incident sandbox, 1-hour window",
                    TimelineQuery(sandbox=burst.sandbox, since_us=hour[0], until_us=hour[1]),
                ),
                ("one canary, whole timeline", TimelineQuery(canary_id=burst.top_canary)),
                (
                    "whole ledger, 1-hour window",
                    TimelineQuery(since_us=hour[0], until_us=hour[1]),
                ),
                (
                    f"busiest sandbox ({busiest_rows:,} events), whole",
                    TimelineQuery(sandbox=busiest),
                ),
            ]
            timings = [
                measure(connection, captured, name, query, args.reps) for name, query in queries
            ]
            started = time.perf_counter()
            verdict = ledger.verify(connection)
            verify_s = time.perf_counter() - started
            connection.rollback()
            assert verdict.intact, verdict.problem
            assert verdict.count == args.events, verdict.count
            plans = [plan(connection, timing) for timing in timings] if args.plans else []

        timings.append(
            Timing(
                f"ledger.verify (walks {verdict.count:,} rows)",
                verdict.count,
                ms(verify_s),
                ms(verify_s),
            )
        )
        backend = make_url(url).get_backend_name()
        print()
        print(
            f"timeline benchmark: {args.events:,} events, {args.sandboxes:,} sandboxes x "
            f"{args.canaries} canaries over {SPAN_DAYS} days; incident {burst.sandbox} "
            f"({args.incident_events} events, hour from {to_iso(hour[0])}), "
            f"canary {burst.top_canary}"
        )
        print(
            f"fill: {fill_s:.1f} s, {args.events / fill_s:,.0f} events/s "
            f"({args.batch:,} per transaction); size {size_on_disk(engine)}"
        )
        print(
            f"store: {backend}; SQLite {sqlite3.sqlite_version}, SQLAlchemy "
            f"{sqlalchemy.__version__}, Python {platform.python_version()}; "
            f"{args.reps} reps per query (verify once)"
        )
        print()
        print_table(timings)
        print()
        goal = timings[0].p50_ms < 100.0 and timings[0].max_ms < 100.0
        print(
            f"goal: one sandbox's timeline over {args.events:,} events < 100 ms: "
            f"{'met' if goal else 'MISSED'} (p50 {timings[0].p50_ms:.1f}, max {timings[0].max_ms:.1f})"
        )
        for timing, lines in zip(timings, plans, strict=False):
            print()
            print(f"plan, {timing.name}:")
            for text in lines:
                print(f"  {text}")
        if args.keep and args.url is None:
            print(f"database kept: {work / 'ledger.db'}")
        return 0
    finally:
        engine.dispose()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
