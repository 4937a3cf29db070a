"""The node's certificate: what the self-signed one names, served over a real socket, and
key/chain files that cannot be served refused with a clear error."""

import asyncio
import glob
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from listeners.certificates import from_files, self_signed, server_context
from oobwatch.config import ConfigError, load
from support import ZONE, node_config

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
    assert isinstance(from_files(tmp_path / "cert.pem", tmp_path / "key.pem"), ssl.SSLContext)
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
