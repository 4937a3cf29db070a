"""Pages a running node cannot deliver: escalated to another route, else dead-lettered,
listed, measured and noticed."""

import asyncio
import json
import random
import time
from pathlib import Path

import dns.asyncquery
import dns.message
import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from alerts.outbox import Outbox, Retry
from oobwatch.cli import main
from oobwatch.config import DEFAULT_CONFIG, AlertsConfig, ConfigError, load
from oobwatch.serve import Node, start
from store import tokens
from support import Receiver, node_config, plant_canary

RETRY = 'max_attempts = 2\nretry_base = "1ms"\nretry_max = "1ms"'
NO_HEARTBEAT = "[heartbeat]\nenabled = false\n"


def cli(config: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


async def hit(node: Node, sandbox: str) -> None:
    """A DNS lookup of a new canary of `sandbox`, answered by the node's listener."""
    canary = plant_canary(node.engine, "dns", sandbox=sandbox)
    await asyncio.to_thread(node.index.refresh)
    port = node.listeners["dns"].addresses[0][1]
    await dns.asyncquery.udp(
        dns.message.make_query(canary.value, "A"), "127.0.0.1", port=port, timeout=5
    )


async def work_until_settled(outbox: Outbox, dead: int) -> None:
    """Work the outbox until `dead` deliveries are dead-lettered and none is pending."""
    deadline = time.monotonic() + 20
    while (outbox.dead() < dead or outbox.depth()) and time.monotonic() < deadline:
        await outbox.work()
        await asyncio.sleep(0.01)
    assert (outbox.dead(), outbox.depth()) == (dead, 0)


async def test_a_page_its_route_cannot_deliver_goes_to_the_route_it_escalates_to(
    tmp_path: Path, receiver: Receiver
) -> None:
    routes = f"""{RETRY}
[[alerts.routes]]
name = "oncall"
match = {{ sandbox = "prod-*" }}
urls = ["{receiver.url("json", "/oncall")}"]
escalate_to = "leads"
[[alerts.routes]]
name = "leads"
match = {{ sandbox = "never-*" }}
webhooks = [{{ url = "{receiver.http("/leads")}", secret = "0123456789abcdef" }}]
"""
    config = node_config(tmp_path, receiver.url("json", "/default"), routes, NO_HEARTBEAT)
    receiver.failing["/oncall"] = 1_000_000
    node = await start(load(config))
    try:
        await hit(node, "prod-1")
        await work_until_settled(node.pager.outbox, dead=0)
    finally:
        await node.stop()
    [escalated] = receiver.wait_for(1, path="/leads")
    page = escalated.json()
    assert page["purpose"] == "escalation"
    assert page["escalated_from"] == {"delivery": 1, "route": "oncall", "sink": "apprise:0"}
    assert page["message"]["headline"].startswith("DNS lookup of canary")
    assert len([r for r in receiver.attempts if r.path == "/oncall"]) == 2
    assert receiver.requests == [escalated]  # not to the default route as well
    [alert] = json.loads(cli(config, "alerts", "list", "--json"))
    assert alert["undelivered"] == 0


async def test_a_page_the_default_route_cannot_deliver_is_dead_lettered_and_shown(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default route is also the heartbeat route: one of its two sinks is down for good.
    down, up = receiver.url("json", "/down"), receiver.url("json", "/up")
    monkeypatch.setenv("OOBWATCH_ALERTS__URLS", json.dumps([down, up]))
    config = node_config(tmp_path, down, RETRY, NO_HEARTBEAT)
    receiver.failing["/down"] = 1_000_000
    node = await start(load(config))
    try:
        await hit(node, "sbx-dead")
        # The page and the notice about it each die at /down; nothing is noticed twice.
        await work_until_settled(node.pager.outbox, dead=2)
        page, notice = receiver.wait_for(2, path="/up")
        assert "DNS lookup of canary" in page.json()["message"]
        assert notice.json()["title"] == "oobwatch: page NOT DELIVERED via default/apprise:0"
        _, reader = tokens.create(node.engine, "reader", "read")
        assert node.api is not None
        host, api_port = node.api.addresses[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{api_port}") as client:
            headers = {"Authorization": f"Bearer {reader}"}
            text = (await client.get("/metrics", headers=headers)).text
    finally:
        await node.stop()
    [dead] = next(
        f.samples for f in text_string_to_metric_families(text) if f.name == "oobwatch_outbox_dead"
    )
    assert dead.value == 2
    [alert] = json.loads(cli(config, "alerts", "list", "--json"))
    assert alert["undelivered"] == 1
    assert alert["id"] in notice.json()["message"]
    table = cli(config, "alerts", "list")
    assert "undelivered" in table
    [row] = [line for line in table.splitlines() if alert["id"] in line]
    assert row.strip("│ ").rsplit("│", 1)[-1].strip() == "1"


def test_a_route_escalating_to_itself_is_refused(tmp_path: Path, receiver: Receiver) -> None:
    route = (
        f'[[alerts.routes]]\nname = "oncall"\nurls = ["{receiver.url()}"]\nescalate_to = "oncall"'
    )
    with pytest.raises(ConfigError) as refused:
        load(node_config(tmp_path, receiver.url(), route))
    assert str(refused.value).startswith(
        "alerts: route 'oncall': escalate_to names the route itself"
    )


def test_the_documented_retry_budget_is_what_the_defaults_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = AlertsConfig()
    retry = Retry(defaults.retry_base, defaults.retry_max, defaults.max_attempts)
    monkeypatch.setattr(random, "randint", lambda low, high: high)  # the longest waits
    longest = sum(retry.delay_us(attempt) for attempt in range(1, retry.max_attempts))
    assert f"at most {longest // 1_000_000} s ~ {round(longest / 60e6)} min" in DEFAULT_CONFIG
