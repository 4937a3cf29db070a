"""Test helpers: a throwaway PostgreSQL server, an HTTP receiver, a DNS listener in the test's loop."""

import asyncio
import base64
import contextlib
import functools
import glob
import hashlib
import itertools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from canaries.index import TokenIndex
from canaries.mint import mint
from canaries.model import Canary
from canaries.tokens import TokenKey, is_plausible
from listeners.base import Context, hit_event
from listeners.burst import BurstFolder, BurstOptions
from listeners.certificates import NodeCertificate, Served, self_signed
from listeners.dns import DnsListener, DnsOptions
from listeners.http import HttpListener, HttpOptions
from listeners.postgres import PostgresListener, PostgresOptions
from listeners.smtp import SmtpListener, SmtpOptions
from listeners.ssh import SshListener, SshOptions, host_key
from listeners.tls import TlsListener, TlsOptions
from store import ledger
from store.clock import now_us
from store.engine import migrate, open_engine
from store.ledger import Event
from store.writer import LedgerWriter

ZONE = "canary.example.test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as a non-root user when we are root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="oobwatch-pg-"))
        self.port = _free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._prefix = ["runuser", "-u", "postgres", "--"]
        self._databases = itertools.count()

    def _run(self, *command: str) -> None:
        subprocess.run([*self._prefix, *command], check=True, capture_output=True)

    def start(self) -> None:
        data = self.root / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "oobwatch", "--auth=trust")
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after `halt`), on the same port and data."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.root / "data"),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "log"),
            "start",
        )

    def halt(self) -> None:
        """Stop the server at once, as a crash would, keeping its data."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.root / "data"),
                "-m",
                "immediate",
                "stop",
            )

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        name = f"t{next(self._databases)}"
        engine = open_engine(self.url("postgres"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        engine.dispose()
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://oobwatch@127.0.0.1:{self.port}/{database}"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.body)
        return loaded


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 recording every request.

    It answers `status`, or for a path in `failing`, 500 while that path's
    count of failures to give is above zero; each answer after `delay` seconds.
    """

    port: int = 0
    status: int = 200
    delay: float = 0.0
    failing: dict[str, int] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    attempts: list[Received] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def url(self, scheme: str = "json", path: str = "/hook") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, received: Received) -> int:
        time.sleep(self.delay)
        with self.arrived:
            self.attempts.append(received)
            status = self.status
            if self.failing.get(received.path, 0) > 0:
                self.failing[received.path] -= 1
                status = 500
            if status < 300:
                self.requests.append(received)
            self.arrived.notify_all()
            return status

    def wait_for(
        self, count: int, timeout: float = 10.0, path: str | None = None
    ) -> list[Received]:
        def matching() -> list[Received]:
            return [r for r in self.requests if path is None or r.path == path]

        with self.arrived:
            self.arrived.wait_for(lambda: len(matching()) >= count, timeout)
            return matching()


@dataclass
class Node:
    """A listener on 127.0.0.1:0 with its writer and index, in this test's loop."""

    engine: Engine
    listener: Any
    writer: LedgerWriter
    index: TokenIndex
    context: Context

    @property
    def port(self) -> int:
        return int(self.listener.addresses[0][1])


@contextlib.asynccontextmanager
async def run_listener(
    engine: Engine, build: Callable[[Context], Any], bursts: BurstOptions | None = None
) -> AsyncIterator[Node]:
    writer = LedgerWriter(engine)
    writer.start()
    index = TokenIndex(engine)
    index.refresh()
    context = Context(index, BurstFolder(writer, bursts), "test-node", ZONE)
    listener = build(context)
    await listener.start()
    try:
        yield Node(engine, listener, writer, index, context)
    finally:
        await listener.stop()
        context.folder.close()
        await writer.stop()


def run_dns(
    engine: Engine, bursts: BurstOptions | None = None, **options: Any
) -> contextlib.AbstractAsyncContextManager[Node]:
    return run_listener(
        engine,
        lambda context: DnsListener(context, DnsOptions(zone=ZONE, port=0, **options)),
        bursts,
    )


def run_smtp(
    engine: Engine, bursts: BurstOptions | None = None, **options: Any
) -> contextlib.AbstractAsyncContextManager[Node]:
    def build(context: Context) -> SmtpListener:
        context.tls = node_certificate()
        return SmtpListener(context, SmtpOptions(port=0, **options))

    return run_listener(engine, build, bursts)


