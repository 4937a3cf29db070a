"""DNS wire format for an authoritative canary zone, sans I/O.

Parses only what answering needs (header, the one question, whether the
query carried EDNS) and builds answers from byte templates made once per
zone. Every name under the zone exists, with the same records, so an answer
never reveals whether a token was minted.

No answer is more than MAX_GROWTH bytes larger than its query, so the server
cannot be used as an amplifier: an answer repeats the question, adds only the
records asked for (no additional section; ANY gets the one RFC 8482 HINFO),
writes every name that ends in the zone as a compression pointer into the
question (which always ends in the zone), and echoes EDNS only when the query
carried a whole OPT record, which is as large as the one sent back. A zone
whose records would break the bound is refused when its templates are built.
"""

import ipaddress
import struct
from collections.abc import Sequence
from typing import NamedTuple

_HEADER = struct.Struct("!HHHHHH")
_TAIL = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")

QR = 0x8000
AA = 0x0400
RD = 0x0100
OPCODE_MASK = 0x7800

NOERROR, FORMERR, SERVFAIL, NOTIMP, REFUSED = 0, 1, 2, 4, 5

A, NS, SOA, MX, TXT, HINFO, AAAA, OPT, IXFR, AXFR, ANY = 1, 2, 6, 15, 16, 13, 28, 41, 251, 252, 255
CLASS_IN, CLASS_ANY = 1, 255
_EDNS_UDP_SIZE = 1232
_DO = 0x8000
_OPT_SIZE = 1 + _RR.size
MAX_NAME = 255
# The most bytes an answer may add to its query: four AAAA records (the most
# DnsOptions allows) are 4 x 28 = 112; the NS set and the SOA must fit too.
MAX_GROWTH = 112


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
    dnssec_ok: bool = False


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
    # Only a whole OPT record counts: the one an answer echoes is no larger.
    edns = (
        arcount > 0
        and ancount == 0
        and nscount == 0
        and size >= position + _OPT_SIZE
        and packet[position : position + 3] == b"\x00\x00\x29"
    )
    dnssec_ok = edns and bool(int.from_bytes(packet[position + 7 : position + 9]) & _DO)
    return Question(ident, flags, tuple(labels), qtype, qclass, position, edns, dnssec_ok)


