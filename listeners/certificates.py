"""The node's TLS certificate, as listeners that speak TLS serve it.

Without a certificate of its own, a node serves a self-signed one for the
zone and everything under it, made once and kept in the store so every node
on it serves the same: a ClientHello is caught from the first start, and a
client that refuses the certificate has still named the host it wanted.
"""

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SELF_SIGNED_DAYS = 3650


def self_signed(zone: str) -> bytes:
    """A new key and a self-signed certificate for `zone` and `*.zone`, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, zone)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(zone), x509.DNSName(f"*.{zone}")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + certificate.public_bytes(serialization.Encoding.PEM)


def server_context(pem: bytes) -> ssl.SSLContext:
    """A TLS server context serving the key and chain in `pem`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads a chain only from a file: one only this process can read, gone at once.
    with tempfile.TemporaryDirectory(prefix="oobwatch-tls-") as folder:
        path = os.path.join(folder, "chain.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(pem)
        context.load_cert_chain(path)
    return context


def from_files(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for the PEM chain in `cert` and its key in `key`.

    Raises ValueError naming what is wrong when they cannot be served together.
    """
    try:
        return server_context(key.read_bytes() + b"\n" + cert.read_bytes())
    except ssl.SSLError as error:
        reason = error.reason or error.strerror or str(error)
        raise ValueError(f"cannot serve this certificate with this key: {reason}") from None
