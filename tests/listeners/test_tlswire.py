"""The ClientHello reader: real hellos from OpenSSL, a published JA4 vector, and hostile bytes."""

import re
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listeners.tlswire import MAX_HELLO_BYTES, ClientHello, Malformed, client_hello, is_grease

JA4 = re.compile(
    r"^t(13|12|11|10|s3|s2|d1|d2|d3|00)[di]\d{4}[0-9a-zA-Z]{2}_[0-9a-f]{12}_[0-9a-f]{12}$"
)


def openssl_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The first bytes Python's OpenSSL sends, taken from a memory BIO: a real ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def record(handshake: bytes, version: int = 0x0301) -> bytes:
    return (
        bytes([0x16]) + version.to_bytes(2, "big") + len(handshake).to_bytes(2, "big") + handshake
    )


def extension(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def vector(items: list[int], size: int = 2) -> bytes:
    raw = b"".join(item.to_bytes(2, "big") for item in items)
    return len(raw).to_bytes(size, "big") + raw


def built_hello(ciphers: list[int], extensions: list[tuple[int, bytes]]) -> bytes:
    body = (0x0303).to_bytes(2, "big") + bytes(32) + b"\x00" + vector(ciphers) + b"\x01\x00"
    block = b"".join(extension(kind, data) for kind, data in extensions)
    body += len(block).to_bytes(2, "big") + block
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def test_a_real_hello_names_its_host_and_protocols() -> None:
    hello = client_hello(openssl_hello("x.abc.canary.example.test", ["h2", "http/1.1"]))
    assert hello is not None
    assert hello.sni == "x.abc.canary.example.test"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.versions
    assert "13" in hello.version_names
    assert JA4.match(hello.ja4)
    assert hello.ja4.startswith("t13d")
    assert hello.ja4[8:10] == "h2"


def test_a_hello_without_sni_or_alpn() -> None:
    hello = client_hello(openssl_hello(None))
    assert hello is not None
    assert hello.sni is None
    assert hello.alpn == ()
    assert hello.ja4[3] == "i"
    assert hello.ja4[8:10] == "00"


def test_a_server_name_longer_than_any_dns_name_is_not_kept() -> None:
    def with_name(name: bytes) -> ClientHello | None:
        entry = b"\x00" + len(name).to_bytes(2, "big") + name
        listed = len(entry).to_bytes(2, "big") + entry
        return client_hello(built_hello([0x1301], [(0, listed)]))

    fits = with_name(b"a" * 240 + b".example.test")
    assert fits is not None
    assert fits.sni == "a" * 240 + ".example.test"
    too_long = with_name(b"\x01" * 4000 + b".example.test")
    assert too_long is not None
    assert too_long.sni == ""


def test_ja4_matches_a_published_fingerprint() -> None:
    """Chrome's hello as browserleaks publishes it (ja4_ro, in wire order) and its JA4."""
    ciphers = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8]
    ciphers += [0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
    signatures = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
    name = b"tls.browserleaks.com"
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    sni = len(entry).to_bytes(2, "big") + entry
    alpn_list = b"\x02h2\x08http/1.1"
    alpn = len(alpn_list).to_bytes(2, "big") + alpn_list
    order = [0x002D, 0x0033, 0x0010, 0xFE0D, 0x0017, 0x44CD, 0x0000, 0x000B, 0x000A]
    order += [0x002B, 0xFF01, 0x0023, 0x0012, 0x0005, 0x000D, 0x001B]
    bodies = {
        0x0000: sni,
        0x0010: alpn,
        0x000D: vector(signatures),
        0x002B: vector([0x0A0A, 0x0304, 0x0303], size=1),
    }
    grease = [(0x1A1A, b""), (0x2A2A, b"\x00")]
    extensions = [grease[0], *[(kind, bodies.get(kind, b"")) for kind in order], grease[1]]
    hello = client_hello(built_hello([0x3A3A, *ciphers], extensions))
    assert hello is not None
    assert hello.ja4 == "t13d1516h2_8daaf6152771_d8a2da3f94cd"
    assert hello.version_names == ["13", "12"]


def test_alpn_that_is_not_alphanumeric_is_shown_as_hex() -> None:
    alpn_list = b"\x03\xab-\xcd"
    extensions = [(0x0010, len(alpn_list).to_bytes(2, "big") + alpn_list)]
    hello = client_hello(built_hello([0x1301], extensions))
    assert hello is not None
    assert hello.ja4[8:10] == "ad"


def test_a_hello_split_anywhere_is_read_once_whole() -> None:
    data = openssl_hello("a.canary.example.test", ["h2"])
    whole = client_hello(data)
    for cut in range(len(data)):
        assert client_hello(data[:cut]) is None
    # One record split into several records is the same hello.
    handshake = data[5:]
    pieces = b"".join(record(handshake[i : i + 100]) for i in range(0, len(handshake), 100))
    assert client_hello(pieces) == whole


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x40\x01" + bytes(5),  # a record longer than TLS allows
        record(b"\x02\x00\x00\x00"),  # a ServerHello first
        record(b"\x01" + (MAX_HELLO_BYTES + 1).to_bytes(3, "big")),
        record(b"\x01\x00\x00\x03\x03\x03\x00"),  # runs past its end
        b"\x80\x2e\x01\x00\x02",  # SSLv2-style hello
    ],
)
def test_what_is_not_a_hello_is_refused(data: bytes) -> None:
    with pytest.raises(Malformed):
        client_hello(data)


def test_grease_values() -> None:
    assert all(is_grease(0x0A0A + 0x1010 * n) for n in range(16))
    assert not any(is_grease(v) for v in (0x0A1A, 0x1301, 0x0000, 0xFAFB))


def outcome(data: bytes) -> ClientHello | str | None:
    try:
        return client_hello(data)
    except Malformed:
        return "malformed"


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, ClientHello):
        assert JA4.match(result.ja4)


REAL = openssl_hello("x.canary.example.test", ["h2", "http/1.1"])


@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=8))
def test_mutated_real_hellos_never_crash(changes: list[tuple[int, int]]) -> None:
    data = bytearray(REAL)
    for at, value in changes:
        data[at] = value
    result = outcome(bytes(data))
    if isinstance(result, ClientHello):
        assert JA4.match(result.ja4)
        assert len(result.alpn) <= 16


def test_more_records_than_a_client_sends_are_refused() -> None:
    handshake = REAL[5:]
    tiny = b"".join(record(handshake[i : i + 1]) for i in range(len(handshake)))
    with pytest.raises(Malformed, match="records"):
        client_hello(tiny)
