"""Alert latency benchmark: from a DNS query naming a canary to the page at a receiver.

One `oobwatch serve` (DNS listener only, pinned to core 0) pages through an
apprise `json://` URL to a small threaded HTTP receiver inside this process.
The bench (pinned to core 1, beside the load generator) sends hits: UDP
queries for `<token>.<zone>`, each naming a *different* canary (alerts are
deduplicated per canary, so a repeat would not page), at a steady rate, once
each with no retry. For every hit it measures

    latency = time the page naming that canary arrived - time its query was sent

(both `time.perf_counter()` in this process), and reports p50, p99 and max
over all paged hits, in two conditions against the same listener:

- idle: nothing else reaches the server;
- under flood: dnsperf (pinned to core 1) offers a bounded junk flood, random
  names under the zone (`--flood-qps`, 12k qps by default), to the same DNS
  port for the whole measured phase; the junk rate dnsperf actually achieved
  (answered queries per second) is reported beside the latencies.

A hit is "answered" when its DNS reply came back (oobwatch answers a hit only
after committing it to the ledger), "paged" when a page naming its canary
reached the receiver within `--timeout` seconds of the phase's last query;
"missing" is sent - paged. A second table splits the latency into stages using
the server's own timestamps from the store (same machine, same wall clock):
query sent -> hit stamped by the listener -> DNS answer back at the client ->
page queued in the outbox by the dispatcher -> page received.

One uncounted warm-up hit goes first, so apprise's and the HTTP client's
first-use setup is not charged to the idle row.

Usage: python bench/latency.py [--hits N] [--rate R] [--flood-qps Q] [--quick]
"""

import argparse
import contextlib
import json
import os
import queue
import random
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dnsbench import (
    ZONE,
    free_port,
    junk_name,
    log_problems,
    markdown_table,
    oobwatch_config,
    percentile,
    stop,
    tail,
)

from canaries.mint import mint
from store.engine import migrate, open_engine

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
SERVER_CORE = "0"
LOAD_CORE = "1"
READY_SECONDS = 30.0
FLOOD_WARMUP_SECONDS = 1.0
JUNK_LINES = 100_000
MAX_HITS = 60_000  # query ids are per phase and 16 bits wide

_CANARY_ID = re.compile(r"\bcn-[0-9a-f]{12}\b")
_LISTENING = re.compile(r"^dns listening on 127\.0\.0\.1:(\d+)$")
_STAT = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
}


@dataclass(frozen=True, slots=True)
class Target:
    """A minted canary: its id (named in the page) and the name to query."""

    canary_id: str
    name: str


@dataclass(slots=True)
class Hit:
    """One query naming a canary, and what became of it."""

    target: Target
    sent: float = 0.0  # perf_counter
    sent_wall_us: int = 0
    answered: float | None = None  # perf_counter of the DNS reply


@dataclass
class Flood:
    """What dnsperf reported for the junk flood."""

    offered_qps: int
    seconds: float
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    note: str = ""


@dataclass
class Phase:
    """One row of the table: the hits of one condition and, under flood, the flood."""

    name: str
    hits: list[Hit] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    flood: Flood | None = None
    duplicate_pages: int = 0


# --- the page receiver ---------------------------------------------------------------------


class Receiver:
    """A threaded HTTP server that answers 200 and notes when each canary's page arrived."""

    def __init__(self, canary_ids: set[str]) -> None:
        self._ids = canary_ids
        self._lock = threading.Lock()
        self.arrivals: dict[str, float] = {}  # canary id -> perf_counter of the first page
        self.duplicates: dict[str, int] = {}
        self.posts = 0
        self.unmatched = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                arrived = time.perf_counter()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.record(body, arrived)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def record(self, body: bytes, arrived: float) -> None:
        try:
            page = json.loads(body)
            text = f"{page.get('title', '')}\n{page.get('message', '')}"
        except (ValueError, AttributeError):
            text = body.decode("utf-8", errors="replace")
        found = next((cid for cid in _CANARY_ID.findall(text) if cid in self._ids), None)
        with self._lock:
            self.posts += 1
            if found is None:
                self.unmatched += 1
            elif found in self.arrivals:
                self.duplicates[found] = self.duplicates.get(found, 0) + 1
            else:
                self.arrivals[found] = arrived

    def arrival(self, canary_id: str) -> float | None:
        with self._lock:
            return self.arrivals.get(canary_id)

    def __enter__(self) -> "Receiver":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


