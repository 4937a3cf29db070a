"""ACME against a real ACME server (Debian's pebble): a wildcard order proved by the node's own
DNS listener, served and trusted by curl; a wrong DNS-01 answer fails clearly; a certificate near
expiry is renewed; `tls status` and `tls renew` say what a node serves."""

import asyncio
import datetime
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from acme_server import Pebble, pebble_available, run_pebble
from sqlalchemy import update

from listeners.certificates import self_signed
from oobwatch import certs
from oobwatch.config import Config, load
from oobwatch.operations import LocalOperations
from oobwatch.serve import Node, start
from oobwatch.views import MintRequest
from store import acme
from store.engine import migrate, open_store
from store.schema import acme_orders
from support import Receiver, hits, node_config, settle

pytestmark = pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")

ZONE = "canary.example.test"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, for a DNS listener pebble must know first."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def acme_config(
    tmp_path: Path,
    receiver: Receiver,
    pebble: Pebble,
    dns_port: int,
    store_url: str | None = None,
    node: str = "n1",
) -> Config:
    """A node ordering from `pebble`, its DNS on `dns_port` (0: any, not the one pebble asks)."""
    extra = (
        "[https]\nenabled = true\nport = 0\n[heartbeat]\nenabled = false\n"
        f"[tls]\nacme_directory = '{pebble.directory}'\n"
        f"acme_ca_bundle = '{pebble.ca_bundle}'\nacme_email = 'security@example.test'\n"
    )
    path = node_config(tmp_path, receiver.url(), extra=extra, store_url=store_url)
    text = path.read_text().replace(
        f'zone = "{ZONE}"\nport = 0', f'zone = "{ZONE}"\nport = {dns_port}'
    )
    path.write_text(text.replace('name = "n1"', f'name = "{node}"'))
    return load(path)


async def wait_for_source(node: Node, source: str, seconds: float = 60) -> None:
    assert node.certificate is not None
    certificate = node.certificate
    await settle(lambda: certificate.served.source == source, seconds)
    assert certificate.served.source == source


