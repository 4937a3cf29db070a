"""`oobwatch doctor`: what is wrong with this node, before a canary is planted that relies on it.

Each check says ok or not, and why, in one line: the config, each listener's
address (free to bind, or answered by a node running there), the store and
its schema, the spool, the alert routes (and, if asked, a test page through
each of their sinks), the zone's delegation as a resolver sees it, the
certificate, and the clock. A check that cannot be made fails; it never passes
by default.
"""

import asyncio
import errno
import os
import pwd
import smtplib
import socket
import stat
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import httpx
from dnslib import QTYPE, RCODE, DNSRecord
from sqlalchemy import Connection, Engine, func, select, text

from alerts import sinks
from alerts.deliveries import delivery_payload
from alerts.policy import Route
from alerts.render import Line, Message
from oobwatch.config import Config, sink_problems
from store.clock import now_us, to_iso
from store.engine import HEAD_REVISION, open_engine, revision
from store.schema import ledger as ledger_table
from store.spool import inspect, strays

# Clocks further apart than this make times in the ledger misleading.
CLOCK_SKEW_SECONDS = 5.0
DNS_TIMEOUT = 3.0
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapped, never bound


@dataclass(frozen=True, slots=True)
class Check:
    check: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run(
    config: Config, resolver: tuple[str, int] | None = None, send_test_page: bool = False
) -> list[Check]:
    """Every check, in the order a person would fix them."""
    checks = [Check("config", True, f"{config.source} loads")]
    checks += listener_checks(config)
    checks += store_checks(config)
    checks.append(spool_check(config))
    checks += alert_checks(config, send_test_page)
    checks += delegation_checks(config, resolver or system_resolver())
    if all(check.ok for check in checks if check.check in ("store", "schema")):
        checks.append(certificate_check(config))
    else:
        checks.append(Check("certificate", False, "not checked: the store is not usable"))
    return checks


def _listeners(config: Config) -> list[tuple[str, str, int, socket.SocketKind]]:
    """(name, address, port, socket type) of everything the node would bind."""
    bound: list[tuple[str, str, int, socket.SocketKind]] = []
    for name in ("dns", "smtp", "http", "https", "postgres", "ssh", "api"):
        options = getattr(config, name)
        if not options.enabled:
            continue
        bound.append((name, options.listen, options.port, socket.SOCK_STREAM))
        if name == "dns":
            bound.append((name, options.listen, options.port, socket.SOCK_DGRAM))
    if config.smtp.enabled and config.smtp.tls_port is not None:
        bound.append(("smtp", config.smtp.listen, config.smtp.tls_port, socket.SOCK_STREAM))
    return bound


def listener_checks(config: Config) -> list[Check]:
    checks = []
    for name, listen, port, kind in _listeners(config):
        where = f"{name} {'udp' if kind == socket.SOCK_DGRAM else 'tcp'} {listen}:{port}"
        family = socket.AF_INET6 if ":" in listen else socket.AF_INET
        try:
            with socket.socket(family, kind) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((listen, port))
        except OSError as error:
            if error.errno == errno.EACCES:
                checks.append(
                    Check(
                        f"listen {where}",
                        False,
                        "permission denied: ports under 1024 need root (with [node] user) "
                        "or CAP_NET_BIND_SERVICE",
                    )
                )
                continue
            if error.errno != errno.EADDRINUSE:
                checks.append(Check(f"listen {where}", False, error.strerror or str(error)))
                continue
            answer = _answering(config, name, _WILDCARDS.get(listen, listen), port, kind)
            checks.append(Check(f"listen {where}", answer is None, answer or "in use, answering"))
            continue
        checks.append(Check(f"listen {where}", True, "free to bind"))
    return checks


