"""Hostile-traffic benchmark: does a real hit still land, answered, recorded and paged, under abuse?

One `oobwatch serve` (DNS, HTTP and the admin API on 127.0.0.1, SQLite, pinned
to core 0) pages through an apprise `json://` URL to a threaded receiver in
this process. For each flood shape, one row: the flood runs (pinned to core 1)
while this process sends one real hit per second, each naming a different
canary, from 127.0.0.2 (another source than the flood's 127.0.0.1), once, with
no retry. Shapes:

- idle: nothing else;
- junk at 20k/s: dnsperf, random names under the zone;
- forged tokens at 20k/s: dnsperf, names whose token passes the *unkeyed*
  checksum anyone can compute (what oobwatch used before its check was keyed);
- junk at max rate: dnsperf with no rate limit (the kernel drops UDP it cannot
  queue; the row says how many, from /proc/net/snmp RcvbufErrors);
- 1,000 stalled HTTP connections: each sends half a request head and stops,
  reopened when closed; the real hits go over HTTP (Host `<token>.<zone>`);
- 3,000 short-lived DNS-over-TCP connections: a frame shorter than a DNS
  header, then close; the real hits go over DNS/TCP;
- a TLS handshake flood: 4 clients doing full handshakes (junk SNI) back to back
  against `[https]`, while the real hits go over DNS: the handshakes' crypto
  runs on the same loop as every listener;
- 1,000 stalled TLS hellos: each sends the first 20 bytes of a ClientHello and
  stops; the real hits are handshakes naming their canary (SNI);
- unauthenticated large API bodies: 8 clients at a time POST bodies
  declared as 200 MB with no token;
- a leaked token at 5k/s and at max rate: dnsperf, `<random12>.<token>.<zone>`
  for one canary whose token the intruder has read (every query a genuine hit).

Per row: real hits sent / answered / recorded (ledger rows) / paged, hit → page
p50 and p99, the server's RSS before and after, and the most descriptors it
held open; for the leaked-token rows also the flood's queries answered, the
hits its ledger rows account for, and how many rows it added. `--source DIR` runs the server from another checkout (run it on the
commit before a change for the "before" table); the config uses only keys both
understand. Every loop is bounded by the row's seconds.

Usage: python bench/hostile.py [--seconds S] [--source DIR] [--only NAME ...]
"""

import argparse
import base64
import contextlib
import hashlib
import json
import os
import queue
import random
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dnsbench import (
    ZONE,
    completed_queries,
    free_port,
    junk_name,
    markdown_table,
    percentile,
    stop,
    tail,
    trusting_anything,
)
from latency import LOAD_CORE, SERVER_CORE, Receiver, pin, query

REPO = Path(__file__).resolve().parent.parent
OTHER_SOURCE = "127.0.0.2"
READY_SECONDS = 60.0
PAGE_WAIT_SECONDS = 15.0
HIT_TIMEOUT_SECONDS = 3.0

_SERVE = "import sys; from oobwatch.cli import main; sys.exit(main())"
_MINT = """
import json, sys
from pathlib import Path
from oobwatch.config import load
from oobwatch.operations import LocalOperations
from oobwatch.views import MintRequest
ops = LocalOperations(load(Path(sys.argv[1])))
made = [ops.mint(MintRequest(kind="dns", sandbox="bench")) for _ in range(int(sys.argv[2]))]
print(json.dumps([[canary.id, canary.value] for canary in made]))
"""


@dataclass
class Ports:
    dns: int
    http: int
    api: int
    https: int

    def of(self, protocol: str) -> int:
        """Where the real hits of a row over `protocol` go."""
        return {"http": self.http, "tls": self.https}.get(protocol, self.dns)


@dataclass
class Row:
    name: str
    protocol: str
    sent: int = 0
    answered: int = 0
    recorded: int = 0
    paged: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    descriptors: int = 0
    udp_drops: int = 0
    note: str = ""
    canaries: list[str] = field(default_factory=list)
    # A leaked-token flood: its canary, queries answered, hits its rows count, rows added.
    leaked: str | None = None
    flood_answered: int = 0
    flood_accounted: int = 0
    flood_rows: int = 0