async def curl(root: Path, name: str, port: int) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(root),
            "--resolve",
            f"{name}:{port}:127.0.0.1",
            f"https://{name}:{port}/login",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_a_wildcard_order_is_proved_by_our_own_dns_and_served(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    dns_port = free_port()
    with run_pebble(("127.0.0.1", dns_port), tmp_path) as pebble:
        config = acme_config(tmp_path, receiver, pebble, dns_port, store_url)
        node = await start(config)
        try:
            # The self-signed certificate first: ClientHellos are caught from the first start.
            assert node.certificate is not None
            assert node.certificate.served.source == "self-signed"
            await wait_for_source(node, "acme")
            ops = LocalOperations(config, node.engine)
            status = await asyncio.to_thread(ops.tls)
            assert status.source == "acme"
            assert set(status.sans) == {ZONE, f"*.{ZONE}"}
            assert "Pebble" in status.issuer
            assert status.renewal_due is None
            # A client that trusts the CA's root verifies the served chain, and its request
            # inside TLS is an https hit.
            canary = ops.mint(MintRequest(kind="dns", sandbox="sbx-acme"))
            await asyncio.to_thread(node.index.refresh)
            root = tmp_path / "root.pem"
            root.write_bytes(pebble.roots())
            port = node.listeners["https"].addresses[0][1]
            done = await curl(root, canary.value, port)
            assert done.returncode == 0, done.stderr
            await settle(lambda: any(h.protocol == "https" for h in hits(node.engine)))
            # Nothing is answered at _acme-challenge once no order is pending.
            assert node.contexts["dns"].challenges is not None
            assert node.contexts["dns"].challenges.values == ()
            first = acme.state(node.engine)
            # `tls renew` has the serving node order again, and waits for it.
            renewed = await asyncio.to_thread(ops.renew_tls)
            assert renewed.source == "acme"
            again = acme.state(node.engine)
            assert again.pem != first.pem
            await settle(
                lambda: node.certificate is not None and node.certificate.served.pem == again.pem
            )
        finally:
            await node.stop()
        # A restart serves the stored certificate at once and orders nothing.
        node = await start(config)
        try:
            assert node.certificate is not None
            assert node.certificate.served.source == "acme"
            await asyncio.sleep(1.5)
            assert acme.state(node.engine).issued_us == again.issued_us
        finally:
            await node.stop()
    tls_hits = [h for h in hits(node.engine) if h.protocol in ("tls", "https")]
    assert {h.protocol for h in tls_hits} == {"tls", "https"}


class WrongAnswers:
    """Challenges that always answer a TXT the ACME server did not ask for."""

    @property
    def values(self) -> tuple[str, ...]:
        return ("not-the-answer",)

    @values.setter
    def values(self, _: tuple[str, ...]) -> None:
        pass


async def test_a_wrong_dns_answer_fails_the_order_clearly_and_the_node_goes_on(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    dns_port = free_port()
    with run_pebble(("127.0.0.1", dns_port), tmp_path) as pebble:
        config = acme_config(tmp_path, receiver, pebble, dns_port)
        node = await start(config)
        try:
            node.contexts["dns"].challenges = WrongAnswers()  # type: ignore[assignment]
            with caplog.at_level(logging.ERROR, logger="oobwatch.certs"):
                await settle(lambda: acme.state(node.engine).failed_us is not None, 60)
            state = acme.state(node.engine)
            assert state.error is not None
            assert "validation failed" in state.error
            assert state.holder is None
            assert any("the ACME order for" in r.getMessage() for r in caplog.records)
            assert node.certificate is not None
            assert node.certificate.served.source == "self-signed"
            status = await asyncio.to_thread(LocalOperations(config, node.engine).tls)
            assert status.acme_error == state.error
            # No retry at once after a failure.
            await asyncio.sleep(1.5)
            assert acme.state(node.engine).failed_us == state.failed_us
        finally:
            await node.stop()


def near_expiry(zone: str, days_left: float) -> bytes:
    """A certificate for the zone, ten days long, with `days_left` to go."""
    now = datetime.datetime.now(datetime.UTC)
    ends = now + datetime.timedelta(days=days_left)
    return self_signed(zone, (ends - datetime.timedelta(days=10), ends))


async def test_a_stored_certificate_near_expiry_is_renewed(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    dns_port = free_port()
    with run_pebble(("127.0.0.1", dns_port), tmp_path) as pebble:
        config = acme_config(tmp_path, receiver, pebble, dns_port, store_url)
        engine = open_store(config.store.url)
        migrate(engine)
        acme.claim(engine, "seed", 0, 1, None)
        old = near_expiry(ZONE, days_left=1)
        with engine.begin() as connection:
            connection.execute(
                update(acme_orders).values(pem=old, issued_us=1, holder=None, held_until_us=None)
            )
        engine.dispose()
        node = await start(config)
        try:
            assert node.certificate is not None
            # Still valid, so served at start; then renewed, being within a third of its life.
            assert node.certificate.served.pem == old
            certificate = node.certificate
            await settle(lambda: certificate.served.pem != old, 60)
            leaf = certificate.served.chain[0]
            assert "Pebble" in leaf.issuer.rfc4514_string()
            assert leaf.not_valid_after_utc > datetime.datetime.now(
                datetime.UTC
            ) + datetime.timedelta(days=5)
        finally:
            await node.stop()


async def test_two_nodes_on_one_store_order_once_and_serve_the_same_certificate(
    tmp_path: Path, receiver: Receiver, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second node orders, but the CA asks only the first node's DNS: the answers reach it
    through the store, and both serve the one certificate the order got."""
    # Time for the first node to start and load the answers before the CA is told to look.
    monkeypatch.setattr(certs, "SETTLE_SECONDS", 4.0)
    dns_port = free_port()
    with run_pebble(("127.0.0.1", dns_port), tmp_path) as pebble:
        for folder in ("n1", "n2"):
            (tmp_path / folder).mkdir()
        first = acme_config(tmp_path / "n1", receiver, pebble, dns_port, store_url)
        second = acme_config(tmp_path / "n2", receiver, pebble, 0, store_url, node="n2")
        nodes = [await start(second)]
        try:
            engine = nodes[0].engine
            await settle(lambda: acme.state(engine).holder == "n2")
            assert acme.state(engine).holder == "n2"
            nodes.append(await start(first))
            for node in nodes:
                await wait_for_source(node, "acme", 90)
            served = {node.certificate.served.pem for node in nodes if node.certificate}
            assert len(served) == 1
            state = acme.state(engine)
            assert state.holder is None
            assert state.error is None
            assert state.pem in served
        finally:
            for node in nodes:
                await node.stop()