# --- setup ---------------------------------------------------------------------------------


def mint_targets(db_url: str, count: int) -> list[Target]:
    """Mint `count` DNS canaries into the store at `db_url`."""
    engine = open_engine(db_url)
    try:
        migrate(engine)
        targets = []
        for _ in range(count):
            canary = mint(engine, kind="dns", zone=ZONE, sandbox="bench", node="bench")
            targets.append(Target(canary.id, canary.value))
        return targets
    finally:
        engine.dispose()


def write_junk(path: Path, count: int, seed: int) -> None:
    """dnsperf's input: random names under the zone, none of them a token."""
    rng = random.Random(seed)
    with path.open("w", encoding="ascii") as out:
        for _ in range(count):
            out.write(f"{junk_name(rng)} A\n")


def pin(core: str) -> list[str]:
    return ["taskset", "-c", core] if (os.cpu_count() or 1) >= 2 else []


@contextlib.contextmanager
def serving(config: Path, log: Path, commands: list[str]) -> Iterator[int]:
    """Run `oobwatch serve`, yield its DNS port once it says it listens; always stop it."""
    argv = [*pin(SERVER_CORE), str(VENV_BIN / "oobwatch"), "--config", str(config), "serve"]
    commands.append(shlex.join(argv))
    with log.open("wb") as errors:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
            assert process.stdout is not None
            stdout = process.stdout

            def drain() -> None:
                for raw in stdout:
                    lines.put(raw.decode("utf-8", errors="replace").rstrip("\n"))
                lines.put(None)

            threading.Thread(target=drain, daemon=True).start()
            deadline = time.monotonic() + READY_SECONDS
            port = None
            while port is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("oobwatch did not say it listens on DNS in time")
                try:
                    line = lines.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
                if line is None:
                    raise RuntimeError(f"oobwatch exited: {tail(log)}")
                found = _LISTENING.match(line)
                if found is not None:
                    port = int(found.group(1))
            yield port
        finally:
            stop(process)


# --- hits ----------------------------------------------------------------------------------


def query(qid: int, name: str) -> bytes:
    """A standard query (RD clear, as a resolver asks an authority) for `name` A IN."""
    labels = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split("."))
    return (
        qid.to_bytes(2, "big")
        + b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + labels
        + b"\x00\x00\x01\x00\x01"
    )


def send_hits(
    port: int, targets: Sequence[Target], rate: float, receiver: Receiver, timeout: float
) -> list[Hit]:
    """Query each target once at `rate` per second; wait until all paged or `timeout` passed."""
    hits = [Hit(target) for target in targets]
    done = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.1)

        def read_answers() -> None:
            while not done.is_set():
                try:
                    reply = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                at = time.perf_counter()
                qid = int.from_bytes(reply[:2], "big")
                if qid < len(hits) and hits[qid].answered is None and hits[qid].sent:
                    hits[qid].answered = at

        reader = threading.Thread(target=read_answers, daemon=True)
        reader.start()
        try:
            start = time.perf_counter()
            for index, hit in enumerate(hits):
                due = start + index / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                packet = query(index, hit.target.name)
                hit.sent_wall_us = time.time_ns() // 1000
                hit.sent = time.perf_counter()
                sock.send(packet)
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline:
                if all(receiver.arrival(hit.target.canary_id) is not None for hit in hits):
                    break
                time.sleep(0.05)
        finally:
            done.set()
            reader.join(2.0)
    return hits


def settle(phase: Phase, receiver: Receiver) -> None:
    for hit in phase.hits:
        arrived = receiver.arrival(hit.target.canary_id)
        if arrived is not None:
            phase.latencies_ms.append((arrived - hit.sent) * 1000.0)
        phase.duplicate_pages += receiver.duplicates.get(hit.target.canary_id, 0)


# --- the flood -----------------------------------------------------------------------------


