"""A real ACME server for tests: Debian's pebble on loopback, with its own throwaway HTTPS trust.

Each run gets fresh ports, a fresh CA for pebble's listener, and pebble's own per-run issuing
root, which `Pebble.roots()` fetches from the management port so tests can verify what it issues.
"""

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Pebble:
    directory: str
    management: str
    ca_bundle: Path
    log: Path

    def _get(self, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        response = httpx.get(f"{self.management}{path}", verify=context, timeout=5.0)
        response.raise_for_status()
        return response.content

    def roots(self) -> bytes:
        return self._get("/roots/0")

    def intermediates(self) -> bytes:
        return self._get("/intermediates/0")


def pebble_available() -> bool:
    return shutil.which("pebble") is not None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write_tls(tmp: Path) -> tuple[Path, Path, Path]:
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test listener CA")])
    ca = (
        _certificate("pebble test listener CA", ca_key, ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
    cert = (
        _certificate("localhost", key, ca_name)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp / "https-ca.pem", tmp / "https-cert.pem", tmp / "https-key.pem"
    paths[0].write_bytes(ca.public_bytes(Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return paths


def _wait_ready(process: subprocess.Popen[bytes], url: str, ca: Path, log: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pebble exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, verify=context, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"pebble did not answer {url} within {START_TIMEOUT}s:\n{log.read_text()}")


@contextlib.contextmanager
def run_pebble(
    dns_server: tuple[str, int], tmp: Path, validity_seconds: int | None = None
) -> Iterator[Pebble]:
    acme_port, management_port = _free_port(), _free_port()
    ca, cert, key = _write_tls(tmp)
    settings: dict[str, object] = {
        "listenAddress": f"{HOST}:{acme_port}",
        "managementListenAddress": f"{HOST}:{management_port}",
        "certificate": str(cert),
        "privateKey": str(key),
        "httpPort": 5002,
        "tlsPort": 5001,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_seconds is not None:
        # pebble 2.4's config struct has no JSON tags, so Go matches this to CertificateValidityPeriod.
        settings["certificateValidityPeriod"] = validity_seconds
    config = tmp / "pebble-config.json"
    config.write_text(json.dumps({"pebble": settings}))
    log = tmp / "pebble.log"
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
        "PEBBLE_VA_ALWAYS_VALID": "0",
    }
    command = ["pebble", "-config", str(config), "-dnsserver", f"{dns_server[0]}:{dns_server[1]}"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        directory = f"https://{HOST}:{acme_port}/dir"
        _wait_ready(process, directory, ca, log)
        yield Pebble(directory, f"https://{HOST}:{management_port}", ca, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