# --- the server ----------------------------------------------------------------------------


def write_config(directory: Path, ports: Ports, receiver: int) -> Path:
    path = directory / "oobwatch.toml"
    path.write_text(
        f"""\
[node]
name = "hostile"

[store]
url = "sqlite:///{directory}/hostile.db"

[dns]
zone = "{ZONE}"
port = {ports.dns}

[smtp]
enabled = false

[http]
port = {ports.http}

[https]
enabled = true
port = {ports.https}

[api]
port = {ports.api}

[alerts]
urls = ["json://127.0.0.1:{receiver}/"]

[heartbeat]
enabled = false
""",
        encoding="utf-8",
    )
    return path


def mint_canaries(source: Path, config: Path, count: int) -> list[tuple[str, str]]:
    made = subprocess.run(
        [sys.executable, "-c", _MINT, str(config), str(count)],
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        capture_output=True,
        timeout=300,
    )
    if made.returncode != 0:
        raise RuntimeError(f"minting failed: {made.stderr.decode(errors='replace')[-2000:]}")
    return [(cid, name) for cid, name in json.loads(made.stdout)]


@contextlib.contextmanager
def serving(source: Path, config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    argv = [*pin(SERVER_CORE), sys.executable, "-c", _SERVE, "--config", str(config), "serve"]
    with log.open("wb") as errors:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            cwd=source,
            env={**os.environ, "PYTHONPATH": str(source)},
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
            stdout = process.stdout

            def drain() -> None:
                for raw in stdout:
                    lines.put(raw.decode("utf-8", errors="replace"))
                lines.put(None)

            threading.Thread(target=drain, daemon=True).start()
            listening: set[str] = set()
            deadline = time.monotonic() + READY_SECONDS
            while listening != {"dns", "http", "https", "api"}:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise RuntimeError(f"oobwatch did not start: {tail(log)}") from None
                if line is None:
                    raise RuntimeError(f"oobwatch exited: {tail(log)}")
                name, _, rest = line.partition(" ")
                if rest.startswith("listening on "):
                    listening.add(name)
            yield process
        finally:
            stop(process)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def udp_receive_errors() -> int:
    """Datagrams the kernel dropped for a full receive buffer, since boot."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    header, values = (line.split() for line in lines if line.startswith("Udp:"))
    return int(values[header.index("RcvbufErrors")])


@contextlib.contextmanager
def sampling_descriptors(pid: int) -> Iterator[list[int]]:
    most = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            with contextlib.suppress(OSError):
                most[0] = max(most[0], len(os.listdir(f"/proc/{pid}/fd")))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield most
    finally:
        done.set()
        thread.join(2)


# --- floods --------------------------------------------------------------------------------


def forged_token(rng: random.Random) -> str:
    """A token whose check passes the old, unkeyed checksum: computable by anyone."""
    random_part = rng.randbytes(14)
    check = hashlib.sha256(b"oobwatch-token" + random_part).digest()[:2]
    return base64.b32encode(random_part + check).decode("ascii").rstrip("=").lower()


def write_names(path: Path, make: Callable[[random.Random], str], count: int) -> Path:
    rng = random.Random(7)
    with path.open("w", encoding="ascii") as out:
        for _ in range(count):
            out.write(f"{make(rng)} A\n")
    return path


@contextlib.contextmanager
def dnsperf(
    port: int,
    names: Path,
    qps: int | None,
    seconds: float,
    out: Path,
    extra: Sequence[str] = ("-q", "500"),
) -> Iterator[None]:
    argv = [*pin(LOAD_CORE), "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(names)]
    argv += ["-l", f"{seconds:g}", "-c", "2", "-t", "2", *extra]
    if qps is not None:
        argv += ["-Q", str(qps)]
    with out.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            stop(process)


@contextlib.contextmanager
def in_threads(work: Callable[[threading.Event], None], count: int = 1) -> Iterator[None]:
    """Run `work(stop)` in `count` threads until the body ends."""
    done = threading.Event()
    threads = [threading.Thread(target=work, args=(done,), daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        done.set()
        for thread in threads:
            thread.join(10)


def stalled(port: int, connections: int, first: bytes) -> Callable[[threading.Event], None]:
    """`connections` that each send `first` and stop, reopened when the server closes them."""

    def work(done: threading.Event) -> None:
        held: list[socket.socket] = []
        while not done.is_set():
            while len(held) < connections and not done.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                    sock.sendall(first)
                    sock.setblocking(False)
                    held.append(sock)
                except OSError:
                    time.sleep(0.05)
            held = [sock for sock in held if still_stalled(sock)]
            done.wait(0.2)
        for sock in held:
            sock.close()

    return work


def still_stalled(sock: socket.socket) -> bool:
    """Open with nothing to read; anything else (closed, refused, answered) is closed here."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        pass
    sock.close()
    return False


def short_tcp_dns(port: int, total: int, seconds: float) -> Callable[[threading.Event], None]:
    def work(done: threading.Event) -> None:
        pause = seconds / total
        for _ in range(total):
            if done.is_set():
                return
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
            ):
                sock.sendall(b"\x00\x03\x01\x02\x03")
            time.sleep(pause)

    return work