def start_flood(port: int, junk: Path, flood: Flood, commands: list[str]) -> list[str]:
    """dnsperf's command line for the flood, pinned to the load core."""
    argv = [
        *pin(LOAD_CORE),
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(junk),
        "-Q",
        str(flood.offered_qps),
        "-l",
        f"{flood.seconds:g}",
        "-c",
        "2",
        "-q",
        "200",
        "-t",
        "2",
    ]
    commands.append(shlex.join(argv))
    return argv


def parse_flood(flood: Flood, out: Path) -> None:
    text = out.read_text(encoding="utf-8", errors="replace")
    stats = {key: found.group(1) for key, rx in _STAT.items() if (found := rx.search(text))}
    if "sent" not in stats:
        flood.note = f"dnsperf printed no statistics: {tail(out)}"
        return
    flood.sent = int(stats["sent"])
    flood.completed = int(stats.get("completed", "0"))
    flood.lost = int(stats.get("lost", "0"))
    flood.qps = float(stats.get("qps", "0"))


@contextlib.contextmanager
def flooding(argv: list[str], out: Path, limit: float) -> Iterator[subprocess.Popen[bytes]]:
    """Run dnsperf; after the body, wait for it to finish its `-l` run, else stop it."""
    with out.open("wb") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            yield process
            process.wait(limit)
        finally:
            stop(process)


# --- where the latency goes ----------------------------------------------------------------


