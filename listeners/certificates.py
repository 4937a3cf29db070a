"""The node's TLS certificate, as listeners that speak TLS serve it.

One `NodeCertificate` per node: every listener takes its TLS contexts from
it, and a new certificate (files changed, an ACME renewal) is what they
serve to the connections that follow, without a restart.

Without a certificate of its own, a node serves a self-signed one for the
zone and everything under it, made once and kept in the store so every node
on it serves the same: a ClientHello is caught from the first start, and a
client that refuses the certificate has still named the host it wanted.
"""

import contextlib
import datetime
import os
import ssl
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from listeners.base import printable
from listeners.tlswire import MAX_NAME

SELF_SIGNED_DAYS = 3650

Source = Literal["acme", "file", "self-signed"]


@dataclass(frozen=True, slots=True)
class Served:
    """A key and its chain as PEM, and where they came from."""

    pem: bytes
    source: Source

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.pem)

    @property
    def not_after(self) -> datetime.datetime:
        return self.chain[0].not_valid_after_utc

    def describe(self) -> dict[str, Any]:
        """What `tls status` shows: the leaf's subject, names, issuer and expiry, and the source."""
        leaf = self.chain[0]
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = names.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            sans = []
        return {
            "subject": leaf.subject.rfc4514_string(),
            "sans": sans,
            "issuer": leaf.issuer.rfc4514_string(),
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "source": self.source,
        }


def self_signed(
    zone: str, valid: tuple[datetime.datetime, datetime.datetime] | None = None
) -> bytes:
    """A new key and a self-signed certificate for `zone` and `*.zone`, as PEM; valid from
    an hour ago for SELF_SIGNED_DAYS unless `valid` says from when until when."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, zone)])
    now = datetime.datetime.now(datetime.UTC)
    begins, ends = valid or (
        now - datetime.timedelta(hours=1),
        now + datetime.timedelta(days=SELF_SIGNED_DAYS),
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begins)
        .not_valid_after(ends)
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


@contextlib.contextmanager
def _chain_file(pem: bytes) -> Iterator[str]:
    """`pem` in a file only this process can read, gone on exit: ssl loads a chain only from one."""
    with tempfile.TemporaryDirectory(prefix="oobwatch-tls-") as folder:
        path = os.path.join(folder, "chain.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(pem)
        yield path


def server_context(pem: bytes) -> ssl.SSLContext:
    """A TLS server context serving the key and chain in `pem`; ValueError when it cannot."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client may not make the server redo a handshake (and its cost) inside a connection.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        with _chain_file(pem) as path:
            context.load_cert_chain(path)
    except ssl.SSLError as error:
        reason = error.reason or error.strerror or str(error)
        raise ValueError(f"cannot serve this certificate with this key: {reason}") from None
    return context


def from_files(cert: Path, key: Path) -> Served:
    """The PEM chain in `cert` with its key in `key`; ValueError when they cannot be served."""
    served = Served(key.read_bytes() + b"\n" + cert.read_bytes(), "file")
    server_context(served.pem)
    return served


# Where DNS-01 looks for its answer, under the zone apex.
ACME_LABEL = "_acme-challenge"


class Challenges:
    """The DNS-01 answers (`_acme-challenge.<zone>` TXT) a node serves while an order is pending."""

    def __init__(self) -> None:
        self.values: tuple[str, ...] = ()


class Contexts:
    """A listener's TLS server context, `current` for each new connection: a replaced
    certificate gets a new context, never a changed one (loading a new chain into a live
    context keeps an old certificate of another key type, and it would be served).

    With `names`, it notes the server name each client asked for (SNI), for `facts`.
    """

    def __init__(self, pem: bytes, names: bool) -> None:
        self._names: weakref.WeakKeyDictionary[ssl.SSLObject, str] | None = (
            weakref.WeakKeyDictionary() if names else None
        )
        self.current = self._make(pem)

    def _make(self, pem: bytes) -> ssl.SSLContext:
        context = server_context(pem)
        names = self._names
        if names is not None:

            def seen(ssl_object: Any, name: str | None, _: ssl.SSLContext) -> None:
                if name:
                    names[ssl_object] = printable(name, MAX_NAME)

            context.sni_callback = seen
        return context

    def renew(self, pem: bytes) -> None:
        self.current = self._make(pem)

    def facts(self, ssl_object: ssl.SSLObject | None) -> dict[str, Any]:
        """Evidence of a connection's TLS: whether it has any, the name asked, the version."""
        if ssl_object is None:
            return {"tls": False}
        name = self._names.get(ssl_object) if self._names is not None else None
        return {"tls": True, "sni": name, "tls_version": ssl_object.version()}


class NodeCertificate:
    """What every TLS listener of a node serves, replaced for the connections after."""

    def __init__(self, served: Served) -> None:
        server_context(served.pem)
        self._served = served
        self._contexts: weakref.WeakSet[Contexts] = weakref.WeakSet()

    @property
    def served(self) -> Served:
        return self._served

    def contexts(self, names: bool = False) -> Contexts:
        """Server contexts that serve this certificate, and whatever replaces it; with `names`,
        noting the server name each client asks for."""
        contexts = Contexts(self._served.pem, names)
        self._contexts.add(contexts)
        return contexts

    def replace(self, served: Served) -> None:
        """Serve `served` from now on; ValueError (and the old one kept) when it cannot be."""
        if served.pem == self._served.pem:
            return
        server_context(served.pem)
        for contexts in list(self._contexts):
            contexts.renew(served.pem)
        self._served = served
