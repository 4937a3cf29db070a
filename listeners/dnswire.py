"""DNS wire format for an authoritative canary zone, sans I/O.

Parses only what answering needs (header, the one question, whether the
query carried EDNS) and builds answers from byte templates made once per
zone. Every name under the zone exists, with the same records, so an answer
never reveals whether a token was minted, and no answer is much larger than
its query, so the server cannot be used as an amplifier.
"""

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

_HEADER = struct.Struct("!HHHHHH")
_TAIL = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")

QR = 0x8000
AA = 0x0400
RD = 0x0100
OPCODE_MASK = 0x7800

NOERROR, FORMERR, NOTIMP, REFUSED = 0, 1, 4, 5

A, NS, SOA, MX, TXT, HINFO, AAAA, OPT, IXFR, AXFR, ANY = 1, 2, 6, 15, 16, 13, 28, 41, 251, 252, 255
CLASS_IN, CLASS_ANY = 1, 255
_EDNS_UDP_SIZE = 1232
MAX_NAME = 255


class MalformedQuery(ValueError):
    """The packet is not a query this server can parse.

    `answerable` is False when no reply should go back at all: a packet
    shorter than a header, or a response (answering responses would let two
    servers be played against each other).
    """

    def __init__(self, reason: str, *, answerable: bool) -> None:
        super().__init__(reason)
        self.answerable = answerable


class Question(NamedTuple):
    """The parts of a query an authoritative answer depends on."""

    id: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    end: int
    edns: bool


def parse_query(packet: bytes) -> Question:
    """Parse the header and single question of a query; raise MalformedQuery otherwise."""
    if len(packet) < _HEADER.size:
        raise MalformedQuery("shorter than a DNS header", answerable=False)
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(packet)
    if flags & QR:
        raise MalformedQuery("a response, not a query", answerable=False)
    if qdcount != 1:
        raise MalformedQuery(f"{qdcount} questions", answerable=True)
    labels = []
    position = _HEADER.size
    size = len(packet)
    while True:
        if position >= size:
            raise MalformedQuery("question name runs past the packet", answerable=True)
        length = packet[position]
        if length == 0:
            position += 1
            break
        if length > 63:
            raise MalformedQuery("compressed or reserved label in question", answerable=True)
        labels.append(packet[position + 1 : position + 1 + length])
        position += 1 + length
        if position - _HEADER.size >= MAX_NAME:
            raise MalformedQuery("question name longer than 255 octets", answerable=True)
    if position + _TAIL.size > size:
        raise MalformedQuery("question type and class missing", answerable=True)
    qtype, qclass = _TAIL.unpack_from(packet, position)
    position += _TAIL.size
    edns = (
        arcount > 0
        and ancount == 0
        and nscount == 0
        and packet[position : position + 3] == b"\x00\x00\x29"
    )
    return Question(ident, flags, tuple(labels), qtype, qclass, position, edns)


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of a dotted ASCII name."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    return bytes(out + b"\x00")


def name_text(labels: Sequence[bytes]) -> str:
    """Presentation form of a name, escaping anything outside printable ASCII as \\DDD."""
    parts = []
    for label in labels:
        chars = []
        for byte in label:
            if byte in b'.\\"();' or not 0x21 <= byte <= 0x7E:
                chars.append("\\" + (chr(byte) if byte in b'.\\"();' else f"{byte:03d}"))
            else:
                chars.append(chr(byte))
        parts.append("".join(chars))
    return ".".join(parts) + "."


def _record(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + _RR.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def _character_string(text: bytes) -> bytes:
    return bytes([len(text)]) + text


_QUESTION_NAME = b"\xc0\x0c"


@dataclass(frozen=True, slots=True)
class Section:
    """Precomputed answer and authority records for one query type."""

    answers: int
    authority: int
    records: bytes


class ZoneAnswers:
    """Byte templates for every answer the zone gives, built once."""

    def __init__(
        self,
        zone: str,
        ipv4: Sequence[str],
        ipv6: Sequence[str],
        ttl: int,
        nameservers: Sequence[str],
        serial: int = 1,
    ) -> None:
        self.zone = zone.rstrip(".").lower()
        zone_wire = encode_name(self.zone)
        soa_rdata = (
            encode_name(nameservers[0])
            + encode_name(f"hostmaster.{self.zone}")
            + struct.pack("!IIIII", serial, 3600, 600, 86400, ttl)
        )
        soa_authority = _record(zone_wire, SOA, ttl, soa_rdata)
        nodata = Section(0, 1, soa_authority)

        def answers(records: list[bytes]) -> Section:
            return Section(len(records), 0, b"".join(records)) if records else nodata

        under = {
            A: answers(
                [_record(_QUESTION_NAME, A, ttl, ipaddress.IPv4Address(a).packed) for a in ipv4]
            ),
            AAAA: answers(
                [_record(_QUESTION_NAME, AAAA, ttl, ipaddress.IPv6Address(a).packed) for a in ipv6]
            ),
            MX: answers(
                [_record(_QUESTION_NAME, MX, ttl, b"\x00\x0a" + encode_name(f"mail.{self.zone}"))]
            ),
            TXT: answers([_record(_QUESTION_NAME, TXT, ttl, _character_string(b""))]),
            # RFC 8482: a minimal synthesised HINFO instead of every record set.
            ANY: answers(
                [
                    _record(
                        _QUESTION_NAME,
                        HINFO,
                        ttl,
                        _character_string(b"RFC8482") + _character_string(b""),
                    )
                ]
            ),
        }
        apex = dict(under)
        apex[SOA] = answers([_record(_QUESTION_NAME, SOA, ttl, soa_rdata)])
        apex[NS] = answers(
            [_record(_QUESTION_NAME, NS, ttl, encode_name(ns)) for ns in nameservers]
        )
        self._under = under
        self._apex = apex
        self._nodata = nodata

    def answer(self, packet: bytes, question: Question, *, apex: bool) -> bytes:
        """The authoritative answer to a query for a name in the zone."""
        if question.qtype in (AXFR, IXFR):
            return refuse(packet, question)
        table = self._apex if apex else self._under
        section = table.get(question.qtype, self._nodata)
        flags = QR | AA | (question.flags & RD)
        additional = 1 if question.edns else 0
        header = _HEADER.pack(question.id, flags, 1, section.answers, section.authority, additional)
        reply = header + packet[_HEADER.size : question.end] + section.records
        return reply + _opt() if question.edns else reply


def _opt() -> bytes:
    return b"\x00" + _RR.pack(OPT, _EDNS_UDP_SIZE, 0, 0)


def refuse(packet: bytes, question: Question) -> bytes:
    """REFUSED, echoing the question: for names outside the zone and zone transfers."""
    return _bare(packet, question, REFUSED)


def not_implemented(packet: bytes, question: Question) -> bytes:
    return _bare(packet, question, NOTIMP)


def _bare(packet: bytes, question: Question, rcode: int) -> bytes:
    flags = QR | (question.flags & (OPCODE_MASK | RD)) | rcode
    header = _HEADER.pack(question.id, flags, 1, 0, 0, 0)
    return header + packet[_HEADER.size : question.end]


def format_error(packet: bytes) -> bytes:
    """FORMERR with no question: the question could not be parsed."""
    ident, flags = struct.unpack_from("!HH", packet)
    return _HEADER.pack(ident, QR | (flags & (OPCODE_MASK | RD)) | FORMERR, 0, 0, 0, 0)
