"""The PostgreSQL frontend/backend protocol (3.x) as far as authentication: parsing, sans I/O.

A client first sends untyped packets (an int32 length that counts itself, an
int32 code): SSLRequest, GSSENCRequest, CancelRequest or the StartupMessage
with its parameters (user, database, application_name, ...). After the
server's authentication request it sends typed messages (a byte, then an
int32 length): a PasswordMessage, or a SASLInitialResponse for SCRAM.
Everything here is untrusted input: every length is checked against the bytes
there are and against a bound, and every problem is `Malformed`.

The server's side is built here too (and the client's StartupMessage, for the
heartbeat's probe): the authentication requests, the
one-byte answers to SSLRequest/GSSENCRequest, NegotiateProtocolVersion, and
ErrorResponse.
"""

import struct
from dataclasses import dataclass

# What PostgreSQL itself accepts for a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_BYTES = 10_000
# A password or a SASL message: PostgreSQL allows more, no client sends more.
MAX_MESSAGE_BYTES = 8_192
MAX_PARAMETERS = 64
PROTOCOL_MAJOR = 3
_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")


class Malformed(ValueError):
    """Bytes that are not the message the protocol expects here."""


@dataclass(frozen=True, slots=True)
class SslRequest:
    """The client asks for TLS before its StartupMessage."""


@dataclass(frozen=True, slots=True)
class GssRequest:
    """The client asks for GSSAPI encryption before its StartupMessage."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A request to cancel a query of another connection: nothing to answer."""


@dataclass(frozen=True, slots=True)
class Startup:
    """The StartupMessage: the protocol version asked for and the connection parameters."""

    major: int
    minor: int
    parameters: dict[str, str]

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        # As PostgreSQL does: without one, the database is named like the user.
        return self.parameters.get("database") or self.user


Opening = SslRequest | GssRequest | CancelRequest | Startup


def packet_length(header: bytes) -> int:
    """The length of a startup-phase packet after its 4-byte length, from that length."""
    if len(header) != 4:
        raise Malformed("a packet length is 4 bytes")
    length: int = _INT32.unpack(header)[0]
    if not 8 <= length <= MAX_STARTUP_BYTES:
        raise Malformed(f"invalid startup packet length {length}")
    return length - 4


def opening(body: bytes) -> Opening:
    """A startup-phase packet's body (everything after its length)."""
    if len(body) < 4:
        raise Malformed("a startup packet holds at least its code")
    (code,) = _INT32.unpack_from(body)
    if code == _SSL_REQUEST and len(body) == 4:
        return SslRequest()
    if code == _GSS_REQUEST and len(body) == 4:
        return GssRequest()
    if code == _CANCEL_REQUEST and len(body) == 12:
        return CancelRequest()
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_MAJOR:
        raise Malformed(f"unsupported frontend protocol {major}.{minor}")
    return Startup(major, minor, _parameters(body[4:]))


def _parameters(data: bytes) -> dict[str, str]:
    """NUL-terminated name/value pairs, ended by one more NUL."""
    if not data.endswith(b"\x00"):
        raise Malformed("the startup parameters are not terminated")
    words = data[:-1].split(b"\x00")
    if words == [b""]:
        return {}
    if words[-1] != b"" or len(words) % 2 != 1:
        raise Malformed("a startup parameter has no value")
    words = words[:-1]
    if len(words) // 2 > MAX_PARAMETERS:
        raise Malformed("too many startup parameters")
    found: dict[str, str] = {}
    for name, value in zip(words[::2], words[1::2], strict=True):
        if not name:
            raise Malformed("a startup parameter has no name")
        found[_text(name)] = _text(value)
    return found


def message_header(header: bytes) -> tuple[bytes, int]:
    """A typed message's type byte and the length of its payload, from its 5-byte header."""
    if len(header) != 5:
        raise Malformed("a message header is 5 bytes")
    kind, length = _HEADER.unpack(header)
    if not 4 <= length <= MAX_MESSAGE_BYTES + 4:
        raise Malformed(f"invalid message length {length}")
    return kind, length - 4


def password(payload: bytes) -> str:
    """A PasswordMessage's password."""
    if not payload.endswith(b"\x00") or b"\x00" in payload[:-1]:
        raise Malformed("a password is one NUL-terminated string")
    return _text(payload[:-1])


@dataclass(frozen=True, slots=True)
class SaslInitial:
    """A SASLInitialResponse: the mechanism the client chose and its first message."""

    mechanism: str
    data: bytes

    @property
    def username(self) -> str | None:
        """The `n=` of a SCRAM client-first-message (PostgreSQL clients leave it empty)."""
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        parts = text.split(",")
        flag_known = parts[0] in ("n", "y") or parts[0].startswith("p=")
        if len(parts) < 4 or not flag_known:
            return None
        name = parts[2]
        return name[2:] if name.startswith("n=") else None


def sasl_initial(payload: bytes) -> SaslInitial:
    end = payload.find(b"\x00")
    if end < 0 or len(payload) < end + 5:
        raise Malformed("a SASLInitialResponse is a mechanism and a length")
    (size,) = _INT32.unpack_from(payload, end + 1)
    data = payload[end + 5 :]
    if size == -1 and not data:
        return SaslInitial(_text(payload[:end]), b"")
    if size != len(data):
        raise Malformed("the SASL data is not the length it says")
    return SaslInitial(_text(payload[:end]), data)


def _text(raw: bytes) -> str:
    # The client's encoding is not known before authentication: decode, never fail.
    return raw.decode("utf-8", "replace")


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + _INT32.pack(len(payload) + 4) + payload


def startup_message(parameters: dict[str, str]) -> bytes:
    """A client's StartupMessage for protocol 3.0 (the heartbeat's probe sends one)."""
    body = _INT32.pack(PROTOCOL_MAJOR << 16) + b"".join(
        name.encode() + b"\x00" + value.encode() + b"\x00" for name, value in parameters.items()
    )
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + body


def auth_cleartext() -> bytes:
    """AuthenticationCleartextPassword."""
    return _message(b"R", _INT32.pack(3))


def auth_sasl(*mechanisms: str) -> bytes:
    """AuthenticationSASL offering `mechanisms`."""
    listed = b"".join(name.encode() + b"\x00" for name in mechanisms) + b"\x00"
    return _message(b"R", _INT32.pack(10) + listed)


def negotiate_version(minor: int) -> bytes:
    """NegotiateProtocolVersion: this server speaks 3.`minor` and knows no `_pq_` options."""
    return _message(b"v", _INT32.pack((PROTOCOL_MAJOR << 16) | minor) + _INT32.pack(0))


def error(code: str, message: str, severity: str = "FATAL") -> bytes:
    """ErrorResponse with its severity (twice, as servers since 9.6 send it), SQLSTATE and text."""
    fields = b"".join(
        tag + value.encode() + b"\x00"
        for tag, value in ((b"S", severity), (b"V", severity), (b"C", code), (b"M", message))
    )
    return _message(b"E", fields + b"\x00")


# The one-byte answers to SSLRequest and GSSENCRequest.
WILL_TLS = b"S"
NO_ENCRYPTION = b"N"
