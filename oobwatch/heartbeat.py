"""Self-test: trip a built-in canary through each listener over the network, and check it lands.

Each node keeps its own heartbeat canary (sandbox `oobwatch-heartbeat`,
located at the node's name). Every interval the node sends a DNS query, an
SMTP RCPT and an HTTP GET for it to each enabled listener's own address, then
waits up to the deadline for the hit in the ledger. A listener that stops
landing its hit pages the heartbeat route once, with since when; its recovery
pages once more. Heartbeat hits never open incidents.
"""

import asyncio
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh
import httpx
from dnslib import DNSRecord
from sqlalchemy import Engine, func, select

from alerts import notices
from alerts.policy import DEFAULT_ROUTE, Policy
from canaries.mint import mint
from canaries.model import HEARTBEAT_SANDBOX, Canary
from listeners import pgwire
from store import ledger, registry
from store.health import PROTOCOL_OF
from store.ledger import Event
from store.schema import ledger as ledger_table

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


def heartbeat_canary(engine: Engine, node: str, zone: str) -> Canary:
    """This node's heartbeat canary, minted the first time."""
    with engine.connect() as connection:
        for row in registry.listing(connection, HEARTBEAT_SANDBOX):
            if row["location"] == node:
                return Canary.from_row(row)
    return mint(
        engine,
        kind="dns",
        zone=zone,
        sandbox=HEARTBEAT_SANDBOX,
        node=node,
        location=node,
        labels={"heartbeat": "true"},
        severity="low",
        note="built-in self-test canary",
        heartbeat=True,
    )


def _reachable(host: str) -> str:
    """The address to probe for a listener bound to `host` (a wildcard means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - comparing, not binding


async def probe_dns(address: tuple[str, int], name: str, seconds: float) -> None:
    query = DNSRecord.question(name, "A").pack()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, query, address)
        async with asyncio.timeout(seconds):
            await loop.sock_recv(sock, 4096)


async def probe_smtp(address: tuple[str, int], rcpt: str, seconds: float) -> None:
    def session() -> None:
        with smtplib.SMTP(address[0], address[1], timeout=seconds) as client:
            client.ehlo("oobwatch-heartbeat")
            client.mail("heartbeat@oobwatch.invalid")
            code, reply = client.rcpt(rcpt)
            if code != 250:
                raise OSError(f"RCPT answered {code} {reply!r}")

    await asyncio.to_thread(session)


async def probe_http(address: tuple[str, int], host: str, seconds: float) -> None:
    authority = f"[{address[0]}]" if ":" in address[0] else address[0]
    async with httpx.AsyncClient(timeout=seconds) as client:
        await client.get(f"http://{authority}:{address[1]}/heartbeat", headers={"Host": host})


async def probe_tls(address: tuple[str, int], name: str, seconds: float) -> None:
    """A TLS handshake naming `name`: the ClientHello is the hit; the certificate is not judged."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(seconds):
        _, writer = await asyncio.open_connection(*address, ssl=context, server_hostname=name)
    writer.close()


async def probe_postgres(address: tuple[str, int], database: str, seconds: float) -> None:
    """A StartupMessage naming `database`: the hit is recorded before the password is asked."""
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(
                pgwire.startup_message({"user": "oobwatch-heartbeat", "database": database})
            )
            kind = await reader.readexactly(1)
            if kind != b"R":
                raise OSError(f"postgres answered message {kind!r}, not an authentication request")
        finally:
            writer.close()


async def probe_ssh(address: tuple[str, int], username: str, seconds: float) -> None:
    """A password attempt as `username`: the hit is recorded, the attempt refused."""
    try:
        async with asyncio.timeout(seconds):
            await asyncssh.connect(
                address[0],
                address[1],
                username=username,
                password="oobwatch-heartbeat",  # noqa: S106 - a probe, refused by design
                known_hosts=None,
                client_keys=None,
                preferred_auth="password",
            )
    except asyncssh.PermissionDenied:
        return
    raise OSError("the SSH listener let a heartbeat in")


