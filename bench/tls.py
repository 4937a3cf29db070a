"""TLS benchmark: handshakes and HTTPS requests a second through oobwatch, beside bare uvicorn.

Both servers serve the same certificate (a self-signed P-256 one for the zone,
given to oobwatch as `[tls]` files and to uvicorn as `--ssl-certfile`), each
pinned to core 0 in turn; the clients run in `--clients` processes pinned to
core 1, so each row is what one server core gives while the load generator
has one core of its own (client work is the same for both servers). Each
measurement runs `--seconds` and is bounded in time:

- handshakes/s: a new TCP connection and a full TLS handshake, then close, with
  the SNI a junk name under the zone (oobwatch peeks and parses the
  ClientHello, counts the junk, then hands the handshake to OpenSSL; uvicorn
  just handshakes);
- canary handshakes/s (oobwatch only): the SNI names one canary, so every
  handshake is a `tls` hit committed before the handshake goes on (past the
  burst threshold, folded into aggregate rows); the hits the ledger counts are
  reported beside it;
- requests/s: GET / over keep-alive HTTPS connections (4 per client), each
  answered 200 (oobwatch matches each request as it does plaintext HTTP).

Usage: python bench/tls.py [--seconds S] [--clients N]
"""

import argparse
import asyncio
import multiprocessing
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPSConnection
from pathlib import Path

from dnsbench import (
    PIN_SERVER,
    REPO,
    VENV_BIN,
    ZONE,
    Server,
    free_port,
    markdown_table,
    running,
    tail,
    trusting_anything,
)

from canaries.mint import mint
from listeners.certificates import self_signed
from store import ledger
from store.engine import migrate, open_engine

LOAD_CORE = 1
CONNECTIONS_PER_CLIENT = 4
# Handshakes each client keeps in flight: a canary-SNI one waits for its row to commit.
HANDSHAKES_IN_FLIGHT = 16
BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
"""


@dataclass
class Measured:
    """Completed per second, errors, and how busy the server's process was meanwhile."""

    rate: float
    errors: int
    server_busy: float

    @property
    def per_core_second(self) -> float:
        return self.rate / self.server_busy if self.server_busy else 0.0


@dataclass
class Row:
    server: str
    handshakes: Measured
    canary_handshakes: Measured | None
    requests: Measured
    note: str = ""

    @property
    def errors(self) -> int:
        measured = [self.handshakes, self.requests, self.canary_handshakes]
        return sum(m.errors for m in measured if m is not None)


def accepting(port: int, timeout: float) -> bool:
    """A TLS handshake completes: a server is up (a bare connect could meet another listener,
    or the kernel's simultaneous open of a port in the ephemeral range with itself)."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout)
        trusting_anything().wrap_socket(raw, server_hostname=f"ready.{ZONE}").close()
    except OSError:
        return False
    return True


def _pin_load() -> None:
    if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {LOAD_CORE})


def _handshakes(
    port: int, name: str, seconds: float, out: "multiprocessing.Queue[tuple[int, int]]"
) -> None:
    _pin_load()
    out.put(asyncio.run(_handshaking(port, name, seconds)))


async def _handshaking(port: int, name: str, seconds: float) -> tuple[int, int]:
    """HANDSHAKES_IN_FLIGHT connections at a time, each a full handshake, then closed."""
    context = trusting_anything()
    end = time.monotonic() + seconds
    done = errors = 0

    async def one_after_another() -> None:
        nonlocal done, errors
        while time.monotonic() < end:
            try:
                async with asyncio.timeout(10):
                    _, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=context, server_hostname=name
                    )
                writer.close()
                done += 1
            except (OSError, TimeoutError):
                errors += 1

    await asyncio.gather(*(one_after_another() for _ in range(HANDSHAKES_IN_FLIGHT)))
    return done, errors


def _requests(
    port: int, name: str, seconds: float, out: "multiprocessing.Queue[tuple[int, int]]"
) -> None:
    _pin_load()
    context = trusting_anything()
    connections = [
        HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        for _ in range(CONNECTIONS_PER_CLIENT)
    ]
    done = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for connection in connections:
            try:
                connection.request("GET", "/", headers={"Host": name})
                response = connection.getresponse()
                response.read()
                done += 1 if response.status == 200 else 0
            except OSError:
                errors += 1
                connection.close()
    for connection in connections:
        connection.close()
    out.put((done, errors))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    work: Callable[[int, str, float, "multiprocessing.Queue[tuple[int, int]]"], None],
    server: "subprocess.Popen[bytes]",
    port: int,
    name: str,
    seconds: float,
    clients: int,
) -> Measured:
    """`work` in `clients` processes for `seconds`, against `server`."""
    results: multiprocessing.Queue[tuple[int, int]] = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=work, args=(port, name, seconds, results))
        for _ in range(clients)
    ]
    started, busy = time.monotonic(), cpu_seconds(server.pid)
    for process in processes:
        process.start()
    totals = [results.get(timeout=seconds + 60) for _ in processes]
    elapsed = time.monotonic() - started
    busy = cpu_seconds(server.pid) - busy
    for process in processes:
        process.join(10)
    return Measured(
        sum(done for done, _ in totals) / elapsed,
        sum(errors for _, errors in totals),
        busy / elapsed,
    )


def oobwatch_config(folder: Path, https_port: int, dns_port: int) -> Path:
    config = folder / "oobwatch.toml"
    config.write_text(
        f"""[node]