def run_http(
    engine: Engine, bursts: BurstOptions | None = None, **options: Any
) -> contextlib.AbstractAsyncContextManager[Node]:
    return run_listener(
        engine, lambda context: HttpListener(context, HttpOptions(port=0, **options)), bursts
    )


def run_tls(
    engine: Engine, http: HttpOptions | None = None, **options: Any
) -> contextlib.AbstractAsyncContextManager[Node]:
    def build(context: Context) -> TlsListener:
        context.tls = node_certificate()
        return TlsListener(
            context, TlsOptions(enabled=True, port=0, **options), http or HttpOptions(port=0)
        )

    return run_listener(engine, build)


def run_postgres(engine: Engine, **options: Any) -> contextlib.AbstractAsyncContextManager[Node]:
    def build(context: Context) -> PostgresListener:
        context.tls = node_certificate()
        return PostgresListener(context, PostgresOptions(enabled=True, port=0, **options))

    return run_listener(engine, build)


@functools.cache
def ssh_host_key() -> bytes:
    """One SSH host key for every test that runs the SSH listener."""
    return host_key()


def run_ssh(engine: Engine, **options: Any) -> contextlib.AbstractAsyncContextManager[Node]:
    def build(context: Context) -> SshListener:
        context.ssh_host_key = ssh_host_key()
        return SshListener(context, SshOptions(enabled=True, port=0, **options))

    return run_listener(engine, build)


@functools.cache
def served_pem() -> bytes:
    """One self-signed key and certificate for the test zone, for every test that serves TLS."""
    return self_signed(ZONE)


def served_ca() -> str:
    """The node's self-signed certificate alone (its own CA), as PEM."""
    pem = served_pem()
    return pem[pem.index(b"-----BEGIN CERTIFICATE") :].decode()


def trusting() -> ssl.SSLContext:
    """A client context that trusts the node's self-signed certificate (and checks the name)."""
    return ssl.create_default_context(cadata=served_ca())


def trusting_anything() -> ssl.SSLContext:
    """A client context that takes any certificate, as `curl -k` does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def node_certificate() -> NodeCertificate:
    return NodeCertificate(Served(served_pem(), "self-signed"))


def hits(engine: Engine, type_: str = "hit") -> list[ledger.Entry]:
    with engine.connect() as connection:
        return [entry for entry in ledger.entries(connection) if entry.type == type_]


def plant_canary(engine: Engine, kind: str = "dns", sandbox: str = "sbx-1", **extra: Any) -> Canary:
    return mint(
        engine, kind=kind, zone=ZONE, sandbox=sandbox, node="test", location="/etc/hosts", **extra
    )


async def record_burst(engine: Engine, canary: Canary, count: int, sources: int = 3) -> None:
    """`count` DNS hits of `canary` as a listener records a burst: the first on its own,
    the rest folded into one aggregate row."""
    writer = LedgerWriter(engine)
    writer.start()
    folder = BurstFolder(writer, BurstOptions(threshold=1, interval=10, max_waiting=1 << 20))
    committed = asyncio.get_running_loop().create_future()
    left = [count]

    def done(entry: ledger.Entry | None) -> None:
        assert entry is not None
        left[0] -= 1
        if not left[0]:
            committed.set_result(None)

    for number in range(count):
        evidence = {"qname": "x", "qtype": "A", "left_labels": [f"d{number}"]}
        peer = (f"198.51.100.{number % sources + 1}", 53)
        folder.submit(
            hit_event(canary, protocol="dns", peer=peer, node="n", evidence=evidence), done
        )
    folder.close()
    await committed
    await writer.stop()


def legacy_token() -> str:
    """A token as minted before checks were keyed: anyone can make one that looks valid."""
    random_part = secrets.token_bytes(14)
    check = hashlib.sha256(b"oobwatch-token" + random_part).digest()[:2]
    return base64.b32encode(random_part + check).decode().rstrip("=").lower()


def forged_tokens(key: TokenKey, count: int) -> list[str]:
    """Names anyone could make that passed the old unkeyed checksum.

    The few that pass `key`'s check by chance (1 in 65,536) are left out:
    those are plausible, and asking the store about them is right.
    """
    tokens = (legacy_token() for _ in range(count * 2))
    return [token for token in tokens if not is_plausible(token, key)][:count]


def plant_legacy_canary(engine: Engine) -> Canary:
    """A canary minted before checks were keyed, as a store upgraded in place still holds.

    Its token is one of the 65,535 in 65,536 that the store's key does not pass.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("canaries.mint.new_token", lambda key: forged_tokens(key, 1)[0])
        return plant_canary(engine)