# The protocol each listener's hits are recorded with.


@dataclass
class ListenerHealth:
    healthy: bool = True
    failing_since_us: int | None = None
    last_ok_us: int | None = None


@dataclass
class Heartbeat:
    """Probes the node's listeners and pages their failures and recoveries."""

    engine: Engine
    policy: Policy
    canary: Canary
    zone: str
    node: str
    route: str | None
    deadline_us: int
    clock: Callable[[], int]
    health: dict[str, ListenerHealth] = field(default_factory=dict)

    async def check(self, addresses: dict[str, list[tuple[str, int]]]) -> dict[str, bool]:
        """Probe every listener in `addresses` (by name); returns which landed their hit."""
        names = [name for name in PROTOCOL_OF if name in addresses]
        results = await asyncio.gather(*(self._one(name, addresses[name]) for name in names))
        outcome: dict[str, bool] = dict(zip(names, results, strict=True))
        await asyncio.to_thread(self._record, outcome, self.clock())
        return outcome

    async def _one(self, name: str, bound: list[tuple[str, int]]) -> bool:
        started = self.clock()
        timeout = self.deadline_us / 1_000_000
        if not bound:
            return False
        address = (_reachable(bound[0][0]), bound[0][1])
        try:
            if name == "dns":
                await probe_dns(address, f"hb.{self.canary.value}", timeout)
            elif name == "smtp":
                await probe_smtp(address, f"{self.canary.token}@{self.zone}", timeout)
            elif name == "https":
                await probe_tls(address, f"hb.{self.canary.value}", timeout)
            elif name == "postgres":
                await probe_postgres(address, self.canary.token, timeout)
            elif name == "ssh":
                await probe_ssh(address, f"hb_{self.canary.token}", timeout)
            else:
                await probe_http(address, self.canary.value, timeout)
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            httpx.HTTPError,
            smtplib.SMTPException,
            asyncssh.Error,
        ) as error:
            log.warning("heartbeat probe of %s at %s:%d failed: %r", name, *address, error)
            return False
        while self.clock() - started < self.deadline_us:
            if await asyncio.to_thread(self._landed, PROTOCOL_OF[name], started):
                return True
            await asyncio.sleep(POLL_SECONDS)
        return False

    def _landed(self, protocol: str, since_us: int) -> bool:
        with self.engine.connect() as connection:
            found = connection.execute(
                select(func.count())
                .select_from(ledger_table)
                .where(
                    ledger_table.c.canary_id == self.canary.id,
                    ledger_table.c.type == "hit",
                    ledger_table.c.protocol == protocol,
                    ledger_table.c.time_us >= since_us,
                )
            ).scalar_one()
        return bool(found)

    def _record(self, outcome: dict[str, bool], now_us: int) -> None:
        route = self.policy.routes[self.route or DEFAULT_ROUTE]
        with self.engine.begin() as connection:
            events = []
            for name, ok in outcome.items():
                health = self.health.setdefault(name, ListenerHealth())
                if ok:
                    health.last_ok_us = now_us
                if ok == health.healthy:
                    continue
                since = health.failing_since_us if ok else now_us
                health.healthy, health.failing_since_us = ok, None if ok else now_us
                notices.listener_health(
                    connection,
                    route,
                    node=self.node,
                    listener=name,
                    healthy=ok,
                    since_us=since or now_us,
                    now_us=now_us,
                    canary_id=self.canary.id,
                    sandbox=HEARTBEAT_SANDBOX,
                )
                events.append(
                    Event(
                        type="heartbeat_recovered" if ok else "heartbeat_failed",
                        time_us=now_us,
                        node=self.node,
                        canary_id=self.canary.id,
                        sandbox=HEARTBEAT_SANDBOX,
                        data={"listener": name, "since": since},
                    )
                )
            ledger.append(connection, events)
