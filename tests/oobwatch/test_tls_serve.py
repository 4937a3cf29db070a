"""A served node with `[https]` on: the SNI of a canary pages; the certificate is the store's own
self-signed one, the same at every start, or the `[tls]` files when they are set."""

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from listeners.certificates import self_signed
from oobwatch.cli import main
from oobwatch.config import ConfigError, load
from oobwatch.operations import LocalOperations
from oobwatch.serve import Node, start
from oobwatch.views import MintRequest
from store import ledger
from support import Receiver, node_config, trusting_anything

HTTPS = "[https]\nenabled = true\nport = 0\n[heartbeat]\nenabled = false\n"


async def served_certificate(node: Node, name: str) -> x509.Certificate:
    context = trusting_anything()
    port = node.listeners["https"].addresses[0][1]
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


async def test_an_sni_hit_pages_and_the_self_signed_certificate_is_kept(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = load(node_config(tmp_path, receiver.url(), extra=HTTPS))
    node = await start(config)
    try:
        canary = LocalOperations(config, node.engine).mint(MintRequest(kind="dns", sandbox="sbx-t"))
        await asyncio.to_thread(node.index.refresh)
        first = await served_certificate(node, canary.value)
        [page] = await asyncio.to_thread(receiver.wait_for, 1)
        assert "TLS connection to canary" in page.json()["message"]
    finally:
        await node.stop()
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "canary.example.test",
        "*.canary.example.test",
    ]
    with node.engine.connect() as connection:
        [hit] = [e for e in ledger.entries(connection) if e.type == "hit"]
    assert hit.protocol == "tls"
    assert hit.evidence["sni"] == canary.value
    again = await start(config)
    try:
        assert await served_certificate(again, "x.canary.example.test") == first
    finally:
        await again.stop()


async def test_the_tls_files_are_served_when_set(tmp_path: Path, receiver: Receiver) -> None:
    pem = self_signed("canary.example.test")
    split = pem.index(b"-----BEGIN CERTIFICATE-----")
    (tmp_path / "key.pem").write_bytes(pem[:split])
    (tmp_path / "cert.pem").write_bytes(pem[split:])
    extra = HTTPS + "[tls]\ncert = 'cert.pem'\nkey = 'key.pem'\n"
    node = await start(load(node_config(tmp_path, receiver.url(), extra=extra)))
    try:
        served = await served_certificate(node, "x.canary.example.test")
    finally:
        await node.stop()
    assert served == x509.load_pem_x509_certificate(pem[split:])


def test_a_certificate_without_its_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"x")
    path = node_config(tmp_path, "json://127.0.0.1:1/", extra="[tls]\ncert = 'cert.pem'\n")
    with pytest.raises(ConfigError, match=r"tls: .*cert and key go together"):
        load(path)


async def test_the_heartbeat_probes_the_tls_listener(tmp_path: Path, receiver: Receiver) -> None:
    extra = "[https]\nenabled = true\nport = 0\n[heartbeat]\ninterval = '1h'\ndeadline = '5s'\n"
    node = await start(load(node_config(tmp_path, receiver.url(), extra=extra)))
    try:
        assert node.heartbeat is not None
        addresses = {name: listener.addresses for name, listener in node.listeners.items()}
        outcome = await node.heartbeat.check(addresses)
    finally:
        await node.stop()
    assert outcome == {"dns": True, "smtp": True, "http": True, "https": True}


def write_pair(folder: Path, pem: bytes) -> None:
    split = pem.index(b"-----BEGIN CERTIFICATE-----")
    # Written aside and renamed, as a certificate manager replaces them.
    for name, part in (("key.pem", pem[:split]), ("cert.pem", pem[split:])):
        (folder / f".{name}").write_bytes(part)
        (folder / f".{name}").replace(folder / name)