def tls_handshakes(port: int) -> Callable[[threading.Event], None]:
    """Full handshakes, one after another, naming no canary: crypto on the server's loop."""

    def work(done: threading.Event) -> None:
        context = trusting_anything()
        while not done.is_set():
            with contextlib.suppress(OSError):
                raw = socket.create_connection(("127.0.0.1", port), timeout=2)
                context.wrap_socket(raw, server_hostname=f"www.{ZONE}").close()

    return work


def partial_hello() -> bytes:
    """The first 20 bytes of a real ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = trusting_anything().wrap_bio(incoming, outgoing, server_hostname=f"www.{ZONE}")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()[:20]


def big_api_bodies(port: int) -> Callable[[threading.Event], None]:
    head = (
        b"POST /canaries HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 209715200\r\n\r\n"
    )
    chunk = b"[" * (1024 * 1024)

    def work(done: threading.Event) -> None:
        while not done.is_set():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
            ):
                sock.sendall(head)
                for _ in range(200):
                    if done.is_set():
                        break
                    sock.sendall(chunk)

    return work


# --- real hits -----------------------------------------------------------------------------


def hit_udp(port: int, qid: int, name: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((OTHER_SOURCE, 0))
        sock.settimeout(HIT_TIMEOUT_SECONDS)
        sock.sendto(query(qid, name), ("127.0.0.1", port))
        try:
            return sock.recv(4096)[:2] == qid.to_bytes(2, "big")
        except TimeoutError:
            return False


def hit_tcp(port: int, qid: int, name: str) -> bool:
    packet = query(qid, name)
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=HIT_TIMEOUT_SECONDS, source_address=(OTHER_SOURCE, 0)
        ) as sock:
            sock.sendall(len(packet).to_bytes(2, "big") + packet)
            return len(sock.recv(4096)) > 2
    except OSError:
        return False


def hit_http(port: int, _qid: int, name: str) -> bool:
    request = f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=HIT_TIMEOUT_SECONDS, source_address=(OTHER_SOURCE, 0)
        ) as sock:
            sock.sendall(request)
            return sock.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def hit_tls(port: int, _qid: int, name: str) -> bool:
    """A handshake naming the canary: it completes only once its hit is committed."""
    try:
        raw = socket.create_connection(
            ("127.0.0.1", port), timeout=HIT_TIMEOUT_SECONDS, source_address=(OTHER_SOURCE, 0)
        )
        trusting_anything().wrap_socket(raw, server_hostname=name).close()
    except OSError:
        return False
    return True


# --- rows ----------------------------------------------------------------------------------


def shapes(
    ports: Ports, work: Path, seconds: float, leaked: Sequence[tuple[str, str]]
) -> dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]]:
    """Each row's name: the protocol its real hits use, and its flood."""
    junk = write_names(work / "junk.txt", junk_name, 200_000)
    forged = write_names(work / "forged.txt", lambda rng: f"{forged_token(rng)}.{ZONE}", 200_000)
    paced, fast = (
        write_names(
            work / f"leaked-{n}.txt", lambda rng, name=name: leaked_name(rng, name), 200_000
        )
        for n, (_, name) in enumerate(leaked)
    )
    flood_seconds = seconds + 2
    # Folded hits are answered once their row commits (a tenth of a second): a client that
    # waits for answers needs many queries in flight to offer the full rate.
    in_flight = ("-q", "20000")
    return {
        "idle": ("dns/udp", contextlib.nullcontext),
        "junk at 20k/s": (
            "dns/udp",
            lambda: dnsperf(ports.dns, junk, 20_000, flood_seconds, work / "junk.out"),
        ),
        "forged tokens at 20k/s": (
            "dns/udp",
            lambda: dnsperf(ports.dns, forged, 20_000, flood_seconds, work / "forged.out"),
        ),
        "junk at max rate": (
            "dns/udp",
            lambda: dnsperf(ports.dns, junk, None, flood_seconds, work / "max.out"),
        ),
        "1,000 stalled HTTP connections": (
            "http",
            lambda: in_threads(stalled(ports.http, 1_000, b"GET /x HTTP/1.1\r\nHost: x\r\n")),
        ),
        "3,000 short TCP DNS connections": (
            "dns/tcp",
            lambda: in_threads(short_tcp_dns(ports.dns, 3_000, seconds)),
        ),
        "TLS handshake flood": (
            "dns/udp",
            lambda: in_threads(tls_handshakes(ports.https), count=4),
        ),
        "1,000 stalled TLS hellos": (
            "tls",
            lambda: in_threads(stalled(ports.https, 1_000, partial_hello())),
        ),
        "unauthenticated large API bodies": (
            "dns/udp",
            lambda: in_threads(big_api_bodies(ports.api), count=8),
        ),
        LEAKED_PACED: (
            "dns/udp",
            lambda: dnsperf(
                ports.dns, paced, 5_000, flood_seconds, work / LEAKED_OUT[LEAKED_PACED], in_flight
            ),
        ),
        LEAKED_FAST: (
            "dns/udp",
            lambda: dnsperf(
                ports.dns, fast, None, flood_seconds, work / LEAKED_OUT[LEAKED_FAST], in_flight
            ),
        ),
    }


