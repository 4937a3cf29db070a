"""`oobwatch serve`: every listener, the pager and the scheduler in one asyncio loop.

Serve only wires: each part is built where it lives (listeners from their
own options, alerting in `oobwatch.alerting`, operations for the API).
Start-up is all or nothing: a listener that cannot bind stops everything
started before it and is reported as one line naming it, its address and why.
"""

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Engine

from alerts import notices
from alerts.outbox import IN_FLIGHT
from alerts.pager import Pager
from alerts.policy import DEFAULT_ROUTE
from canaries.index import TokenIndex
from listeners.base import Context, Listener, ListenerOptions
from listeners.burst import BurstFolder
from listeners.certificates import Challenges, NodeCertificate, Served
from listeners.dns import DnsListener
from listeners.guard import BACKLOG, ConnectionGuard, StreamOptions
from listeners.http import AsgiServer, HttpListener
from listeners.postgres import PostgresListener
from listeners.smtp import SmtpListener
from listeners.ssh import SshListener
from listeners.ssh import host_key as ssh_host_key
from listeners.tls import TlsListener
from oobwatch import alerting, logs
from oobwatch.api import build_api
from oobwatch.certs import TICK_SECONDS, CertificateKeeper, served
from oobwatch.config import Config, ConfigError
from oobwatch.heartbeat import Heartbeat, heartbeat_canary
from oobwatch.integrity import Integrity
from oobwatch.metrics import NodeCollector
from oobwatch.operations import LocalOperations
from oobwatch.privileges import service_user, settle
from store.clock import now_us
from store.deployment import secret
from store.engine import checkpoint as engine_checkpoint
from store.engine import open_store
from store.spool import Spool, SpoolBusy, strays
from store.writer import LedgerWriter, SpoolChange

log = logging.getLogger(__name__)
T = TypeVar("T")

# The node's housekeeping (index refresh, outbox and dispatch ticks, alert timers, SQLite
# WAL checkpoints) runs every HOUSEKEEPING_SECONDS, each job at its own phase: a node pinned
# to one core ran them all at one instant, a 5-10 ms stall every second that hits arriving
# then waited out.
HOUSEKEEPING_SECONDS = 1.0
STATS_SECONDS = 60.0