def _answering(
    config: Config, name: str, host: str, port: int, kind: socket.SocketKind
) -> str | None:
    """None when what holds `host:port` answers as this listener would; else what is wrong."""
    try:
        if name == "dns":
            question = DNSRecord.question(config.dns.zone, "SOA")
            reply = DNSRecord.parse(
                question.send(host, port, tcp=kind == socket.SOCK_STREAM, timeout=DNS_TIMEOUT)
            )
            if reply.header.aa and reply.header.rcode == RCODE.NOERROR:
                return None
            return "in use by something that does not answer for the zone"
        if name == "smtp":
            with smtplib.SMTP(host, port, timeout=DNS_TIMEOUT) as client:
                code, _ = client.noop()
            return None if code == 250 else f"in use; NOOP answered {code}"
        if name == "api":
            reply_code = httpx.get(f"http://{host}:{port}/healthz", timeout=DNS_TIMEOUT)
            return None if reply_code.status_code == 200 else "in use; /healthz does not answer"
        with socket.create_connection((host, port), timeout=DNS_TIMEOUT):
            return None
    except (OSError, smtplib.SMTPException, httpx.HTTPError) as error:
        return f"in use by something that does not answer: {error}"


def store_checks(config: Config) -> list[Check]:
    engine = open_engine(config.store.url)
    try:
        try:
            with engine.connect() as connection:
                store_now = _store_clock(connection)
            found = revision(engine)
            newest = _newest_row_us(engine) if found is not None else None
        except Exception as error:  # any driver's way of saying it cannot connect
            return [Check("store", False, f"cannot reach it: {error}".splitlines()[0])]
        checks = [Check("store", True, f"reachable ({engine.dialect.name})")]
        if found != HEAD_REVISION:
            detail = f"schema at {found or 'none'}, this version needs {HEAD_REVISION}"
            checks.append(Check("schema", False, detail + ": run `oobwatch migrate`"))
        else:
            checks.append(Check("schema", True, f"at {HEAD_REVISION}"))
        checks.append(_clock_check(store_now, newest))
        return checks
    finally:
        engine.dispose()


def _store_clock(connection: Connection) -> float | None:
    """The database server's clock (PostgreSQL), in seconds; None for SQLite (it has none)."""
    if connection.dialect.name != "postgresql":
        return None
    query = text("SELECT extract(epoch FROM clock_timestamp())")
    return float(connection.execute(query).scalar_one())


def _newest_row_us(engine: Engine) -> int | None:
    with engine.connect() as connection:
        newest = connection.execute(select(func.max(ledger_table.c.time_us))).scalar()
    return None if newest is None else int(newest)


def _clock_check(store_now: float | None, newest_us: int | None) -> Check:
    here = time.time()
    if store_now is not None and abs(store_now - here) > CLOCK_SKEW_SECONDS:
        return Check(
            "clock",
            False,
            f"this host and the database disagree by {abs(store_now - here):.1f} s (run NTP)",
        )
    if newest_us is not None and newest_us / 1e6 - here > CLOCK_SKEW_SECONDS:
        return Check(
            "clock",
            False,
            f"the ledger's newest row is from {to_iso(newest_us)}, later than this host's "
            "clock: it is behind (run NTP)",
        )
    detail = "agrees with the database" if store_now is not None else "no database clock (SQLite)"
    return Check("clock", True, f"{to_iso(now_us())}, {detail}")


def spool_check(config: Config) -> Check:
    """Whether the spool could be written by the node, and what waits in it (read only: the
    node that owns it may be writing)."""
    path = config.spool_path
    folder = path.parent
    if not _writable(folder, config.node.user):
        who = f"user {config.node.user}" if config.node.user else "this user"
        return Check("spool", False, f"{folder} is not writable by {who}: nothing could be spooled")
    left = strays(path)
    if left:
        listed = ", ".join(f"{stray} ({waiting} events)" for stray, waiting in left)
        return Check("spool", False, f"spools not this node's hold events: {listed}")
    look = inspect(path)
    if look.pending:
        return Check(
            "spool",
            False,
            f"{look.pending} events in {path} are not in the ledger yet: `serve` replays them",
        )
    damaged = f", {look.damaged} damaged lines" if look.damaged else ""
    return Check("spool", not look.damaged, f"{path}: empty ({look.size} bytes{damaged})")


