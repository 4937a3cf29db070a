"""The TLS ClientHello, read before any handshake: what a client offers, and its JA4.

A client names the host it wants (SNI) in its very first message, in the
clear, before it has seen a certificate, so a canary's name is caught even
from a client that then refuses ours. `client_hello(data)` reads the first
bytes a client sent: the ClientHello once it has all arrived, None while
more is needed, `Malformed` when the bytes cannot be one. Pure functions
over bytes, bounded: a hello larger than MAX_HELLO_BYTES is refused.

JA4 follows the public FoxIO specification: protocol, highest offered
version, SNI present or not, counts of ciphers and extensions, the first
ALPN value's first and last characters; then truncated SHA-256 digests of
the sorted ciphers, and of the sorted extensions (SNI and ALPN left out)
with the signature algorithms in their order. GREASE values are ignored.
"""

import hashlib
from dataclasses import dataclass

# A ClientHello with post-quantum key shares is about 2 KB; anything past this is not a client.
MAX_HELLO_BYTES = 16 * 1024
# Real clients send their hello in one record, two at most: more is a way to cost parsing.
MAX_RECORDS = 16
MAX_ALPN_KEPT = 16
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_RECORD_HEADER = 5
_SNI, _ALPN, _SIGNATURES, _VERSIONS = 0x0000, 0x0010, 0x000D, 0x002B
_VERSION_NAMES = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_EMPTY_DIGEST = "000000000000"


class Malformed(ValueError):
    """The bytes are not a TLS ClientHello (or not one this reader accepts)."""


def is_grease(value: int) -> bool:
    """RFC 8701 values (0x0a0a, 0x1a1a, ... 0xfafa), sent to keep servers tolerant."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client offered in its first message."""

    legacy_version: int
    versions: tuple[int, ...]
    ciphers: tuple[int, ...]
    extensions: tuple[int, ...]
    sni: str | None
    alpn: tuple[str, ...]
    signature_algorithms: tuple[int, ...]

    @property
    def highest_version(self) -> int:
        offered = [version for version in self.versions if not is_grease(version)]
        return max(offered) if offered else self.legacy_version

    @property
    def version_names(self) -> list[str]:
        """Offered versions as JA4 writes them ("13", "12", ...), GREASE left out."""
        offered = self.versions or (self.legacy_version,)
        return [_VERSION_NAMES.get(v, f"{v:04x}") for v in offered if not is_grease(v)]

    @property
    def ja4(self) -> str:
        ciphers = [c for c in self.ciphers if not is_grease(c)]
        extensions = [e for e in self.extensions if not is_grease(e)]
        head = (
            "t"
            + _VERSION_NAMES.get(self.highest_version, "00")
            + ("d" if self.sni is not None else "i")
            + f"{min(len(ciphers), 99):02d}"
            + f"{min(len(extensions), 99):02d}"
            + _alpn_mark(self.alpn[0] if self.alpn else "")
        )
        hashed = sorted(e for e in extensions if e not in (_SNI, _ALPN))
        signatures = [s for s in self.signature_algorithms if not is_grease(s)]
        listed = _hex_list(hashed) + ("_" + _hex_list(signatures) if signatures else "")
        return f"{head}_{_digest(_hex_list(sorted(ciphers)))}_{_digest(listed if hashed else '')}"


def client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello in the first bytes a client sent; None until all of it has arrived."""
    handshake = bytearray()
    offset = 0
    records = 0
    while True:
        if len(data) - offset < _RECORD_HEADER:
            return None
        kind, major, length = data[offset], data[offset + 1], _u16(data, offset + 3)
        if kind != _HANDSHAKE or major != 3:
            raise Malformed("not a TLS handshake record")
        if length == 0 or length > 1 << 14:
            raise Malformed(f"record length {length}")
        records += 1
        if records > MAX_RECORDS:
            raise Malformed(f"more than {MAX_RECORDS} records before the ClientHello ended")
        body = data[offset + _RECORD_HEADER : offset + _RECORD_HEADER + length]
        handshake += body
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise Malformed("the first handshake message is not a ClientHello")
            size = int.from_bytes(handshake[1:4], "big")
            if size > MAX_HELLO_BYTES:
                raise Malformed(f"a ClientHello of {size} bytes")
            if len(handshake) >= 4 + size:
                return _parse(bytes(handshake[4 : 4 + size]))
        if len(body) < length:
            return None
        offset += _RECORD_HEADER + length


def _parse(hello: bytes) -> ClientHello:
    reader = _Reader(hello)
    legacy_version = reader.u16()
    reader.take(32)  # random
    reader.take(reader.u8())  # legacy session id
    suites = reader.take(reader.u16())
    if len(suites) % 2:
        raise Malformed("odd cipher suite list")
    ciphers = tuple(_u16(suites, i) for i in range(0, len(suites), 2))
    reader.take(reader.u8())  # compression methods
    extensions: list[int] = []
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    signatures: tuple[int, ...] = ()
    versions: tuple[int, ...] = ()
    if reader.left:
        block = _Reader(reader.take(reader.u16()))
        while block.left:
            kind = block.u16()
            content = _Reader(block.take(block.u16()))
            extensions.append(kind)
            if kind == _SNI:
                sni = _server_name(content)
            elif kind == _ALPN:
                alpn = _protocols(content)
            elif kind == _SIGNATURES:
                signatures = _u16_list(content.take(content.u16()))
            elif kind == _VERSIONS:
                versions = _u16_list(content.take(content.u8()))
    return ClientHello(legacy_version, versions, ciphers, tuple(extensions), sni, alpn, signatures)


# The longest DNS name; a client may send a longer server name.
MAX_NAME = 253


def _server_name(content: "_Reader") -> str:
    names = _Reader(content.take(content.u16()))
    while names.left:
        kind = names.u8()
        name = names.take(names.u16())
        if kind == 0:
            # Longer than any DNS name: no host a client means, so none to record.
            return name.decode("ascii", "replace").lower() if len(name) <= MAX_NAME else ""
    return ""


def _protocols(content: "_Reader") -> tuple[str, ...]:
    listed = _Reader(content.take(content.u16()))
    found: list[str] = []
    while listed.left:
        protocol = listed.take(listed.u8())
        if len(found) < MAX_ALPN_KEPT:
            found.append(protocol.decode("latin-1"))
    return tuple(found)


def _alpn_mark(protocol: str) -> str:
    if not protocol:
        return "00"
    first, last = protocol[0], protocol[-1]
    if first.isascii() and first.isalnum() and last.isascii() and last.isalnum():
        return first + last
    raw = protocol.encode("latin-1")
    return f"{raw[0]:02x}"[0] + f"{raw[-1]:02x}"[1]


def _hex_list(values: list[int]) -> str:
    return ",".join(f"{value:04x}" for value in values)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12] if text else _EMPTY_DIGEST


def _u16(data: bytes | bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u16_list(raw: bytes) -> tuple[int, ...]:
    if len(raw) % 2:
        raise Malformed("odd list of 16-bit values")
    return tuple(_u16(raw, i) for i in range(0, len(raw), 2))


class _Reader:
    """Reads length-prefixed fields, refusing to run past the end."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    @property
    def left(self) -> int:
        return len(self._data) - self._at

    def take(self, count: int) -> bytes:
        if count > self.left:
            raise Malformed("a field runs past the end of its message")
        piece = self._data[self._at : self._at + count]
        self._at += count
        return piece

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")
