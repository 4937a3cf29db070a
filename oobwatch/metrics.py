"""Prometheus metrics of a running node, read at scrape time from what the node already counts."""

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from alerts.outbox import Outbox
from listeners.base import Context
from oobwatch.heartbeat import Heartbeat
from store import ledger

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
    """Listener counters, alert delivery, outbox depth, ledger length, last heartbeat per listener."""

    def __init__(
        self,
        contexts: Mapping[str, Context],
        outbox: Outbox,
        engine: Engine,
        heartbeat: Heartbeat | None,
    ) -> None:
        self._contexts = contexts
        self._outbox = outbox
        self._engine = engine
        self._heartbeat = heartbeat

    def collect(self) -> Iterator[Metric]:
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(
                f"oobwatch_listener_{name}", help_text, labels=["listener"]
            )
            for listener, context in self._contexts.items():
                family.add_metric([listener], getattr(context.counters, name))
            yield family
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
        with self._engine.connect() as connection:
            seq, _ = ledger.head(connection)
        yield GaugeMetricFamily("oobwatch_ledger_entries", "Entries in the ledger", seq)
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
