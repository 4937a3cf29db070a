"""DNS benchmark: oobwatch's listener beside a bare asyncio + dnslib responder and NSD.

For each server, pinned to core 0 with dnsperf pinned to core 1, all on 127.0.0.1,
this measures:

- max throughput: dnsperf with a bounded window of outstanding queries for
  `--seconds`; queries answered per second and the share lost (unanswered
  within dnsperf's timeout);
- latency at a fixed offered rate (2000 qps by default): p50 and p99 of
  dnsperf's per-query latencies, over all queries and over hit queries alone
  (oobwatch answers a hit only after its ledger commit);
- hit bookkeeping: how many queries naming a planted canary token were sent
  and answered over both runs (from dnsperf's per-query `-v` lines), and for
  oobwatch how many `hit` rows its ledger holds afterwards. oobwatch answers a
  hit only once it is committed, so every answered hit must have a row:
  "answered, no row" counts answered hit names (by query name) that have
  fewer ledger rows than answers, and must be 0.

The query file is `--queries` lines: 10% `<label>.<token>.<zone>` for tokens
of canaries minted into oobwatch's store, 90% random junk names under the zone
(some with a 26-character base32-looking label where a token would sit).

dnsperf runs with `-v` in both runs, since that is how answers are counted per
query; on one core that cost dnsperf itself ~10% at NSD's rate (measured once:
132k qps without, 117k with), so NSD's max is a lower bound set by the load
generator as much as by NSD.
"""

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from canaries.mint import mint
from store.engine import migrate, open_engine

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
ZONE = "canary.bench.test"
SERVER_CORE = "0"
LOAD_CORE = "1"
PIN_SERVER = ("taskset", "-c", SERVER_CORE)
HIT_SHARE = 0.10
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
READY_SECONDS = 30.0
STOP_SECONDS = 15.0

_VERBOSE_LINE = re.compile(r"^> (\S+) (\S+) (\S+)(?: (\d+\.\d+))?$")
_STAT = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
}


@dataclass
class DnsperfRun:
    """What one dnsperf run reported, summary and per query."""

    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    hit_latencies_ms: list[float] = field(default_factory=list)
    rcodes: Counter[str] = field(default_factory=Counter)
    hits_sent: int = 0
    hits_answered: Counter[str] = field(default_factory=Counter)

    @property
    def lost_percent(self) -> float:
        return 100.0 * self.lost / self.sent if self.sent else 0.0


@dataclass
class Result:
    """One row of the comparison table."""

    server: str
    peak: DnsperfRun | None = None
    steady: DnsperfRun | None = None
    hits_recorded: int | None = None
    answered_without_row: int | None = None
    note: str = ""


@dataclass
class Server:
    """How to start one server under test and where its output goes."""

    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] | None = None


# --- setup -------------------------------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (oobwatch binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise OSError("no port free for both UDP and TCP")


def mint_canaries(db_url: str, count: int) -> list[str]:
    """Mint `count` DNS canaries into the store at `db_url`; return their tokens."""
    engine = open_engine(db_url)
    try:
        migrate(engine)
        return [
            mint(engine, kind="dns", zone=ZONE, sandbox="bench", node="bench").token
            for _ in range(count)
        ]
    finally:
        engine.dispose()


