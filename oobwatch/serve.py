"""`oobwatch serve`: every listener, the pager and the scheduler in one asyncio loop."""

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Engine

from alerts.incidents import Incidents, Timing
from alerts.outbox import Outbox, Retry
from alerts.policy import Policy
from canaries.index import TokenIndex
from listeners.base import Context, Listener
from listeners.dns import DnsListener, DnsOptions
from listeners.http import AsgiServer, HttpListener, HttpOptions
from listeners.smtp import SmtpListener, SmtpOptions
from oobwatch.api import build_api
from oobwatch.config import Config
from oobwatch.heartbeat import Heartbeat, heartbeat_canary
from oobwatch.integrity import Integrity
from oobwatch.metrics import NodeCollector
from store.clock import now_us
from store.engine import migrate, open_engine
from store.ledger import Entry
from store.writer import LedgerWriter

log = logging.getLogger(__name__)

INDEX_REFRESH_SECONDS = 1.0
OUTBOX_SECONDS = 1.0
DISPATCH_SECONDS = 1.0
ALERT_TIMERS_SECONDS = 1.0
STATS_SECONDS = 60.0
BUSY_DISPATCH = 50
BUSY_PAUSE_SECONDS = 0.05


def _dns(config: Config, context: Context) -> Listener:
    dns = config.dns
    options = DnsOptions(
        zone=dns.zone,
        listen=dns.listen,
        port=dns.port,
        answer_ipv4=[str(address) for address in dns.answer_ipv4],
        answer_ipv6=[str(address) for address in dns.answer_ipv6],
        ttl=dns.ttl,
        nameservers=dns.nameservers,
    )
    return DnsListener(context, options)


def _smtp(config: Config, context: Context) -> Listener:
    smtp = config.smtp
    options = SmtpOptions(
        zone=config.dns.zone,
        listen=smtp.listen,
        port=smtp.port,
        domains=smtp.domains,
        max_message_bytes=smtp.max_message_bytes,
        max_connections_per_source=smtp.max_connections_per_source,
        timeout=smtp.timeout,
        tls_cert=smtp.tls_cert,
        tls_key=smtp.tls_key,
    )
    return SmtpListener(context, options)


def _http(config: Config, context: Context) -> Listener:
    http = config.http
    options = HttpOptions(
        zone=config.dns.zone,
        listen=http.listen,
        port=http.port,
        response=http.response,
        max_body=http.max_body_bytes,
    )
    return HttpListener(context, options)


# Every listener kind, by name: how to build it and whether the config enables it.
LISTENERS: dict[str, tuple[Callable[[Config, Context], Listener], Callable[[Config], bool]]] = {
    "dns": (_dns, lambda config: config.dns.enabled),
    "smtp": (_smtp, lambda config: config.smtp.enabled),
    "http": (_http, lambda config: config.http.enabled),
}


@dataclass
class Node:
    """A running node: its listeners by name, and what they share."""

    config: Config
    engine: Engine
    writer: LedgerWriter
    index: TokenIndex
    incidents: Incidents
    outbox: Outbox
    scheduler: AsyncIOScheduler
    heartbeat: Heartbeat | None = None
    integrity: Integrity | None = None
    api: AsgiServer | None = None
    listeners: dict[str, Listener] = field(default_factory=dict)
    contexts: dict[str, Context] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dispatch_due: asyncio.Event = field(default_factory=asyncio.Event)
    send_due: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.stop()
        for listener in self.listeners.values():
            await listener.stop()
        self.scheduler.shutdown(wait=False)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.outbox.close()
        await self.writer.stop()

    def committed(self, entries: Sequence[Entry]) -> None:
        """The writer's commit notification: new hits mean alert work."""
        if any(entry.type == "hit" for entry in entries):
            self.dispatch_due.set()

    async def dispatching(self) -> None:
        while True:
            await self.dispatch_due.wait()
            self.dispatch_due.clear()
            try:
                if await asyncio.to_thread(self.incidents.dispatch, now_us()):
                    self.send_due.set()
                if self.incidents.last_dispatched >= BUSY_DISPATCH:
                    # Under a burst of hits, gather them into fewer, larger batches: each
                    # dispatch holds the store's write lock, which the listeners' commits need.
                    await asyncio.sleep(BUSY_PAUSE_SECONDS)
            except Exception:
                log.exception("alert dispatch failed; retrying")
                await asyncio.sleep(1)
                self.dispatch_due.set()

    async def sending(self) -> None:
        while True:
            await self.send_due.wait()
            self.send_due.clear()
            try:
                await self.outbox.work()
            except Exception:
                log.exception("outbox work failed; retrying")
                await asyncio.sleep(1)

    async def timed_alert_work(self) -> None:
        """Digests and escalations that have come due."""
        moment = now_us()
        queued = await asyncio.to_thread(self.incidents.digests, moment)
        queued += await asyncio.to_thread(self.incidents.escalations, moment)
        if queued:
            self.send_due.set()

    async def anchor_head(self) -> None:
        assert self.integrity is not None
        await asyncio.to_thread(self.integrity.anchor, now_us())
        self.send_due.set()

    async def verify_ledger(self) -> None:
        assert self.integrity is not None
        await asyncio.to_thread(self.integrity.check, now_us())
        self.send_due.set()

    async def self_test(self) -> None:
        if self.heartbeat is None:
            return
        await self.heartbeat.check({name: lsn.addresses for name, lsn in self.listeners.items()})
        self.send_due.set()


