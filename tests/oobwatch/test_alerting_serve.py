"""Alerting inside a running node: restart survival, the heartbeat self-test, ack and resolve from the CLI."""

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest
from click.testing import CliRunner

from oobwatch.cli import main
from oobwatch.config import load
from oobwatch.serve import start
from support import Receiver, Serving, node_config

OOBWATCH = [sys.executable, "-m", "oobwatch.cli"]


def write_config(tmp_path: Path, receiver: Receiver, extra: str = "") -> Path:
    routes = f"""retry_base = "200ms"
retry_max = "400ms"
[[alerts.routes]]
name = "ops"
urls = ["{receiver.url("json", "/ops")}"]
match = {{ sandbox = "never-*" }}
[[alerts.routes]]
name = "prod"
match = {{ sandbox = "prod-*" }}
pagerduty = {{ routing_key = "rk", url = "{receiver.http("/pd")}" }}
webhooks = [{{ url = "{receiver.http("/wh")}", secret = "0123456789abcdef" }}]
"""
    return node_config(tmp_path, receiver.url("json", "/default"), routes, extra)


@pytest.fixture
def serving(tmp_path: Path, receiver: Receiver) -> Iterator[Serving]:
    node = Serving(write_config(tmp_path, receiver, "[heartbeat]\nenabled = false\n"))
    yield node
    node.stop()


def cli(config: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_pending_deliveries_survive_a_kill_and_go_out_once_after_restart(
    serving: Serving, receiver: Receiver
) -> None:
    receiver.failing = {"/pd": 10_000, "/wh": 10_000}
    serving.start()
    canary = json.loads(cli(serving.config, "mint", "dns", "--sandbox", "prod-1", "--json"))
    dns.query.udp(
        dns.message.make_query(canary["value"], "A"),
        "127.0.0.1",
        port=serving.ports["dns"],
        timeout=5,
    )
    deadline = time.monotonic() + 10
    while (
        len([r for r in receiver.attempts if r.path == "/wh"]) < 2 and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert len([r for r in receiver.attempts if r.path == "/wh"]) >= 2  # retrying when killed
    serving.kill()
    receiver.failing = {}
    serving.start()
    [pd] = receiver.wait_for(1, path="/pd")
    [webhook] = receiver.wait_for(1, path="/wh")
    time.sleep(1.5)  # a few more outbox rounds: nothing is sent twice
    assert [r.path for r in receiver.requests].count("/pd") == 1
    assert [r.path for r in receiver.requests].count("/wh") == 1
    [alert] = json.loads(cli(serving.config, "alerts", "list", "--json"))
    assert pd.json()["dedup_key"] == alert["id"]
    assert webhook.json()["alert_id"] == alert["id"]


def test_ack_and_resolve_from_the_cli_reach_pagerduty_and_webhooks(
    serving: Serving, receiver: Receiver
) -> None:
    serving.start()
    canary = json.loads(cli(serving.config, "mint", "dns", "--sandbox", "prod-2", "--json"))
    dns.query.udp(
        dns.message.make_query(canary["value"], "A"),
        "127.0.0.1",
        port=serving.ports["dns"],
        timeout=5,
    )
    receiver.wait_for(1, path="/pd")
    [alert] = json.loads(cli(serving.config, "alerts", "list", "--open", "--json"))
    assert "acknowledged" in cli(serving.config, "alerts", "ack", alert["id"], "--by", "alice")
    assert receiver.wait_for(2, path="/pd")[1].json()["event_action"] == "acknowledge"
    again = cli(serving.config, "alerts", "ack", alert["id"], "--by", "bob")
    assert "acknowledged already, by alice" in again
    cli(serving.config, "alerts", "resolve", alert["id"])
    assert receiver.wait_for(3, path="/pd")[2].json()["event_action"] == "resolve"
    hooks = receiver.wait_for(3, path="/wh")
    assert [h.json()["purpose"] for h in hooks] == ["page", "ack", "resolve"]
    assert hooks[1].json()["by"] == "alice"
    assert "acknowledged" in hooks[1].json()["message"]["headline"]
    assert json.loads(cli(serving.config, "alerts", "list", "--open", "--json")) == []
    [listed] = json.loads(cli(serving.config, "alerts", "list", "--json"))
    assert listed["status"] == "resolved"
    assert listed["acked_by"] == "alice"
    table = cli(serving.config, "alerts", "list")
    assert alert["id"] in table
    assert "resolved already" in cli(serving.config, "alerts", "ack", alert["id"])
    assert "resolved already" in cli(serving.config, "alerts", "resolve", alert["id"])
    missing = CliRunner().invoke(main, ["--config", str(serving.config), "alerts", "ack", "al-x"])
    assert missing.exit_code == 1
    assert "no alert al-x" in missing.output


async def test_a_stopped_listener_makes_the_heartbeat_page_ops_and_recovery_pages_again(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = load(
        write_config(
            tmp_path, receiver, '[heartbeat]\nroute = "ops"\ninterval = "1h"\ndeadline = "2s"\n'
        )
    )
    node = await start(config)
    try:
        assert node.heartbeat is not None
        assert await node.heartbeat.check(
            {n: lsn.addresses for n, lsn in node.listeners.items()}
        ) == {
            "dns": True,
            "smtp": True,
            "http": True,
        }
        assert await node.pager.outbox.work() == 0  # healthy: nothing to page
        dns_listener = node.listeners["dns"]
        addresses = dns_listener.addresses
        await dns_listener.stop()
        outcome = await node.heartbeat.check(
            {"dns": addresses, "smtp": node.listeners["smtp"].addresses}
        )
        assert outcome == {"dns": False, "smtp": True}
        await node.pager.outbox.work()
        [page] = receiver.wait_for(1, path="/ops")
        assert "DNS listener on node n1 is failing its self-test since" in page.json()["message"]
        # Still failing: no second page.
        await node.heartbeat.check({"dns": addresses})
        assert await node.pager.outbox.work() == 0
        await dns_listener.start()
        assert await node.heartbeat.check({"dns": dns_listener.addresses}) == {"dns": True}
        await node.pager.outbox.work()
        recovered = receiver.wait_for(2, path="/ops")[1]
        assert "DNS listener on node n1 recovered" in recovered.json()["message"]
        await node.pager.timed_work()
        await node.pager.outbox.work()
        # Heartbeat hits never page as incidents.
        assert receiver.wait_for(1, timeout=0.2, path="/default") == []
    finally:
        await node.stop()
    timeline = json.loads(cli(tmp_path / "oobwatch.toml", "timeline", "--format", "json"))
    assert all(event["sandbox"] != "oobwatch-heartbeat" for event in timeline)
    shown = json.loads(
        cli(tmp_path / "oobwatch.toml", "timeline", "--format", "json", "--include-heartbeat")
    )
    types = [event["type"] for event in shown]
    assert "heartbeat_failed" in types
    assert "heartbeat_recovered" in types