async def test_changed_files_are_served_without_a_restart_and_broken_ones_are_not(
    tmp_path: Path, receiver: Receiver
) -> None:
    first, second = self_signed("canary.example.test"), self_signed("canary.example.test")
    write_pair(tmp_path, first)
    extra = HTTPS + "[tls]\ncert = 'cert.pem'\nkey = 'key.pem'\n"
    node = await start(load(node_config(tmp_path, receiver.url(), extra=extra)))
    try:
        name = "x.canary.example.test"
        leaf = x509.load_pem_x509_certificate
        assert await served_certificate(node, name) == leaf(first[first.index(b"-----BEGIN C") :])
        write_pair(tmp_path, second)
        wanted = leaf(second[second.index(b"-----BEGIN C") :])
        for _ in range(50):
            if await served_certificate(node, name) == wanted:
                break
            await asyncio.sleep(0.1)
        assert await served_certificate(node, name) == wanted
        # A key that is not the certificate's: logged, and the last good pair kept.
        (tmp_path / "key.pem").write_bytes(first[: first.index(b"-----BEGIN C")])
        await asyncio.sleep(2.5)
        assert await served_certificate(node, name) == wanted
        assert node.certificate is not None
        assert node.certificate.served.pem.endswith(second[second.index(b"-----BEGIN C") :])
    finally:
        await node.stop()


def test_tls_status_says_the_source_and_renew_says_what_it_cannot_do(tmp_path: Path) -> None:
    path = node_config(tmp_path, "json://127.0.0.1:1/", extra=HTTPS)
    shown = CliRunner().invoke(main, ["--config", str(path), "tls", "status", "--json"])
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.output)
    assert status["source"] == "self-signed"
    assert status["sans"] == ["canary.example.test", "*.canary.example.test"]
    assert {"subject", "issuer", "not_after"} <= set(status)
    text = CliRunner().invoke(main, ["--config", str(path), "tls", "status"])
    assert "clients that check certificates refuse it" in text.output
    renew = CliRunner().invoke(main, ["--config", str(path), "tls", "renew"])
    assert renew.exit_code != 0
    assert "only an ACME one is renewed" in renew.output


async def test_the_timeline_shows_the_client_hello_and_the_request_inside_tls(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = node_config(tmp_path, receiver.url(), extra=HTTPS)
    config = load(path)
    node = await start(config)
    try:
        canary = LocalOperations(config, node.engine).mint(MintRequest(kind="dns", sandbox="sbx-t"))
        await asyncio.to_thread(node.index.refresh)
        port = node.listeners["https"].addresses[0][1]
        context = trusting_anything()
        context.set_alpn_protocols(["http/1.1"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=canary.value
        )
        writer.write(f"GET /v1/models HTTP/1.1\r\nHost: {canary.value}\r\n\r\n".encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        await asyncio.to_thread(receiver.wait_for, 1)
    finally:
        await node.stop()
    shown = CliRunner().invoke(
        main, ["--config", str(path), "timeline", "--sandbox", "sbx-t", "--format", "json"]
    )
    assert shown.exit_code == 0, shown.output
    events = json.loads(shown.output)
    [hello] = [e for e in events if e["type"] == "hit" and e["protocol"] == "tls"]
    assert hello["sni"] == canary.value
    assert hello["alpn"] == ["http/1.1"]
    assert hello["ja4"].startswith("t13d")
    assert hello["handshake"] == "started"
    [ended] = [e for e in events if e["type"] == "evidence" and e["protocol"] == "tls"]
    assert ended["handshake"] == "completed"
    [request] = [e for e in events if e["type"] == "hit" and e["protocol"] == "https"]
    assert request["target"] == "/v1/models"
    text = CliRunner().invoke(
        main, ["--config", str(path), "timeline", "--sandbox", "sbx-t", "--protocol", "https"]
    )
    assert text.exit_code == 0, text.output
    assert "GET /v1/models (in host)" in text.output
    assert "SNI" not in text.output