def incidents_for(config: Config, engine: Engine, policy: Policy) -> Incidents:
    """Alert state from configuration: all that acking, resolving or the API needs."""
    timing = Timing(config.alerts.dedupe_window, config.alerts.digest_every)
    return Incidents(engine, policy, timing, config.node.name)


def outbox_for(config: Config, engine: Engine, policy: Policy) -> Outbox:
    """The sender of deliveries; only a serving node needs it."""
    alerts = config.alerts
    retry = Retry(alerts.retry_base, alerts.retry_max, alerts.max_attempts)
    return Outbox(engine, policy, retry, config.node.name, now_us)


async def start(config: Config) -> Node:
    """Open the store, start the writer, listeners, alert pipeline and scheduler."""
    engine = open_engine(config.store.url)
    await asyncio.to_thread(migrate, engine)
    writer = LedgerWriter(engine)
    writer.start()
    index = TokenIndex(engine)
    # One policy for every part: routes and compiled ignore rules, built once.
    policy = config.policy()
    incidents = incidents_for(config, engine, policy)
    outbox = outbox_for(config, engine, policy)
    scheduler = AsyncIOScheduler()
    node = Node(config, engine, writer, index, incidents, outbox, scheduler)
    await asyncio.to_thread(outbox.release_own_leases)
    writer.subscribe(node.committed)
    if config.heartbeat.enabled:
        canary = await asyncio.to_thread(
            heartbeat_canary, engine, config.node.name, config.dns.zone
        )
        node.heartbeat = Heartbeat(
            engine,
            policy,
            canary,
            config.dns.zone,
            config.node.name,
            config.heartbeat.route,
            config.heartbeat.deadline,
            now_us,
        )
    node.integrity = Integrity(
        engine,
        policy,
        config.node.name,
        config.ledger.anchor_file,
        config.ledger.anchor_route,
        config.heartbeat.route,
    )
    await asyncio.to_thread(index.refresh)

    async def refresh() -> None:
        await asyncio.to_thread(index.refresh)

    def stats() -> None:
        for name, context in node.contexts.items():
            log.info("%s counters %s", name, context.counters.as_dict())
        log.info(
            "ledger appended=%d batches=%d; deliveries sent=%d failed=%d",
            writer.appended,
            writer.batches,
            outbox.sent,
            outbox.failed,
        )

    every = {"max_instances": 1, "coalesce": True}
    scheduler.add_job(refresh, "interval", seconds=INDEX_REFRESH_SECONDS, **every)
    scheduler.add_job(node.send_due.set, "interval", seconds=OUTBOX_SECONDS, **every)
    # Hits committed by other processes or nodes (one that died before dispatching them).
    scheduler.add_job(node.dispatch_due.set, "interval", seconds=DISPATCH_SECONDS, **every)
    scheduler.add_job(node.timed_alert_work, "interval", seconds=ALERT_TIMERS_SECONDS, **every)
    scheduler.add_job(stats, "interval", seconds=STATS_SECONDS)
    scheduler.add_job(
        node.verify_ledger, "interval", seconds=config.ledger.verify_every / 1e6, **every
    )
    if config.ledger.anchor_file is not None or config.ledger.anchor_route is not None:
        scheduler.add_job(
            node.anchor_head, "interval", seconds=config.ledger.anchor_every / 1e6, **every
        )
    if node.heartbeat is not None:
        scheduler.add_job(
            node.self_test, "interval", seconds=config.heartbeat.interval / 1_000_000, **every
        )
    for name, (build, enabled) in LISTENERS.items():
        if not enabled(config):
            continue
        context = Context(index, writer, config.node.name)
        listener = build(config, context)
        await listener.start()
        node.listeners[name] = listener
        node.contexts[name] = context
    if config.api.enabled:
        app = build_api(engine, config, incidents, NodeCollector(node))
        node.api = AsgiServer(app, config.api.listen, config.api.port)
        await node.api.start()
    node.tasks = [asyncio.create_task(node.dispatching()), asyncio.create_task(node.sending())]
    # Hits committed before a restart, and deliveries left pending, are taken up at once.
    node.dispatch_due.set()
    node.send_due.set()
    scheduler.start()
    log.info("oobwatch node %s serving %d canaries", config.node.name, len(index))
    return node


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly, committing what is queued."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    node = await start(config)
    for name, listener in node.listeners.items():
        for host, port in listener.addresses:
            print(f"{name} listening on {host}:{port}", flush=True)
    if node.api is not None:
        for host, port in node.api.addresses:
            print(f"api listening on {host}:{port}", flush=True)
    await stopping.wait()
    log.info("stopping")
    await node.stop()
