"""`oobwatch serve`: every listener, the pager and the scheduler in one asyncio loop."""

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from alerts.pager import Pager
from canaries.index import TokenIndex
from listeners.base import Context, Listener
from listeners.dns import DnsListener, DnsOptions
from listeners.http import HttpListener, HttpOptions
from listeners.smtp import SmtpListener, SmtpOptions
from oobwatch.config import Config
from store.engine import migrate, open_engine
from store.writer import LedgerWriter

log = logging.getLogger(__name__)

INDEX_REFRESH_SECONDS = 1.0
STATS_SECONDS = 60.0


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
    writer: LedgerWriter
    index: TokenIndex
    pager: Pager
    scheduler: AsyncIOScheduler
    listeners: dict[str, Listener] = field(default_factory=dict)
    contexts: dict[str, Context] = field(default_factory=dict)

    async def stop(self) -> None:
        for listener in self.listeners.values():
            await listener.stop()
        self.scheduler.shutdown(wait=False)
        await self.pager.stop()
        await self.writer.stop()


async def start(config: Config) -> Node:
    """Open the store, start the writer, listeners, pager and scheduler."""
    engine = open_engine(config.store.url)
    await asyncio.to_thread(migrate, engine)
    writer = LedgerWriter(engine)
    writer.start()
    index = TokenIndex(engine)
    await asyncio.to_thread(index.refresh)
    pager = Pager(writer, config.alerts.urls, config.node.name)
    pager.start()
    scheduler = AsyncIOScheduler()
    node = Node(config, writer, index, pager, scheduler)

    async def refresh() -> None:
        await asyncio.to_thread(index.refresh)

    def stats() -> None:
        for name, context in node.contexts.items():
            log.info("%s counters %s", name, context.counters.as_dict())
        log.info(
            "ledger appended=%d batches=%d; pager backlog=%d",
            writer.appended,
            writer.batches,
            pager.backlog,
        )

    scheduler.add_job(
        refresh, "interval", seconds=INDEX_REFRESH_SECONDS, max_instances=1, coalesce=True
    )
    scheduler.add_job(stats, "interval", seconds=STATS_SECONDS)
    scheduler.start()
    for name, (build, enabled) in LISTENERS.items():
        if not enabled(config):
            continue
        context = Context(index, writer, config.node.name)
        listener = build(config, context)
        await listener.start()
        node.listeners[name] = listener
        node.contexts[name] = context
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
    await stopping.wait()
    log.info("stopping")
    await node.stop()
