"""The node's certificate: what the self-signed one names, served over a real socket, and
key/chain files that cannot be served refused with a clear error."""

import asyncio
import datetime
import glob
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from listeners.certificates import (
    NodeCertificate,
    Served,
    from_files,
    self_signed,
    server_context,
)
from oobwatch.config import ConfigError, load
from support import ZONE, node_config, trusting_anything

BEGIN = b"-----BEGIN CERTIFICATE-----"


def split(pem: bytes) -> tuple[bytes, bytes]:
    at = pem.index(BEGIN)
    return pem[:at], pem[at:]


def test_the_self_signed_certificate_names_the_zone_and_everything_under_it() -> None:
    _, chain = split(self_signed(ZONE))
    certificate = x509.load_pem_x509_certificate(chain)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [ZONE, f"*.{ZONE}"]
    assert certificate.issuer == certificate.subject
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime.days >= 3650


async def test_a_client_that_trusts_it_completes_a_handshake_for_a_name_in_the_zone() -> None:
    pem = self_signed(ZONE)
    server = await asyncio.start_server(
        lambda _reader, writer: writer.close(), "127.0.0.1", 0, ssl=server_context(pem)
    )
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cadata=split(pem)[1].decode())
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=trusting, server_hostname=f"x.{ZONE}"
        )
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        writer.close()
        # A name outside the zone is not one the certificate vouches for.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=trusting, server_hostname="example.org"
            )
    finally:
        server.close()
        await server.wait_closed()


def test_no_key_is_left_on_disk_after_loading() -> None:
    pattern = str(Path(tempfile.gettempdir()) / "oobwatch-tls-*")
    before = set(glob.glob(pattern))
    server_context(self_signed(ZONE))
    assert set(glob.glob(pattern)) == before


def test_files_that_do_not_go_together_are_refused_clearly(tmp_path: Path) -> None:
    key, chain = split(self_signed(ZONE))
    other_key, _ = split(self_signed(ZONE))
    (tmp_path / "cert.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "other.key").write_bytes(other_key)
    (tmp_path / "junk.pem").write_bytes(b"not a certificate\n")
    served = from_files(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert served.source == "file"
    assert served.describe()["sans"] == [ZONE, f"*.{ZONE}"]
    for cert, key_file in (
        ("cert.pem", "other.key"),
        ("junk.pem", "key.pem"),
        ("cert.pem", "junk.pem"),
    ):
        with pytest.raises(ValueError, match="cannot serve this certificate with this key"):
            from_files(tmp_path / cert, tmp_path / key_file)
    path = node_config(
        tmp_path, "json://127.0.0.1:1/", extra="[tls]\ncert = 'cert.pem'\nkey = 'other.key'\n"
    )
    with pytest.raises(ConfigError, match=r"^tls: cannot serve this certificate with this key"):
        load(path)


KEY, _ = split(self_signed(ZONE))


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_as_a_chain_fail_cleanly(junk: bytes) -> None:
    """Never a certificate for this key: refused with the one clear error, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        cert, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(junk)
        key_file.write_bytes(KEY)
        with pytest.raises(ValueError, match="cannot serve this certificate with this key"):
            from_files(cert, key_file)


async def served_by(context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a real handshake with a server using `context` is given."""
    server = await asyncio.start_server(
        lambda _reader, writer: writer.close(), "127.0.0.1", 0, ssl=context
    )
    port = server.sockets[0].getsockname()[1]
    client = trusting_anything()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return x509.load_der_x509_certificate(der)


async def test_a_replaced_certificate_is_served_by_contexts_made_before() -> None:
    first, second = self_signed(ZONE), self_signed(ZONE)
    node = NodeCertificate(Served(first, "self-signed"))
    contexts = node.contexts()
    assert await served_by(contexts.current) == Served(first, "self-signed").chain[0]
    node.replace(Served(second, "file"))
    assert await served_by(contexts.current) == Served(second, "file").chain[0]
    assert node.served.source == "file"


async def test_a_replacement_that_cannot_be_served_is_refused_and_the_old_one_kept() -> None:
    first = self_signed(ZONE)
    node = NodeCertificate(Served(first, "self-signed"))
    contexts = node.contexts()
    key, _ = split(self_signed(ZONE))
    _, chain = split(first)
    with pytest.raises(ValueError, match="cannot serve this certificate with this key"):
        node.replace(Served(key + chain, "file"))
    assert node.served.pem == first
    assert await served_by(contexts.current) == Served(first, "self-signed").chain[0]


def test_describe_says_what_tls_status_shows() -> None:
    described = Served(self_signed(ZONE), "self-signed").describe()
    assert described["subject"] == f"CN={ZONE}"
    assert described["issuer"] == f"CN={ZONE}"
    assert described["sans"] == [ZONE, f"*.{ZONE}"]
    assert described["source"] == "self-signed"
    assert described["not_after"] > described["not_before"]


def rsa_self_signed() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ZONE)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + certificate.public_bytes(serialization.Encoding.PEM)


async def handshake(context: ssl.SSLContext, client: ssl.SSLContext) -> None:
    server = await asyncio.start_server(
        lambda _reader, writer: writer.close(), "127.0.0.1", 0, ssl=context
    )
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_certificate_of_another_key_type_replaces_the_old_one_entirely() -> None:
    """Loading an EC chain into a live context would keep its RSA one, still served to clients
    that ask for RSA: a replacement is a new context, so nothing of the old one is left."""
    rsa_only = trusting_anything()
    rsa_only.maximum_version = ssl.TLSVersion.TLSv1_2
    rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    node = NodeCertificate(Served(rsa_self_signed(), "file"))
    contexts = node.contexts()
    await handshake(contexts.current, rsa_only)
    node.replace(Served(self_signed(ZONE), "file"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(contexts.current, rsa_only)
