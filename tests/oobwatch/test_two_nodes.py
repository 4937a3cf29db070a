"""Two `oobwatch serve` processes on one real PostgreSQL, as two name servers of one zone run.

Both answer and record; the ledger is one chain; each alert pages once; each
node has its own heartbeat; /metrics says which node it is; and when one
dies with its deliveries failing, the other delivers them, once.
"""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import PostgresServer, Receiver, Serving, node_config

NODES = ("ns1", "ns2")


def cli(config: Path, *args: str) -> str:
    command = [sys.executable, "-m", "oobwatch.cli", "--config", str(config), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def hit(node: Serving, name: str) -> None:
    reply = dns.query.udp(
        dns.message.make_query(name, "A"), "127.0.0.1", port=node.ports["dns"], timeout=5
    )
    assert reply.rcode() == dns.rcode.NOERROR


def pages(receiver: Receiver, sandbox: str | None = None) -> list[dict[str, object]]:
    """The alert pages the webhook received (of `sandbox`)."""
    found = [r.json() for r in receiver.requests if r.path == "/wh"]
    return [
        page for page in found if page["purpose"] == "page" and sandbox in (None, page["sandbox"])
    ]


def settle(predicate: object, seconds: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def nodes(
    tmp_path: Path, receiver: Receiver, postgres: PostgresServer
) -> Iterator[dict[str, Serving]]:
    url = postgres.new_database()
    # Alerts to a signed webhook (its body is the delivery); notices to the default route.
    routes = f"""retry_base = "200ms"
retry_max = "400ms"
[[alerts.routes]]
name = "all"
webhooks = [{{ url = "{receiver.http("/wh")}", secret = "0123456789abcdef" }}]
"""
    heartbeat = '[heartbeat]\ninterval = "1s"\ndeadline = "5s"\n[bursts]\nthreshold = 1000\n'
    running = {}
    for name in NODES:
        folder = tmp_path / name
        folder.mkdir()
        config = node_config(
            folder, receiver.url("json", "/page"), routes, heartbeat, store_url=url, node=name
        )
        running[name] = Serving(config).start()
    yield running
    for node in running.values():
        node.stop()


def test_two_nodes_share_one_chain_and_page_each_alert_once(
    nodes: dict[str, Serving], receiver: Receiver
) -> None:
    ns1, ns2 = nodes["ns1"], nodes["ns2"]
    both = json.loads(cli(ns1.config, "mint", "dns", "--sandbox", "agent-1", "--json"))
    one = json.loads(cli(ns2.config, "mint", "dns", "--sandbox", "agent-2", "--json"))
    time.sleep(1.5)  # each node's index picks up the canary the other minted
    for round_ in range(3):
        hit(ns1, f"r{round_}.{both['value']}")
        hit(ns2, f"r{round_}.{both['value']}")
    hit(ns2, one["value"])
    settle(lambda: len(pages(receiver)) >= 2)
    time.sleep(2)  # several dispatch and outbox rounds of both nodes: nothing pages twice
    events = json.loads(cli(ns1.config, "timeline", "--sandbox", "agent-1", "--format", "json"))
    hits = [event for event in events if event["type"] == "hit"]
    assert sorted(event["node"] for event in hits) == ["ns1"] * 3 + ["ns2"] * 3
    alerts = json.loads(cli(ns2.config, "alerts", "list", "--json"))
    assert sorted(str(p["sandbox"]) for p in pages(receiver)) == ["agent-1", "agent-2"]
    assert len(alerts) == 2
    assert "intact" in cli(ns1.config, "ledger", "verify")
    # Each node's heartbeat is its own canary, tripped through its own listeners.
    heartbeats = json.loads(cli(ns1.config, "timeline", "--include-heartbeat", "--format", "json"))
    by_node: dict[str, set[str]] = {}
    for event in heartbeats:
        if event["type"] == "hit" and event["sandbox"] == "oobwatch-heartbeat":
            by_node.setdefault(event["node"], set()).add(str(event["canary_id"]))
    assert set(by_node) == set(NODES)
    assert by_node["ns1"].isdisjoint(by_node["ns2"])
    # /metrics names the node on every sample.
    token = json.loads(
        cli(ns1.config, "token", "create", "--scope", "read", "--name", "m", "--json")
    )
    for name, node in nodes.items():
        text = httpx.get(
            f"http://127.0.0.1:{node.ports['api']}/metrics",
            headers={"Authorization": f"Bearer {token['token']}"},
            timeout=10,
        ).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        assert samples
        assert {s.labels.get("node") for s in samples} == {name}


def test_a_node_killed_while_its_deliveries_fail_leaves_them_to_the_other(
    nodes: dict[str, Serving], receiver: Receiver
) -> None:
    ns1 = nodes["ns1"]
    canary = json.loads(cli(ns1.config, "mint", "dns", "--sandbox", "agent-3", "--json"))
    receiver.failing = {"/wh": 1_000_000}
    hit(ns1, canary["value"])

    def tried(times: int) -> bool:
        return len([a for a in receiver.attempts if a.path == "/wh"]) >= times

    settle(lambda: tried(3))
    assert tried(3)  # failing and being retried
    ns1.kill()
    receiver.failing = {}
    settle(lambda: bool(pages(receiver, "agent-3")), 60)
    time.sleep(2)
    [delivered] = pages(receiver, "agent-3")
    [alert] = json.loads(cli(nodes["ns2"].config, "alerts", "list", "--json"))
    assert delivered["alert_id"] == alert["id"]