LEAKED_PACED = "leaked token at 5k/s"
LEAKED_FAST = "leaked token at max rate"
LEAKED_OUT = {LEAKED_PACED: "leaked-paced.out", LEAKED_FAST: "leaked-fast.out"}


def leaked_name(rng: random.Random, name: str) -> str:
    return f"{rng.randbytes(6).hex()}.{name}"


SENDERS = {"dns/udp": hit_udp, "dns/tcp": hit_tcp, "http": hit_http, "tls": hit_tls}


def run_row(
    row: Row,
    flood: Callable[[], contextlib.AbstractContextManager[None]],
    targets: Sequence[tuple[str, str]],
    port: int,
    pid: int,
    receiver: Receiver,
) -> None:
    send = SENDERS[row.protocol]
    row.rss_before = rss(pid)
    drops = udp_receive_errors()
    sent_at: dict[str, float] = {}
    with sampling_descriptors(pid) as most, flood():
        time.sleep(1.0)
        start = time.perf_counter()
        for index, (canary_id, name) in enumerate(targets):
            pause = start + index - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent_at[canary_id] = time.perf_counter()
            row.sent += 1
            row.canaries.append(canary_id)
            if send(port, index, name):
                row.answered += 1
        deadline = time.perf_counter() + PAGE_WAIT_SECONDS
        while time.perf_counter() < deadline:
            if all(receiver.arrival(cid) is not None for cid in sent_at):
                break
            time.sleep(0.05)
    row.descriptors = most[0]
    row.rss_after = rss(pid)
    row.udp_drops = udp_receive_errors() - drops
    for canary_id, sent in sent_at.items():
        arrived = receiver.arrival(canary_id)
        if arrived is not None:
            row.paged += 1
            row.latencies_ms.append((arrived - sent) * 1000)