name = "bench"
[store]
url = "sqlite:///{folder / "oobwatch.db"}"
[dns]
zone = "{ZONE}"
port = {dns_port}
[smtp]
enabled = false
[http]
enabled = false
[https]
enabled = true
port = {https_port}
max_connections = 4096
max_connections_per_source = 4096
[tls]
cert = "cert.pem"
key = "key.pem"
[api]
enabled = false
[heartbeat]
enabled = false
[log]
level = "warning"
"""
    )
    return config


def bench(seconds: float, clients: int) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="oobwatch-tlsbench-") as scratch:
        folder = Path(scratch)
        pem = self_signed(ZONE)
        split = pem.index(b"-----BEGIN CERTIFICATE-----")
        (folder / "key.pem").write_bytes(pem[:split])
        (folder / "cert.pem").write_bytes(pem[split:])
        junk = f"www.{ZONE}"

        port = free_port()
        (folder / "bare_app.py").write_text(BARE_APP)
        bare = Server(
            "bare uvicorn (h11, same certificate)",
            [
                *PIN_SERVER,
                str(VENV_BIN / "uvicorn"),
                "bare_app:app",
                "--app-dir",
                str(folder),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--http",
                "h11",
                "--ssl-certfile",
                str(folder / "cert.pem"),
                "--ssl-keyfile",
                str(folder / "key.pem"),
                "--no-access-log",
                "--log-level",
                "warning",
                "--timeout-keep-alive",
                "5",
            ],
            port,
            folder / "uvicorn.log",
        )
        with running(bare, accepting) as process:
            handshakes = measure(_handshakes, process, port, junk, seconds, clients)
            requests = measure(_requests, process, port, junk, seconds, clients)
        rows.append(Row(bare.name, handshakes, None, requests))

        port, dns_port = free_port(), free_port()
        while dns_port == port:  # each was free when asked, not necessarily apart
            dns_port = free_port()
        config = oobwatch_config(folder, port, dns_port)
        engine = open_engine(f"sqlite:///{folder / 'oobwatch.db'}")
        migrate(engine)
        canary = mint(engine, kind="dns", zone=ZONE, sandbox="bench", node="bench")
        server = Server(
            "oobwatch [https]",
            [*PIN_SERVER, str(VENV_BIN / "oobwatch"), "--config", str(config), "serve"],
            port,
            folder / "oobwatch.log",
        )
        with running(server, accepting) as process:
            handshakes = measure(_handshakes, process, port, junk, seconds, clients)
            hits = measure(_handshakes, process, port, canary.value, seconds, clients)
            requests = measure(_requests, process, port, junk, seconds, clients)
        if hits.errors or handshakes.errors or requests.errors:
            print(f"oobwatch log: {tail(server.log)}")
        with engine.connect() as connection:
            entries = [e for e in ledger.entries(connection) if e.type == "hit"]
        counted = sum(entry.hits for entry in entries)
        note = f"canary row: {counted:,} hits counted in {len(entries):,} ledger rows"
        rows.append(Row(server.name, handshakes, hits, requests, note))
        engine.dispose()
    return rows


def print_table(rows: Sequence[Row], clients: int) -> None:
    def shown(measured: Measured | None) -> str:
        if measured is None:
            return "-"
        return (
            f"{measured.rate:,.0f} ({measured.server_busy:.0%} busy, "
            f"{measured.per_core_second:,.0f}/core-s)"
        )

    header = [
        "server (pinned to 1 core)",
        "handshakes/s",
        "canary-SNI handshakes/s",
        f"keep-alive requests/s ({clients * CONNECTIONS_PER_CLIENT} conns)",
        "errors",
    ]
    markdown_table(
        header,
        [
            [
                row.server,
                shown(row.handshakes),
                shown(row.canary_handshakes),
                shown(row.requests),
                str(row.errors),
            ]
            for row in rows
        ],
    )
    print(
        "busy: the server process's CPU time over the run (1.0 = its core); /core-s: completed"
        " per second of server CPU, which does not depend on how fast the load generator is."
    )
    for row in rows:
        if row.note:
            print(f"{row.server}: {row.note}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args(argv)
    os.chdir(REPO)
    print_table(bench(args.seconds, args.clients), args.clients)


if __name__ == "__main__":
    main()