# Every listener kind, by the name of its config section.
LISTENERS: dict[str, Callable[[Context, Config], Listener]] = {
    "dns": lambda context, config: DnsListener(context, config.dns),
    "smtp": lambda context, config: SmtpListener(context, config.smtp),
    "http": lambda context, config: HttpListener(context, config.http),
    "https": lambda context, config: TlsListener(context, config.https, config.http),
    "postgres": lambda context, config: PostgresListener(context, config.postgres),
    "ssh": lambda context, config: SshListener(context, config.ssh),
}


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` in a thread of its own that does not hold the process up at exit: an ACME
    order waits on a remote server for minutes, and a stopping node need not wait with it
    (its lease in the store lets another node order once it expires)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as failure:  # whatever ends the work, its waiter hears of it
            result, error = None, failure
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="acme-order", daemon=True).start()
    return await done


class BindFailed(Exception):
    """A listener could not bind its address; nothing of the node is left running."""

    def __init__(self, name: str, listen: str, port: int, error: OSError) -> None:
        host = f"[{listen}]" if ":" in listen else listen
        reason = error.strerror or str(error)
        super().__init__(f"{name} cannot listen on {host}:{port}: {reason}")
        self.name = name


@dataclass
class Node:
    """A running node: its listeners by name, and what they share."""

    config: Config
    engine: Engine
    writer: LedgerWriter
    folder: BurstFolder
    index: TokenIndex
    pager: Pager
    integrity: Integrity
    scheduler: AsyncIOScheduler
    heartbeat: Heartbeat | None = None
    api: AsgiServer | None = None
    # What TLS listeners serve, and what keeps it current; None when none of them runs.
    certificate: NodeCertificate | None = None
    keeper: CertificateKeeper | None = None
    # This node's ACME order, while it runs.
    ordering: "asyncio.Task[None] | None" = None
    stopping: bool = False
    # Direct pages on their way (kept, so a running task is not collected).
    paging: set["asyncio.Task[int]"] = field(default_factory=set)
    listeners: dict[str, Listener] = field(default_factory=dict)
    contexts: dict[str, Context] = field(default_factory=dict)

    async def keep_certificate(self) -> None:
        """Serve a changed or renewed certificate; start an order this node claimed."""
        assert self.keeper is not None
        keeper = self.keeper
        tick = await asyncio.to_thread(keeper.tick, self.ordering is not None)
        if tick.serve is not None:
            self.serve_certificate(tick.serve)
        if tick.order is not None and not self.stopping:
            why = tick.order

            async def ordering() -> None:
                try:
                    fresh = await in_daemon_thread(lambda: keeper.order(why))
                finally:
                    self.ordering = None
                if fresh is not None:
                    self.serve_certificate(fresh)

            self.ordering = asyncio.create_task(ordering())

    def serve_certificate(self, fresh: Served) -> None:
        assert self.certificate is not None
        assert self.keeper is not None
        try:
            self.certificate.replace(fresh)
        except ValueError as error:
            log.error("tls: cannot serve the new certificate, keeping the old one: %s", error)
            return
        self.keeper.serving(fresh)

    async def stop(self) -> None:
        self.stopping = True
        if self.ordering is not None:
            self.ordering.cancel()
        if self.api is not None:
            await self.api.stop()
        for listener in self.listeners.values():
            await listener.stop()
        self.folder.close()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await self.pager.stop()
        await self.writer.stop()

    def spool_changed(self, change: SpoolChange, count: int) -> None:
        """Page the heartbeat route directly: the store cannot queue a page while it is away.
        Once each way per outage, and once each time the spool fills."""
        spool = self.writer.spool
        assert spool is not None
        payload = notices.spool_change(
            change, node=self.config.node.name, count=count, path=str(spool.path), now_us=now_us()
        )
        route = self.config.heartbeat.route or DEFAULT_ROUTE
        task = asyncio.create_task(self.pager.outbox.page_directly(route, payload))
        self.paging.add(task)
        task.add_done_callback(self.paging.discard)

    async def anchor_head(self) -> None:
        await asyncio.to_thread(self.integrity.anchor, now_us())
        self.pager.send_soon()

    async def verify_ledger(self) -> None:
        await asyncio.to_thread(self.integrity.check, now_us())
        self.pager.send_soon()

    async def self_test(self) -> None:
        if self.heartbeat is None:
            return
        await self.heartbeat.check({name: lsn.addresses for name, lsn in self.listeners.items()})
        self.pager.send_soon()


async def _bind(
    node: Node, name: str, options: ListenerOptions, bind: Callable[[], Awaitable[None]]
) -> None:
    try:
        await bind()
    except OSError as error:
        await node.stop()
        raise BindFailed(name, options.listen, options.port, error) from None


# Descriptors the node needs beside its listeners' connections: store, sinks, logs, sockets.
_SPARE_DESCRIPTORS = 128 + IN_FLIGHT
# A refused connection's descriptor closes a few turns of the loop after it was accepted,
# and each turn accepts up to BACKLOG more: measured, about three backlogs in flight.
_ACCEPTED_BEFORE_REFUSAL = 3 * BACKLOG


def _descriptors(config: Config) -> None:
    """Raise the descriptor limit as far as it goes; warn if the caps need more.

    Caps that add up to more descriptors than the process may open would let
    a flood fill the table: then accept() fails for every listener at once.
    Each listening socket also holds connections accepted before its caps
    could refuse them. An unused descriptor costs nothing, so the soft limit
    goes to the hard one rather than to an estimate.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    streams = [getattr(config, name) for name in LISTENERS] + [config.api]
    needed = (
        _SPARE_DESCRIPTORS
        + _ACCEPTED_BEFORE_REFUSAL * len(config.tcp_ports())
        + sum(
            options.max_connections
            for options in streams
            if options.enabled and isinstance(options, StreamOptions)
        )
    )
    wanted = max(needed, soft) if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # above the kernel's nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    if soft < needed:
        log.warning(
            "the connection caps add up to %d descriptors but the process may open %d; "
            "lower max_connections or raise the limit (ulimit -n, LimitNOFILE=)",
            needed,
            soft,
            extra={"fields": {"event.action": "descriptor-limit"}},
        )


# How long a thread may hold the GIL while another waits for it. Store work runs in
# threads that release the GIL for every SQLite call; at the default 5 ms each
# reacquisition waits out a loop busy answering a flood, several times per page.
GIL_SWITCH_SECONDS = 0.0005


async def start(config: Config) -> Node:
    """Open the store, start the writer, listeners, alert pipeline and scheduler; started as
    root with `[node] user`, become that user once every port is bound."""
    user = service_user(config)
    _descriptors(config)
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    engine = await asyncio.to_thread(open_store, config.store.url, True)
    try:
        spool = Spool(config.spool_path, config.spool.max_bytes)
    except (SpoolBusy, OSError) as error:
        raise ConfigError(f"spool.path: {error}") from None
    for stray, waiting in strays(config.spool_path):
        log.error(
            "%s holds %d events not in the ledger: point [spool] path at it (or start the "
            "node it belongs to) to replay them",
            stray,
            waiting,
        )
    writer = LedgerWriter(engine, spool=spool)
    writer.start()
    index = TokenIndex(engine)
    # One policy for every part: routes and compiled ignore rules, built once.
    policy = config.policy()
    pager = alerting.pager(config, engine, policy, writer)
    integrity = alerting.integrity(config, engine, policy)
    folder = BurstFolder(writer, config.bursts)
    node = Node(config, engine, writer, folder, index, pager, integrity, AsyncIOScheduler())
    if not any(route.sinks for route in policy.routes.values()):
        log.warning(
            "NO ALERT DESTINATION: hits are recorded but nobody is paged; "
            "set alerts.urls or [[alerts.routes]] in %s",
            config.source,
            extra={"fields": {"event.action": "no-alert-destination"}},
        )
    await asyncio.to_thread(pager.outbox.release_own_leases)
    writer.subscribe(pager.committed)
    writer.watch_spool(node.spool_changed)
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
    await asyncio.to_thread(index.refresh)
    challenges = Challenges()
    certificate = None
    if config.https.enabled or config.smtp.enabled or config.postgres.enabled:
        serving = await asyncio.to_thread(served, config, engine)
        certificate = NodeCertificate(serving)
        node.certificate = certificate
        node.keeper = CertificateKeeper(config, engine, serving, challenges)
    ssh_key = (
        await asyncio.to_thread(secret, engine, "ssh-host-key", make=ssh_host_key)
        if config.ssh.enabled
        else None
    )
    for name, kind in LISTENERS.items():
        options: ListenerOptions = getattr(config, name)
        if not options.enabled:
            continue
        context = Context(
            index,
            folder,
            config.node.name,
            config.dns.zone,
            tls=certificate,
            challenges=challenges,
            ssh_host_key=ssh_key,
        )
        listener = kind(context, config)
        await _bind(node, name, options, listener.start)
        node.listeners[name] = listener
        node.contexts[name] = context
    if config.api.enabled:
        operations = LocalOperations(config, engine, pager.state, integrity)
        api_guard = ConnectionGuard.of(config.api)
        collector = NodeCollector(
            config.node.name,
            node.contexts,
            pager.outbox,
            engine,
            node.heartbeat,
            {"api": api_guard},
            index,
            folder,
            writer,
            node.certificate,
        )
        api = build_api(
            operations,
            collector,
            lambda: writer.recording and not node.stopping,
            lambda: node.stopping,
        )
        node.api = AsgiServer(api, config.api, api_guard)
        await _bind(node, "api", config.api, node.api.start)
    settle(user, config)
    _schedule(node)
    if config.ledger.anchored:
        # An anchor from the first minute: `verify --anchor` has a head to check from the start.
        await node.anchor_head()
    pager.start()
    node.scheduler.start()
    log.info("oobwatch node %s serving %d canaries", config.node.name, len(index))
    # What start-up made (modules, the ORM, the canaries) lives as long as the node: frozen
    # out of the collector, a full collection no longer walks it. Unfrozen, one took 60-85 ms
    # every two seconds under a 5k/s burst, and every hit in flight waited for it.
    gc.collect()
    gc.freeze()
    return node


async def _on_loop(call: Callable[[], None]) -> None:
    """Run `call` on the loop: the scheduler runs a plain function in a thread, and the
    pager's wake-ups (asyncio events) are not thread-safe."""
    call()


def _schedule(node: Node) -> None:
    config, scheduler, pager = node.config, node.scheduler, node.pager

    async def refresh() -> None:
        await asyncio.to_thread(node.index.refresh)

    def stats() -> None:
        for name, context in node.contexts.items():
            log.info(
                "%s counters",
                name,
                extra={"fields": {"oobwatch.listener": name, **context.counters.as_dict()}},
            )
        log.info(
            "ledger appended=%d batches=%d; deliveries sent=%d failed=%d",
            node.writer.appended,
            node.writer.batches,
            pager.outbox.sent,
            pager.outbox.failed,
        )

    async def checkpoint() -> None:
        # Taken out of the commits: see store.engine.open_engine.
        await asyncio.to_thread(engine_checkpoint, node.engine)

    every = {"max_instances": 1, "coalesce": True}
    housekeeping: list[tuple[Callable[..., Awaitable[None]], list[Any]]] = [
        (refresh, []),
        (_on_loop, [pager.send_soon]),
        # Hits committed by other processes or nodes (one that died before dispatching them).
        (_on_loop, [pager.dispatch_soon]),
        (pager.timed_work, []),
        (checkpoint, []),
    ]
    first = datetime.now(UTC) + timedelta(seconds=HOUSEKEEPING_SECONDS)
    for phase, (job, args) in enumerate(housekeeping):
        offset = timedelta(seconds=HOUSEKEEPING_SECONDS * phase / len(housekeeping))
        scheduler.add_job(
            job,
            "interval",
            args=args,
            seconds=HOUSEKEEPING_SECONDS,
            start_date=first + offset,
            **every,
        )
    scheduler.add_job(stats, "interval", seconds=STATS_SECONDS)
    scheduler.add_job(
        node.verify_ledger, "interval", seconds=config.ledger.verify_every / 1e6, **every
    )
    if config.ledger.anchored:
        scheduler.add_job(
            node.anchor_head, "interval", seconds=config.ledger.anchor_every / 1e6, **every
        )
    if node.heartbeat is not None:
        scheduler.add_job(
            node.self_test, "interval", seconds=config.heartbeat.interval / 1_000_000, **every
        )
    if node.keeper is not None:
        scheduler.add_job(node.keep_certificate, "interval", seconds=TICK_SECONDS, **every)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly, committing what is queued."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    node = await start(config)
    servers: list[tuple[str, list[tuple[str, int]]]] = [
        (name, listener.addresses) for name, listener in node.listeners.items()
    ]
    if node.api is not None:
        servers.append(("api", node.api.addresses))
    for name, addresses in servers:
        for host, port in addresses:
            logs.announce(
                config.log.format,
                f"{name} listening on {host}:{port}",
                {
                    "event.action": "listening",
                    "oobwatch.listener": name,
                    "server.address": host,
                    "server.port": port,
                },
            )
    await stopping.wait()
    log.info("stopping")
    await node.stop()
