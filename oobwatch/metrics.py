"""Prometheus metrics of a running node, read at scrape time from what the node already counts."""

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from store import ledger

if TYPE_CHECKING:
    from oobwatch.serve import Node

_COUNTERS = {
    "received": "Queries, messages or requests received",
    "hits": "Canary hits recorded",
    "junk": "Traffic naming no canary, counted and not stored",
    "refused": "Queries or recipients refused",
    "malformed": "Malformed packets or requests",
    "record_failures": "Hits that could not be committed",
    "dropped": "Replies or connections dropped under load",
}


class NodeCollector(Collector):
    """Listener counters, alert delivery, outbox depth, ledger length, last heartbeat per listener."""

    def __init__(self, node: "Node") -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(
                f"oobwatch_listener_{name}", help_text, labels=["listener"]
            )
            for listener, context in node.contexts.items():
                family.add_metric([listener], getattr(context.counters, name))
            yield family
        yield CounterMetricFamily(
            "oobwatch_alerts_sent", "Deliveries accepted by a sink", node.outbox.sent
        )
        yield CounterMetricFamily(
            "oobwatch_alerts_failed",
            "Deliveries given up after their last attempt",
            node.outbox.failed,
        )
        yield GaugeMetricFamily(
            "oobwatch_outbox_pending", "Deliveries not yet sent", node.outbox.depth()
        )
        with node.engine.connect() as connection:
            seq, _ = ledger.head(connection)
        yield GaugeMetricFamily("oobwatch_ledger_entries", "Entries in the ledger", seq)
        heartbeat = GaugeMetricFamily(
            "oobwatch_heartbeat_last_ok_seconds",
            "Unix time of each listener's last self-test hit that landed",
            labels=["listener"],
        )
        if node.heartbeat is not None:
            for listener, health in node.heartbeat.health.items():
                if health.last_ok_us is not None:
                    heartbeat.add_metric([listener], health.last_ok_us / 1_000_000)
        yield heartbeat