def numbered_event(number: int, node: str = "n1") -> Event:
    """A hit event whose evidence carries `number`, and text that must survive hashing."""
    return Event(
        type="hit",
        time_us=now_us(),
        node=node,
        canary_id=f"cn-{number}",
        sandbox="sbx",
        protocol="dns",
        source="198.51.100.7:5353",
        data={"qname": f"q{number}.example.", "n": number, "text": "ünïcode \x00"},
    )


def append_many(url: str, node: str, rounds: int) -> None:
    """Run in a separate process: append `rounds` transactions of two events each."""
    engine = open_engine(url)
    for number in range(rounds):
        with engine.begin() as connection:
            ledger.append(connection, [numbered_event(number, node), numbered_event(number, node)])
    engine.dispose()


def drop_ledger_guards(connection: Any) -> None:
    """What a deliberate tamperer does first: remove the triggers that refuse UPDATE and DELETE."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("DROP TRIGGER ledger_no_change ON ledger")
    else:
        connection.exec_driver_sql("DROP TRIGGER ledger_no_update")
        connection.exec_driver_sql("DROP TRIGGER ledger_no_delete")


def node_config(
    tmp_path: Path,
    alert_url: str,
    alerts_extra: str = "",
    extra: str = "",
    store_url: str | None = None,
    node: str = "n1",
) -> Path:
    """A node config on 127.0.0.1 with every port 0 and SQLite in `tmp_path` (or `store_url`).

    `alerts_extra` continues the `[alerts]` table; `extra` adds tables after it.
    """
    path = tmp_path / "oobwatch.toml"
    path.write_text(
        f"""
[node]
name = "{node}"
[store]
url = "{store_url or f"sqlite:///{tmp_path / 'oobwatch.db'}"}"
[dns]
zone = "canary.example.test"
port = 0
[smtp]
port = 0
[http]
port = 0
[api]
port = 0
[alerts]
urls = ["{alert_url}"]
{alerts_extra}
{extra}
"""
    )
    return path


class Serving:
    """`oobwatch serve` as a real process, restartable; `ports` by listener name."""

    def __init__(
        self, config: Path, names: tuple[str, ...] = ("dns", "smtp", "http", "api")
    ) -> None:
        self.config = config
        self.names = names
        self.process: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> "Serving":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "oobwatch.cli", "--config", str(self.config), "serve"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        for _ in self.names:
            name, _, port = self.process.stdout.readline().partition(" listening on 127.0.0.1:")
            self.ports[name] = int(port)
        assert set(self.ports) == set(self.names)
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(30) == 0
        self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


def store_with(tmp_path: Path, events: list[Event], extra: str = "") -> tuple[Path, Engine]:
    """A config naming a fresh SQLite store in `tmp_path`, and its engine, with `events` appended."""
    url = f"sqlite:///{tmp_path / 'oobwatch.db'}"
    config = tmp_path / "oobwatch.toml"
    config.write_text(f"[store]\nurl = '{url}'\n{extra}")
    engine = open_engine(url)
    migrate(engine)
    with engine.begin() as connection:
        ledger.append(connection, events)
    return config, engine


@contextlib.contextmanager
def resolving(suffix: str) -> Iterator[None]:
    """In this process only, names ending in `suffix` resolve to 127.0.0.1, as planted hosts would."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # httpx (through anyio) asks with the name IDNA-encoded, as bytes.
        name = host.decode() if isinstance(host, bytes) else host
        if isinstance(name, str) and name.endswith(suffix):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.getaddrinfo = real


async def settle(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait, within a bound, until `predicate()` holds, letting listeners in this loop run."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)


async def send_without_reading(port: int, payload: bytes, rounds: int) -> socket.socket:
    """Connect with a tiny receive buffer and send `payload` `rounds` times, never reading.

    Stops early once the server hangs up; returns the socket for the caller to close.
    """
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    for _ in range(rounds):
        try:
            raw.send(payload)
        except BlockingIOError:
            await asyncio.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    return raw