def junk_name(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.3:
        # Shaped like a token (26 base32 chars) but with no valid checksum.
        return "".join(rng.choices(BASE32, k=26)) + "." + ZONE
    depth = 1 if shape < 0.8 else 2
    labels = ["".join(rng.choices(BASE32, k=rng.randint(3, 20))) for _ in range(depth)]
    return ".".join([*labels, ZONE])


def write_queries(path: Path, tokens: Sequence[str], count: int, seed: int) -> int:
    """Write dnsperf's input; return how many lines name a planted token."""
    rng = random.Random(seed)
    hits = 0
    with path.open("w", encoding="ascii") as out:
        for _ in range(count):
            if rng.random() < HIT_SHARE:
                label = "".join(rng.choices("0123456789abcdef", k=8))
                name = f"{label}.{rng.choice(tokens)}.{ZONE}"
                hits += 1
            else:
                name = junk_name(rng)
            out.write(f"{name} A\n")
    return hits


def oobwatch_config(directory: Path, port: int, alert_urls: Sequence[str] = ()) -> Path:
    """A node with only its DNS listener on 127.0.0.1:`port`, paging `alert_urls`.

    The benchmark's hits name a few canaries thousands of times each, which is a burst
    that would fold into aggregate rows: the threshold is set out of reach, so what is
    measured is the path every hit takes that is recorded on its own (bursts are
    bench/hostile.py's leaked-token rows).
    """
    path = directory / "oobwatch.toml"
    urls = ", ".join(f'"{url}"' for url in alert_urls)
    path.write_text(
        f"""\
[node]
name = "bench"

[store]
url = "sqlite:///{directory}/bench.db"

[dns]
zone = "{ZONE}"
listen = "127.0.0.1"
port = {port}

[smtp]
enabled = false

[http]
enabled = false

[api]
enabled = false

[alerts]
urls = [{urls}]

[heartbeat]
enabled = false

[bursts]
threshold = 1000000
""",
        encoding="utf-8",
    )
    return path


def nsd_config(directory: Path, port: int) -> Path:
    """An NSD 4.6 config that serves a wildcard zone as root, unchrooted, with RRL off."""
    (directory / "zone").write_text(
        f"""\
$ORIGIN {ZONE}.
$TTL 0
@    IN SOA ns1 hostmaster 1 3600 600 86400 0
@    IN NS  ns1
ns1  IN A   127.0.0.1
*    IN A   127.0.0.1
""",
        encoding="ascii",
    )
    path = directory / "nsd.conf"
    path.write_text(
        f"""\
server:
  ip-address: 127.0.0.1@{port}
  do-ip6: no
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{directory}"
  pidfile: "{directory}/nsd.pid"
  database: ""
  zonelistfile: "{directory}/zone.list"
  xfrdfile: "{directory}/xfrd.state"
  xfrdir: "{directory}"
  logfile: "{directory}/nsd.log"
  verbosity: 1
  hide-version: yes
  # Debian's NSD rate-limits responses by default; dnsperf would stall at ~100 qps.
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: {ZONE}
  zonefile: "zone"
""",
        encoding="ascii",
    )
    return path


# --- running -----------------------------------------------------------------------------


def probe(port: int, timeout: float) -> bool:
    """True if a query for a junk name under the zone gets any answer."""
    query = (
        b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + b"".join(bytes([len(x)]) + x.encode() for x in ["ready", *ZONE.split(".")])
        + b"\x00\x00\x01\x00\x01"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            reply = sock.recv(4096)
        except OSError:
            return False
    return reply[:2] == b"\x12\x34"


@contextlib.contextmanager
def running(
    server: Server, ready: Callable[[int, float], bool] = probe
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `server`, wait until `ready` (a DNS answer by default), and always stop it
    (SIGINT, then SIGKILL)."""
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            server.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server.env,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + READY_SECONDS
            while not ready(server.port, 0.2):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{server.name} exited with {process.returncode}: {tail(server.log)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} did not answer on port {server.port}")
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        # NSD forks helpers into the session it was started in, which is its own:
        # kill that whole group, by the id of the process we started, before reaping it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def trusting_anything() -> ssl.SSLContext:
    """A TLS client context that takes any certificate (the benches' servers are self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def dnsperf(
    port: int,
    queries: Path,
    out: Path,
    tokens: frozenset[str],
    extra: Sequence[str],
    commands: list[str],
) -> DnsperfRun:
    """Run dnsperf on the load core with per-query output; parse both."""
    argv = [
        "taskset",
        "-c",
        LOAD_CORE,
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(queries),
        "-v",
        *extra,
    ]
    commands.append(shlex.join(argv))
    with out.open("wb") as sink:
        subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, check=True, timeout=600)
    run = DnsperfRun()
    stats: dict[str, str] = {}
    depth = len(ZONE.split("."))
    with out.open(encoding="ascii", errors="replace") as lines:
        for line in lines:
            found = _VERBOSE_LINE.match(line.rstrip("\n"))
            if found is None:
                for key, pattern in _STAT.items():
                    stat = pattern.search(line)
                    if stat is not None:
                        stats[key] = stat.group(1)
                continue
            rcode, name, _qtype, latency = found.groups()
            labels = name.lower().rstrip(".").split(".")
            is_hit = len(labels) > depth and labels[-depth - 1] in tokens
            run.hits_sent += is_hit
            if rcode == "T":
                continue
            run.rcodes[rcode] += 1
            if latency is not None:
                run.latencies_ms.append(float(latency) * 1000.0)
            if is_hit:
                run.hits_answered[name.lower().rstrip(".")] += 1
                if latency is not None:
                    run.hit_latencies_ms.append(float(latency) * 1000.0)
    if "sent" not in stats:
        raise RuntimeError(f"dnsperf printed no statistics: {tail(out)}")
    run.sent = int(stats["sent"])
    run.completed = int(stats.get("completed", "0"))
    run.lost = int(stats.get("lost", "0"))
    run.qps = float(stats.get("qps", "0"))
    return run


def completed_queries(out: Path) -> int:
    """Queries a dnsperf run got answers to, from its summary."""
    found = _STAT["completed"].search(out.read_text(encoding="ascii", errors="replace"))
    return int(found.group(1)) if found else 0


def ledger_hits(db: Path) -> Counter[str]:
    """Hit rows in oobwatch's ledger, by query name."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("select data from ledger where type = 'hit'").fetchall()
    return Counter(str(json.loads(data).get("qname", "")).lower().rstrip(".") for (data,) in rows)


def measure(
    server: Server,
    queries: Path,
    tokens: frozenset[str],
    args: argparse.Namespace,
    work: Path,
    commands: list[str],
) -> Result:
    """Both dnsperf runs against one server; a server that fails gets an empty row and a note."""
    result = Result(server.name)
    slug = server.name.split()[0]
    commands.append(shlex.join(server.argv))
    try:
        with running(server):
            result.peak = dnsperf(
                server.port,
                queries,
                work / f"{slug}-peak.txt",
                tokens,
                ["-l", f"{args.seconds:g}", "-c", str(args.clients), "-q", str(args.outstanding)],
                commands,
            )
            result.steady = dnsperf(
                server.port,
                queries,
                work / f"{slug}-steady.txt",
                tokens,
                ["-l", f"{args.latency_seconds:g}", "-Q", str(args.rate), "-c", "1", "-q", "100"],
                commands,
            )
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        result.peak = result.steady = None
        result.note = f"{server.name} failed: {error}"
    return result


def check_ledger(result: Result, db: Path) -> None:
    """Count oobwatch's hit rows and the answered hit names that lack one."""
    recorded = ledger_hits(db)
    answered = Counter[str]()
    for run in (result.peak, result.steady):
        if run is not None:
            answered.update(run.hits_answered)
    result.hits_recorded = sum(recorded.values())
    result.answered_without_row = sum(
        max(0, count - recorded[name]) for name, count in answered.items()
    )


def log_problems(name: str, log: Path) -> str | None:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    problems = [
        line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ]
    if not problems:
        return None
    return f"{name} logged {len(problems)} warning/error lines; first: {problems[0]}"


# --- the table ---------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def row(result: Result) -> list[str]:
    if result.peak is None or result.steady is None:
        return [result.server, *["-"] * 8]
    runs = (result.peak, result.steady)
    sent = sum(run.hits_sent for run in runs)
    answered = sum(sum(run.hits_answered.values()) for run in runs)
    recorded = "n/a" if result.hits_recorded is None else f"{result.hits_recorded:,}"
    missing = "n/a" if result.answered_without_row is None else f"{result.answered_without_row:,}"
    hits = result.steady.hit_latencies_ms
    return [
        result.server,
        f"{result.peak.qps:,.0f}",
        f"{result.peak.lost_percent:.2f}",
        f"{percentile(result.steady.latencies_ms, 0.50):.3f}",
        f"{percentile(result.steady.latencies_ms, 0.99):.3f}",
        f"{percentile(hits, 0.50):.3f} / {percentile(hits, 0.99):.3f}",
        f"{sent:,} / {answered:,}",
        recorded,
        missing,
    ]


def print_table(results: Sequence[Result], rate: int) -> None:
    header = [
        "server",
        "max qps (1 core)",
        "lost %",
        f"p50 ms @{rate} qps",
        f"p99 ms @{rate} qps",
        "hits only: p50 / p99 ms",
        "hits sent / answered",
        "hits recorded",
        "answered, no row",
    ]
    markdown_table(header, [row(result) for result in results])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a Markdown table: first column left-aligned, the others right-aligned."""
    table = [list(header), *(list(cells) for cells in rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "| " + " | ".join([first, *rest]) + " |"

    print(line(header))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for cells in table[1:]:
        print(line(cells))


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="max-throughput run length")
    parser.add_argument("--latency-seconds", type=float, default=5.0, help="fixed-rate run length")
    parser.add_argument("--rate", type=int, default=2000, help="fixed offered rate, qps")
    parser.add_argument("--queries", type=int, default=100_000, help="lines in the query file")
    parser.add_argument("--canaries", type=int, default=200, help="canaries minted")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf -c for the max run")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q for the max run")
    parser.add_argument("--quick", action="store_true", help="short runs, smaller query file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
        args.latency_seconds = min(args.latency_seconds, 2.0)
        args.queries = min(args.queries, 20_000)
        args.canaries = min(args.canaries, 50)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("dnsperf") is None or shutil.which("taskset") is None:
        print("bench/dnsbench.py needs dnsperf and taskset (make bench installs dnsperf)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="oobwatch-bench-"))
    commands: list[str] = []
    results: list[Result] = []
    notes: list[str] = []
    try:
        db = work / "bench.db"
        started = time.monotonic()
        tokens = mint_canaries(f"sqlite:///{db}", args.canaries)
        minted_in = time.monotonic() - started
        queries = work / "queries.txt"
        planted = write_queries(queries, tokens, args.queries, seed=20261124)
        token_set = frozenset(tokens)

        port = free_port()
        config = str(oobwatch_config(work, port))
        oobwatch = Server(
            "oobwatch",
            [*PIN_SERVER, str(VENV_BIN / "oobwatch"), "--config", config, "serve"],
            port,
            work / "oobwatch.log",
        )
        results.append(measure(oobwatch, queries, token_set, args, work, commands))
        check_ledger(results[-1], db)
        notes.append(log_problems("oobwatch", oobwatch.log) or "")

        port = free_port()
        responder = str(REPO / "bench" / "dnslib_responder.py")
        dnslib = Server(
            "asyncio + dnslib",
            [*PIN_SERVER, sys.executable, responder, ZONE, str(port)],
            port,
            work / "dnslib.log",
        )
        results.append(measure(dnslib, queries, token_set, args, work, commands))

        nsd = shutil.which("nsd")
        if nsd is None:
            results.append(Result("NSD", note="NSD row skipped: nsd is not installed"))
        else:
            port = free_port()
            nsd_dir = work / "nsd"
            nsd_dir.mkdir()
            server = Server(
                "NSD " + nsd_version(nsd),
                [*PIN_SERVER, nsd, "-d", "-c", str(nsd_config(nsd_dir, port))],
                port,
                nsd_dir / "stdout.log",
            )
            results.append(measure(server, queries, token_set, args, work, commands))
        notes.extend(result.note for result in results)

        print()
        print(
            f"DNS benchmark, zone {ZONE}: {args.queries:,} query lines, {planted:,} naming one "
            f"of {len(tokens)} planted tokens (minted in {minted_in:.1f} s)"
        )
        print(
            f"cores: {os.cpu_count()} (server pinned to core {SERVER_CORE}, dnsperf to core "
            f"{LOAD_CORE}); max run {args.seconds:g} s, fixed-rate run {args.latency_seconds:g} s "
            f"at {args.rate} qps"
        )
        print()
        print_table(results, args.rate)
        print()
        for result in results:
            if result.peak is not None and result.steady is not None:
                codes = result.peak.rcodes + result.steady.rcodes
                print(f"{result.server}: response codes {dict(codes)}")
        for note in filter(None, notes):
            print(f"note: {note}")
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


def nsd_version(nsd: str) -> str:
    shown = subprocess.run([nsd, "-v"], capture_output=True, text=True, check=False)
    found = re.search(r"NSD version (\S+)", shown.stdout + shown.stderr)
    return found.group(1) if found else ""


if __name__ == "__main__":
    sys.exit(main())