def _labels(labels: Sequence[str], name: str) -> bytes:
    out = bytearray()
    for label in labels:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    return bytes(out)


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of a dotted ASCII name."""
    wire = _labels(name.rstrip(".").split("."), name) + b"\x00"
    if len(wire) > MAX_NAME:
        raise ValueError(f"{name!r} is longer than {MAX_NAME} octets")
    return wire


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


# A record template is a run of pieces: bytes as they are, or an int where a
# name goes on as a suffix of the zone's name: that suffix's offset in the
# zone's wire name. Each int becomes a 2-byte compression pointer into the
# question, whose name always ends in the zone.
Pieces = tuple[bytes | int, ...]

_QUESTION_NAME: Pieces = (b"\xc0\x0c",)
_ZONE_NAME: Pieces = (0,)
_POINTER = struct.Struct("!H")


def _size(pieces: Pieces) -> int:
    return sum(len(piece) if isinstance(piece, bytes) else _POINTER.size for piece in pieces)


def _record(owner: Pieces, rtype: int, ttl: int, rdata: Pieces) -> Pieces:
    return (*owner, _RR.pack(rtype, CLASS_IN, ttl, _size(rdata)), *rdata)


def _character_string(text: bytes) -> bytes:
    return bytes([len(text)]) + text


class Section:
    """Answer and authority records for one query type, rendered per place of the zone's name."""

    __slots__ = ("_pieces", "_rendered", "answers", "authority", "size")

    def __init__(self, answers: int, authority: int, records: Sequence[Pieces]) -> None:
        self.answers = answers
        self.authority = authority
        self._pieces = tuple(piece for record in records for piece in record)
        # What the records add to an answer; the same wherever the zone's name sits.
        self.size = _size(self._pieces)
        # One rendering per offset the zone's name can have in a question: at most MAX_NAME.
        self._rendered: dict[int, bytes] = {}

    def records(self, zone_at: int) -> bytes:
        """The records for a message whose question has the zone's name at offset `zone_at`."""
        rendered = self._rendered.get(zone_at)
        if rendered is None:
            rendered = b"".join(
                piece if isinstance(piece, bytes) else _POINTER.pack(0xC000 | zone_at + piece)
                for piece in self._pieces
            )
            self._rendered[zone_at] = rendered
        return rendered


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
        self._zone_labels = self.zone.split(".")
        self._zone_wire = encode_name(self.zone)
        soa_rdata = (
            *self._name(nameservers[0]),
            *self._name(f"hostmaster.{self.zone}"),
            struct.pack("!IIIII", serial, 3600, 600, 86400, ttl),
        )
        # RFC 2308: NODATA carries the zone's SOA, so resolvers can cache the negative answer.
        nodata = Section(0, 1, [_record(_ZONE_NAME, SOA, ttl, soa_rdata)])

        def answers(records: list[Pieces]) -> Section:
            return Section(len(records), 0, records) if records else nodata

        def each(rtype: int, rdatas: Sequence[Pieces]) -> Section:
            return answers([_record(_QUESTION_NAME, rtype, ttl, rdata) for rdata in rdatas])

        under = {
            A: each(A, [(ipaddress.IPv4Address(a).packed,) for a in ipv4]),
            AAAA: each(AAAA, [(ipaddress.IPv6Address(a).packed,) for a in ipv6]),
            MX: each(MX, [(b"\x00\x0a", *self._name(f"mail.{self.zone}"))]),
            TXT: each(TXT, [(_character_string(b""),)]),
            # RFC 8482: a minimal synthesised HINFO instead of every record set.
            ANY: each(HINFO, [(_character_string(b"RFC8482") + _character_string(b""),)]),
        }
        apex = dict(under)
        apex[SOA] = each(SOA, [soa_rdata])
        apex[NS] = each(NS, [self._name(ns) for ns in nameservers])
        self._under = under
        self._apex = apex
        self._nodata = nodata
        # The most bytes any answer adds to its query (an echoed OPT adds none: see parse_query).
        self.growth = max(section.size for section in (*under.values(), *apex.values(), nodata))
        if self.growth > MAX_GROWTH:
            raise ValueError(
                f"answers for {self.zone} would add up to {self.growth} bytes to a query, "
                f"more than {MAX_GROWTH}: configure fewer or shorter nameserver names"
            )

    def _name(self, name: str) -> Pieces:
        """A name as pieces: its labels left of the longest suffix it shares with the zone."""
        wire = encode_name(name)
        labels = name.rstrip(".").lower().split(".")
        skip = 0
        for start in range(len(self._zone_labels)):
            suffix = self._zone_labels[start:]
            if labels[-len(suffix) :] == suffix:
                return (_labels(labels[: len(labels) - len(suffix)], name), skip)
            skip += 1 + len(self._zone_labels[start])
        return (wire,)

    def answer(self, packet: bytes, question: Question, *, apex: bool) -> bytes:
        """The authoritative answer to a query for a name in the zone."""
        if question.qtype in (AXFR, IXFR):
            return refuse(packet, question)
        name_end = question.end - _TAIL.size
        zone_at = name_end - len(self._zone_wire)
        suffix = packet[zone_at:name_end]
        if zone_at < _HEADER.size or (
            suffix != self._zone_wire and suffix.lower() != self._zone_wire
        ):
            # Not a name in the zone after all: the records' pointers would lead elsewhere.
            return refuse(packet, question)
        table = self._apex if apex else self._under
        section = table.get(question.qtype, self._nodata)
        flags = QR | AA | (question.flags & RD)
        additional = 1 if question.edns else 0
        header = _HEADER.pack(question.id, flags, 1, section.answers, section.authority, additional)
        reply = header + packet[_HEADER.size : question.end] + section.records(zone_at)
        return reply + _opt(question) if question.edns else reply


# The OPT record sent back, without and with the DO bit: RFC 3225 has it copied from the
# query; the zone is unsigned, so nothing else changes.
_OPT_BACK = tuple(b"\x00" + _RR.pack(OPT, _EDNS_UDP_SIZE, flags, 0) for flags in (0, _DO))


def _opt(question: Question) -> bytes:
    return _OPT_BACK[question.dnssec_ok]


def refuse(packet: bytes, question: Question) -> bytes:
    """REFUSED, echoing the question: for names outside the zone and zone transfers."""
    return _bare(packet, question, REFUSED)


def server_failure(packet: bytes, question: Question) -> bytes:
    """SERVFAIL: this server cannot answer now (the resolver asks again, or another server)."""
    return _bare(packet, question, SERVFAIL)


def not_implemented(packet: bytes, question: Question) -> bytes:
    return _bare(packet, question, NOTIMP)


def _bare(packet: bytes, question: Question, rcode: int) -> bytes:
    # RFC 6891 6.1.1: a query with an OPT record gets one back, whatever the rcode.
    flags = QR | (question.flags & (OPCODE_MASK | RD)) | rcode
    header = _HEADER.pack(question.id, flags, 1, 0, 0, 1 if question.edns else 0)
    reply = header + packet[_HEADER.size : question.end]
    return reply + _opt(question) if question.edns else reply


def format_error(packet: bytes) -> bytes:
    """FORMERR with no question: the question could not be parsed."""
    ident, flags = struct.unpack_from("!HH", packet)
    return _HEADER.pack(ident, QR | (flags & (OPCODE_MASK | RD)) | FORMERR, 0, 0, 0, 0)