def count_recorded(db: Path, rows: Sequence[Row]) -> None:
    """Real hits recorded; for a leaked-token row, its rows and the hits they account for."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        found: dict[str, list[int]] = {}
        for cid, data in connection.execute(
            "select canary_id, data from ledger where type = 'hit'"
        ):
            burst = json.loads(data).get("burst")
            found.setdefault(cid, []).append(burst["count"] if burst else 1)
    for row in rows:
        row.recorded = sum(1 for cid in row.canaries if cid in found)
        if row.leaked is not None:
            counts = found.get(row.leaked, [])
            row.flood_rows, row.flood_accounted = len(counts), sum(counts)


def cells(row: Row) -> list[str]:
    mb = 1024 * 1024
    return [
        row.name,
        row.protocol,
        f"{row.sent} / {row.answered} / {row.recorded} / {row.paged}",
        f"{percentile(row.latencies_ms, 0.5):.1f} / {percentile(row.latencies_ms, 0.99):.1f}",
        f"{row.rss_before / mb:.0f} → {row.rss_after / mb:.0f}",
        f"{row.descriptors:,}",
        f"{row.udp_drops:,}",
        (
            f"{row.flood_answered:,} / {row.flood_accounted:,} / {row.flood_rows:,}"
            if row.leaked
            else ""
        ),
    ]


def distinct_ports(count: int) -> list[int]:
    """`count` free ports, no two the same (each was free when asked, not necessarily apart)."""
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port not in found:
            found.append(port)
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each row's measured time")
    parser.add_argument("--source", type=Path, default=REPO, help="checkout to run the server from")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.source.resolve()
    hits_per_row = max(1, int(args.seconds))
    with tempfile.TemporaryDirectory(prefix="oobwatch-hostile-") as scratch:
        work = Path(scratch)
        ports = Ports(*distinct_ports(4))
        rows: list[Row] = []
        expected: set[str] = set()
        with Receiver(expected) as receiver:
            config = write_config(work, ports, receiver.port)
            leaked = dict(
                zip((LEAKED_PACED, LEAKED_FAST), mint_canaries(source, config, 2), strict=True)
            )
            plan = shapes(ports, work, args.seconds, list(leaked.values()))
            names = [name for name in plan if args.only is None or name in args.only]
            targets = mint_canaries(source, config, hits_per_row * len(names) + 1)
            expected.update(cid for cid, _ in targets)
            with serving(source, config, work / "serve.log") as process:
                # One uncounted hit first, so the sinks' first-use setup is not charged to a row.
                hit_udp(ports.dns, 0, targets[0][1])
                time.sleep(2)
                for number, name in enumerate(names):
                    protocol, flood = plan[name]
                    row = Row(name, protocol)
                    if name in leaked:
                        row.leaked = leaked[name][0]
                    first = 1 + number * hits_per_row
                    port = ports.of(protocol)
                    run_row(
                        row,
                        flood,
                        targets[first : first + hits_per_row],
                        port,
                        process.pid,
                        receiver,
                    )
                    if row.leaked is not None:
                        row.flood_answered = completed_queries(work / LEAKED_OUT[name])
                    rows.append(row)
                    print(f"  {name}: {row.sent} sent, {row.paged} paged", file=sys.stderr)
            count_recorded(work / "hostile.db", rows)
            problems = tail(work / "serve.log", 3)
    print(f"\nserver from {source.name}, pinned to core {SERVER_CORE}; floods on core {LOAD_CORE}")
    print(f"{hits_per_row} real hits per row, one a second, from {OTHER_SOURCE}, no retries\n")
    markdown_table(
        [
            "flood",
            "real hits over",
            "sent / answered / recorded / paged",
            "hit → page p50 / p99 ms",
            "RSS MB",
            "max fds",
            "UDP drops",
            "leaked flood: answered / accounted / rows",
        ],
        [cells(row) for row in rows],
    )
    if problems:
        print(f"\nlast lines of the server's log: {problems}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
