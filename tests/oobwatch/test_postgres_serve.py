"""A served node with `[postgres]` on: the heartbeat probes it, and a planted URL used pages."""

import asyncio
from pathlib import Path

import psycopg
import psycopg.conninfo

from oobwatch.config import load
from oobwatch.operations import LocalOperations
from oobwatch.serve import start
from oobwatch.views import MintRequest
from support import Receiver, node_config

POSTGRES = "[postgres]\nenabled = true\nport = 0\n"


async def test_the_heartbeat_probes_the_postgres_and_ssh_listeners(
    tmp_path: Path, receiver: Receiver
) -> None:
    extra = (
        POSTGRES
        + "[ssh]\nenabled = true\nport = 0\n[heartbeat]\ninterval = '1h'\ndeadline = '5s'\n"
    )
    node = await start(load(node_config(tmp_path, receiver.url(), extra=extra)))
    try:
        assert node.heartbeat is not None
        addresses = {name: listener.addresses for name, listener in node.listeners.items()}
        outcome = await node.heartbeat.check(addresses)
    finally:
        await node.stop()
    assert outcome["postgres"] is True
    assert outcome["ssh"] is True


async def test_a_planted_database_url_used_pages_with_the_login_it_tried(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = load(
        node_config(tmp_path, receiver.url(), extra=POSTGRES + "[heartbeat]\nenabled = false\n")
    )
    node = await start(config)
    try:
        canary = LocalOperations(config, node.engine).mint(
            MintRequest(kind="credential", format="postgres-url", sandbox="sbx-pg")
        )
        await asyncio.to_thread(node.index.refresh)
        port = node.listeners["postgres"].addresses[0][1]
        url = canary.value.split("=", 1)[1].strip()

        def use() -> str:
            try:
                psycopg.connect(url, hostaddr="127.0.0.1", port=port, connect_timeout=5)
            except psycopg.OperationalError as error:
                return str(error)
            return "connected"

        assert "password authentication failed" in await asyncio.to_thread(use)
        [page] = await asyncio.to_thread(receiver.wait_for, 1)
    finally:
        await node.stop()
    message = page.json()["message"]
    assert "PostgreSQL login with canary" in message
    assert "user: app_rw" in message
    assert "database: app_production" in message


def test_planted_database_credentials_name_the_listener_port(tmp_path: Path) -> None:
    extra = "[postgres]\nenabled = true\nport = 15432\n"
    config = load(node_config(tmp_path, "json://127.0.0.1:1/", extra=extra))
    ops = LocalOperations(config)
    pgpass = ops.mint(MintRequest(kind="credential", format="pgpass", sandbox="s"))
    url = ops.mint(MintRequest(kind="credential", format="postgres-url", sandbox="s"))
    assert pgpass.value.split(":")[1] == "15432"
    assert psycopg.conninfo.conninfo_to_dict(url.value.split("=", 1)[1].strip())["port"] == "15432"
