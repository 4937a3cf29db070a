"""A served node with `[https]` on: the SNI of a canary pages; the certificate is the store's own
self-signed one, the same at every start, or the `[tls]` files when they are set."""

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from listeners.certificates import self_signed
from oobwatch.config import ConfigError, load
from oobwatch.operations import LocalOperations
from oobwatch.serve import Node, start
from oobwatch.views import MintRequest
from store import ledger
from support import Receiver, node_config

HTTPS = "[https]\nenabled = true\nport = 0\n[heartbeat]\nenabled = false\n"


async def served_certificate(node: Node, name: str) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
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