def _writable(folder: Path, user: str | None) -> bool:
    """Whether `folder` can take new files: by `user` when root will become it, else by us."""
    if not folder.is_dir():
        return False
    if user is None or os.geteuid() != 0:
        return os.access(folder, os.W_OK | os.X_OK)
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return False
    mode = folder.stat()
    groups = {account.pw_gid, *os.getgrouplist(account.pw_name, account.pw_gid)}
    if mode.st_uid == account.pw_uid:
        return bool(mode.st_mode & stat.S_IWUSR and mode.st_mode & stat.S_IXUSR)
    if mode.st_gid in groups:
        return bool(mode.st_mode & stat.S_IWGRP and mode.st_mode & stat.S_IXGRP)
    return bool(mode.st_mode & stat.S_IWOTH and mode.st_mode & stat.S_IXOTH)


def alert_checks(config: Config, send_test_page: bool) -> list[Check]:
    policy = config.policy()
    routes = {name: route for name, route in policy.routes.items() if route.sinks}
    if not routes:
        return [Check("alerts", False, "no route has a sink: hits would page nobody")]
    problems = sink_problems(config)
    checks = [
        Check(
            "alerts",
            not problems,
            "; ".join(problems) or f"{len(routes)} route(s): {', '.join(sorted(routes))}",
        )
    ]
    if send_test_page:
        checks += asyncio.run(_test_pages(config, routes))
    return checks


async def _test_pages(config: Config, routes: dict[str, Route]) -> list[Check]:
    """One test page through each sink of each route, now; whether each sink took it."""
    message = Message(
        f"oobwatch test page from node {config.node.name}",
        f"A test page sent by `oobwatch doctor --send-test-page` on node {config.node.name}",
        [Line("node", config.node.name)],
    )
    payload = delivery_payload(
        "test", node=config.node.name, dedup_key=f"test-{config.node.name}", message=message
    )
    checks = []
    async with httpx.AsyncClient(follow_redirects=False) as client:
        for name, route in routes.items():
            for sink in route.sinks:
                label = f"test page {name}/{sink.key}"
                try:
                    async with asyncio.timeout(20):
                        await sinks.build(sink, client).send(0, {**payload, "route": name})
                except Exception as error:
                    checks.append(Check(label, False, f"not delivered: {error}"))
                else:
                    checks.append(Check(label, True, "delivered"))
    return checks


def system_resolver() -> tuple[str, int] | None:
    """The first nameserver of /etc/resolv.conf."""
    try:
        lines = Path("/etc/resolv.conf").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return parts[1], 53
    return None


def parse_resolver(value: str) -> tuple[str, int]:
    """IP, IP:PORT or [IPv6]:PORT."""
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
        return host.rstrip("]"), int(port or 53)
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, 53


def _ask(resolver: tuple[str, int], name: str, qtype: str) -> DNSRecord:
    question = DNSRecord.question(name, qtype)
    question.header.rd = 1
    return DNSRecord.parse(question.send(*resolver, timeout=DNS_TIMEOUT))


def _name(value: object) -> str:
    return str(value).rstrip(".").lower()