def stages(db: Path, hits: Sequence[Hit], receiver: Receiver) -> dict[str, list[float]]:
    """Cumulative ms from the query leaving the client to each later step, per paged hit."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        stamped = dict(
            connection.execute(
                "select canary_id, min(time_us) from ledger where type = 'hit' group by canary_id"
            ).fetchall()
        )
        queued = dict(
            connection.execute(
                "select a.canary_id, min(d.created_us) from deliveries d"
                " join alerts a on a.id = d.alert_id group by a.canary_id"
            ).fetchall()
        )
    out: dict[str, list[float]] = {
        "hit stamped": [],
        "DNS answer": [],
        "page queued": [],
        "page received": [],
    }
    for hit in hits:
        cid = hit.target.canary_id
        arrived = receiver.arrival(cid)
        if arrived is None:
            continue
        if cid in stamped:
            out["hit stamped"].append((stamped[cid] - hit.sent_wall_us) / 1000.0)
        if hit.answered is not None:
            out["DNS answer"].append((hit.answered - hit.sent) * 1000.0)
        if cid in queued:
            out["page queued"].append((queued[cid] - hit.sent_wall_us) / 1000.0)
        out["page received"].append((arrived - hit.sent) * 1000.0)
    return out


# --- the tables ----------------------------------------------------------------------------


def summary_row(phase: Phase) -> list[str]:
    sent = len(phase.hits)
    answered = sum(hit.answered is not None for hit in phase.hits)
    paged = len(phase.latencies_ms)
    values = phase.latencies_ms
    if phase.flood is None:
        junk = "-"
    elif phase.flood.note:
        junk = "n/a"
    else:
        junk = f"{phase.flood.qps:,.0f}"
    return [
        phase.name,
        f"{sent:,}",
        f"{answered:,}",
        f"{paged:,}",
        f"{sent - paged:,}",
        f"{percentile(values, 0.50):.1f}",
        f"{percentile(values, 0.99):.1f}",
        f"{max(values) if values else float('nan'):.1f}",
        junk,
    ]


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hits", type=int, default=1000, help="hits per condition")
    parser.add_argument("--rate", type=float, default=100.0, help="hits sent per second")
    parser.add_argument("--flood-qps", type=int, default=12_000, help="junk qps offered")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds after the last hit to wait for pages"
    )
    parser.add_argument("--quick", action="store_true", help="200 hits per condition")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.hits = min(args.hits, 200)
    if not 1 <= args.hits <= MAX_HITS:
        parser.error(f"--hits must be 1..{MAX_HITS}")
    if not 0 < args.rate <= 10_000:
        parser.error("--rate must be in (0, 10000]")
    if not 0 < args.timeout <= 120:
        parser.error("--timeout must be in (0, 120]")
    if not 0 < args.flood_qps <= 1_000_000:
        parser.error("--flood-qps must be in (0, 1000000]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("dnsperf") is None:
        print("bench/latency.py needs dnsperf (make bench installs it)")
        return 2
    if len(pin(LOAD_CORE)) and hasattr(os, "sched_setaffinity"):
        # The bench shares the load core with dnsperf, leaving core 0 to oobwatch.
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    work = Path(tempfile.mkdtemp(prefix="oobwatch-latency-"))
    commands: list[str] = []
    try:
        db = work / "bench.db"
        started = time.monotonic()
        targets = mint_targets(f"sqlite:///{db}", 2 * args.hits + 1)
        minted_in = time.monotonic() - started
        warmup, idle_targets, flood_targets = (
            targets[0],
            targets[1 : args.hits + 1],
            targets[args.hits + 1 :],
        )
        junk = work / "junk.txt"
        write_junk(junk, JUNK_LINES, seed=20261124)
        idle = Phase("idle")
        flooded = Phase(f"under flood ({args.flood_qps:,} qps offered)")
        send_seconds = args.hits / args.rate
        flooded.flood = Flood(
            args.flood_qps, round(FLOOD_WARMUP_SECONDS + send_seconds + args.timeout / 2, 1)
        )

        with Receiver({target.canary_id for target in targets}) as receiver:
            config = oobwatch_config(work, free_port(), [f"json://127.0.0.1:{receiver.port}/page"])
            log = work / "oobwatch.log"
            with serving(config, log, commands) as port:
                send_hits(port, [warmup], args.rate, receiver, args.timeout)
                idle.hits = send_hits(port, idle_targets, args.rate, receiver, args.timeout)
                out = work / "dnsperf.txt"
                argv = start_flood(port, junk, flooded.flood, commands)
                with flooding(argv, out, flooded.flood.seconds + 30.0):
                    time.sleep(FLOOD_WARMUP_SECONDS)
                    flooded.hits = send_hits(port, flood_targets, args.rate, receiver, args.timeout)
                parse_flood(flooded.flood, out)
            for phase in (idle, flooded):
                settle(phase, receiver)
            split = {phase.name: stages(db, phase.hits, receiver) for phase in (idle, flooded)}
            unmatched, posts = receiver.unmatched, receiver.posts
        problems = log_problems("oobwatch", log)

        print()
        print(
            f"Alert latency: DNS query naming a canary -> page at a local json:// receiver; "
            f"zone {ZONE}, {args.hits:,} hits per condition at {args.rate:g}/s, one query each, "
            f"each on its own canary ({len(targets):,} minted in {minted_in:.1f} s)"
        )
        print(
            f"cores: {os.cpu_count()} (oobwatch pinned to core {SERVER_CORE}; bench and dnsperf "
            f"on core {LOAD_CORE}); pages awaited {args.timeout:g} s after the last hit"
        )
        print()
        markdown_table(
            [
                "condition",
                "hits sent",
                "answered",
                "paged",
                "missing",
                "p50 ms",
                "p99 ms",
                "max ms",
                "junk qps achieved",
            ],
            [summary_row(idle), summary_row(flooded)],
        )
        print()
        print("where the latency goes: ms from the query leaving the client, p50 / p99")
        names = list(next(iter(split.values())))
        markdown_table(
            ["condition", *names],
            [
                [
                    name,
                    *(
                        f"{percentile(v, 0.50):.1f} / {percentile(v, 0.99):.1f}"
                        for v in split[name].values()
                    ),
                ]
                for name in split
            ],
        )
        print()
        flood = flooded.flood
        if flood.note:
            print(f"note: flood: {flood.note}")
        else:
            print(
                f"flood: dnsperf sent {flood.sent:,}, completed {flood.completed:,}, "
                f"lost {flood.lost:,} over {flood.seconds:g} s "
                f"({flood.qps:,.0f} qps answered of {flood.offered_qps:,} offered)"
            )
        print(
            f"receiver: {posts:,} POSTs (measured hits and 1 warm-up hit), "
            f"{unmatched:,} naming no bench canary, "
            f"{idle.duplicate_pages + flooded.duplicate_pages:,} duplicate pages"
        )
        if problems:
            print(f"note: {problems}")
        print()
        print("commands:")
        for command in commands:
            print(f"  {command}")
        if args.keep:
            print(f"work directory kept: {work}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
