"""Prometheus metrics of a running node, read at scrape time from what the node already counts."""

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from alerts.outbox import Outbox
from canaries.index import TokenIndex
from listeners.base import Context
from listeners.burst import BurstFolder
from listeners.certificates import NodeCertificate
from listeners.guard import ConnectionGuard
from oobwatch.heartbeat import Heartbeat
from store import ledger
from store.writer import LedgerWriter

_COUNTERS = {
    "received": "Queries, recipients or requests received",
    "hits": "Canary hits committed to the ledger",
    "junk": "Traffic naming no canary, counted and not stored",
    "refused": "Queries or recipients refused",
    "malformed": "Malformed packets, commands or requests",
    "record_failures": "Hits that could not be committed",
    "dropped": "Replies or connections dropped under load or for abuse",
}


class NodeCollector(Collector):
    """Listener counters, alert delivery, outbox depth, ledger length, last heartbeat per listener;
    every sample labelled with the node, so the nodes on one store can be told apart."""

    def __init__(
        self,
        node: str,
        contexts: Mapping[str, Context],
        outbox: Outbox,
        engine: Engine,
        heartbeat: Heartbeat | None,
        guards: Mapping[str, ConnectionGuard] | None = None,
        index: TokenIndex | None = None,
        folder: BurstFolder | None = None,
        writer: LedgerWriter | None = None,
        certificate: NodeCertificate | None = None,
    ) -> None:
        self._node = node
        self._contexts = contexts
        self._certificate = certificate
        self._outbox = outbox
        self._engine = engine
        self._heartbeat = heartbeat
        # Connection bounds of servers that are not listeners (the admin API).
        self._guards = guards or {}
        self._index = index
        self._folder = folder
        self._writer = writer

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            family.samples = [
                sample._replace(labels={**sample.labels, "node": self._node})
                for sample in family.samples
            ]
            yield family

    def _families(self) -> Iterator[Metric]:
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(
                f"oobwatch_listener_{name}", help_text, labels=["listener"]
            )
            for listener, context in self._contexts.items():
                family.add_metric([listener], getattr(context.counters, name))
            yield family
        yield from self._connections()
        if self._index is not None:
            index = self._index
            yield CounterMetricFamily(
                "oobwatch_token_store_lookups",
                "Queries to the store for plausible tokens not in memory",
                index.store_lookups,
            )
            yield CounterMetricFamily(
                "oobwatch_token_negative_hits",
                "Plausible unknown tokens answered from the negative cache",
                index.negative_hits,
            )
            yield CounterMetricFamily(
                "oobwatch_token_lookup_overflow",
                "Token lookups answered with a temporary failure: the lookup queue was full",
                index.overflow,
            )
        yield CounterMetricFamily(
            "oobwatch_alerts_sent", "Deliveries accepted by a sink", self._outbox.sent
        )
        yield CounterMetricFamily(
            "oobwatch_alerts_failed",
            "Deliveries given up after their last attempt",
            self._outbox.failed,
        )
        yield GaugeMetricFamily(
            "oobwatch_outbox_pending", "Deliveries not yet sent", self._outbox.depth()
        )
        yield GaugeMetricFamily(
            "oobwatch_outbox_dead",
            "Deliveries given up with no other route to take them (dead-lettered)",
            self._outbox.dead(),
        )
        with self._engine.connect() as connection:
            seq, _ = ledger.head(connection)
        yield GaugeMetricFamily("oobwatch_ledger_entries", "Entries in the ledger", seq)
        yield from self._growth()
        if self._certificate is not None:
            served = self._certificate.served
            expiry = GaugeMetricFamily(
                "oobwatch_tls_certificate_expiry_seconds",
                "Unix time the certificate TLS listeners serve expires, by where it came from",
                labels=["source"],
            )
            expiry.add_metric([served.source], served.not_after.timestamp())
            yield expiry
        heartbeat = GaugeMetricFamily(
            "oobwatch_heartbeat_last_ok_seconds",
            "Unix time of each listener's last self-test hit that landed",
            labels=["listener"],
        )
        if self._heartbeat is not None:
            for listener, health in self._heartbeat.health.items():
                if health.last_ok_us is not None:
                    heartbeat.add_metric([listener], health.last_ok_us / 1_000_000)
        yield heartbeat

    def _growth(self) -> Iterator[Metric]:
        """How fast this node grows the ledger, and how much of that bursts folded."""
        if self._writer is not None:
            yield CounterMetricFamily(
                "oobwatch_ledger_rows_appended",
                "Ledger rows this node committed",
                self._writer.appended,
            )
            yield GaugeMetricFamily(
                "oobwatch_ledger_rows_per_second",
                "Ledger rows this node committed in the last whole second",
                self._writer.rows_per_second,
            )
            yield from self._spool(self._writer)
        if self._folder is not None:
            folder = self._folder
            yield CounterMetricFamily(
                "oobwatch_burst_aggregates",
                "Aggregate rows written for canaries in a burst",
                folder.aggregates,
            )
            yield CounterMetricFamily(
                "oobwatch_burst_folded_hits",
                "Hits counted in aggregate rows instead of a row each",
                folder.folded,
            )
            yield CounterMetricFamily(
                "oobwatch_burst_unanswered",
                "Folded hits counted but not answered: their aggregate held as many answers "
                "as it may",
                folder.unanswered,
            )
            yield GaugeMetricFamily(
                "oobwatch_burst_canaries", "Canaries whose hits fold now", folder.active
            )

    def _spool(self, writer: LedgerWriter) -> Iterator[Metric]:
        """What waits in the local spool while the store is away."""
        spool = writer.spool
        if spool is None:
            return
        yield GaugeMetricFamily(
            "oobwatch_spool_events", "Events in the spool, not yet in the ledger", spool.pending
        )
        yield GaugeMetricFamily("oobwatch_spool_bytes", "Size of the spool file", spool.size)
        yield CounterMetricFamily(
            "oobwatch_spooled_events",
            "Events spooled because the store did not take them",
            writer.spooled,
        )
        yield CounterMetricFamily(
            "oobwatch_replayed_events", "Spooled events replayed into the ledger", writer.replayed
        )
        yield GaugeMetricFamily(
            "oobwatch_spool_full",
            "1 while the spool is full and hits go unrecorded",
            int(writer.spool_full),
        )

    def _connections(self) -> Iterator[Metric]:
        # "<listener>-messages": the messages being received (SMTP DATA), bounded the same way.
        guards = {
            f"{name}{suffix}": guard
            for name, context in self._contexts.items()
            for suffix, guard in (("", context.connections), ("-messages", context.messages))
            if guard is not None
        } | dict(self._guards)
        opened = GaugeMetricFamily(
            "oobwatch_connections_open",
            "Connections open now (smtp-messages: messages being received)",
            labels=["listener"],
        )
        refused = CounterMetricFamily(
            "oobwatch_connections_refused",
            "Connections refused because the ones they would replace were all active within "
            "the eviction grace (source, network: of their own source or network at its cap; "
            "total: of the listener)",
            labels=["listener", "reason"],
        )
        evicted = CounterMetricFamily(
            "oobwatch_connections_evicted",
            "Idle connections closed for a newcomer (source, network: of its own source or "
            "network at its cap; fair: of the busiest network; oldest: the idlest of all)",
            labels=["listener", "reason"],
        )
        timeouts = CounterMetricFamily(
            "oobwatch_connections_timed_out",
            "Connections closed because a step took longer than the listener's timeout",
            labels=["listener", "phase"],
        )
        for name, guard in guards.items():
            opened.add_metric([name], guard.open)
            for reason in ("source", "network", "total"):
                refused.add_metric([name, reason], guard.refused[reason])
            for reason in ("source", "network", "fair", "oldest"):
                evicted.add_metric([name, reason], guard.evicted[reason])
            for phase, count in sorted(guard.timeouts.items()):
                timeouts.add_metric([name, phase], count)
        yield from (opened, refused, evicted, timeouts)