def delegation_checks(config: Config, resolver: tuple[str, int] | None) -> list[Check]:
    """The zone's NS set and glue as `resolver` sees them, and whether this node is among them."""
    zone = config.dns.zone
    if resolver is None:
        return [Check("delegation", False, "no resolver: give --resolver IP[:PORT]")]
    where = f"{resolver[0]}:{resolver[1]}"
    try:
        reply = _ask(resolver, zone, "NS")
    except (OSError, ValueError) as error:
        return [Check("delegation", False, f"resolver {where} did not answer: {error}")]
    servers = sorted(
        {
            _name(record.rdata)
            for record in (*reply.rr, *reply.auth)
            if record.rtype == QTYPE.NS and _name(record.rname) == zone
        }
    )
    if not servers:
        rcode = RCODE.get(reply.header.rcode)
        return [
            Check("delegation", False, f"{where} knows no NS for {zone} ({rcode}): not delegated")
        ]
    addresses = _addresses(resolver, reply, servers)
    mine = {str(address) for address in (*config.dns.answer_ipv4, *config.dns.answer_ipv6)}
    listed = ", ".join(
        f"{server} {'/'.join(addresses[server]) or '(no address)'}" for server in servers
    )
    ours = mine & {address for found in addresses.values() for address in found}
    checks = [
        Check(
            "delegation",
            bool(ours),
            f"{zone} NS {listed}"
            + (
                ""
                if ours
                else f"; none is this node's ({', '.join(sorted(mine)) or 'no answer_ipv4'})"
            ),
        )
    ]
    missing = [server for server in servers if not addresses[server]]
    checks.append(
        Check(
            "glue",
            not missing,
            f"no address for {', '.join(missing)}"
            if missing
            else "every name server has an address",
        )
    )
    if config.smtp.enabled:
        checks.append(_mx_check(resolver, zone, where))
    return checks


def _addresses(
    resolver: tuple[str, int], reply: DNSRecord, servers: list[str]
) -> dict[str, list[str]]:
    """Each name server's addresses: the glue in the reply, else asked of the resolver."""
    found: dict[str, list[str]] = {server: [] for server in servers}
    for record in reply.ar:
        if record.rtype in (QTYPE.A, QTYPE.AAAA) and _name(record.rname) in found:
            found[_name(record.rname)].append(str(record.rdata))
    for server, addresses in found.items():
        if addresses:
            continue
        try:
            answer = _ask(resolver, server, "A")
        except (OSError, ValueError):
            continue
        addresses += [str(record.rdata) for record in answer.rr if record.rtype == QTYPE.A]
    return found


def _mx_check(resolver: tuple[str, int], zone: str, where: str) -> Check:
    try:
        reply = _ask(resolver, zone, "MX")
    except (OSError, ValueError) as error:
        return Check("mx", False, f"{where} did not answer MX for {zone}: {error}")
    exchanges = [_name(record.rdata.label) for record in reply.rr if record.rtype == QTYPE.MX]
    if exchanges:
        return Check("mx", True, f"{zone} MX {', '.join(exchanges)}")
    if not reply.header.ra:
        return Check(
            "mx", True, f"{where} is not recursive: MX checked through it only for a referral"
        )
    return Check("mx", False, f"{zone} has no MX: mail canaries would not be delivered here")


def certificate_check(config: Config) -> Check:
    if not (config.https.enabled or config.smtp.enabled or config.postgres.enabled):
        return Check("certificate", True, "no TLS listener")
    from oobwatch.operations import LocalOperations

    try:
        view = LocalOperations(config).tls()
    except Exception as error:
        return Check("certificate", False, f"cannot be loaded: {error}")
    expires = view.not_after
    if view.acme_error:
        return Check("certificate", False, f"ACME failed: {view.acme_error}")
    left = _days_until(expires)
    if left < 0:
        return Check("certificate", False, f"expired {expires}")
    note = (
        " (self-signed: clients that verify refuse it, but still leave their hit)"
        if view.source == "self-signed"
        else ""
    )
    return Check(
        "certificate", True, f"{view.source}, {', '.join(view.sans)}, {left:.0f} days left{note}"
    )


def _days_until(iso: str) -> float:
    return (datetime.fromisoformat(iso).timestamp() - time.time()) / 86_400


def line(check: Check) -> str:
    return f"{'ok  ' if check.ok else 'FAIL'}  {check.check}: {check.detail}"
