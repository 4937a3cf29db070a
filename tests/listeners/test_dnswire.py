import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from listeners.dnswire import (
    MalformedQuery,
    ZoneAnswers,
    encode_name,
    format_error,
    name_text,
    parse_query,
    refuse,
)

ZONE = "canary.example.test"
ANSWERS = ZoneAnswers(ZONE, ["192.0.2.1", "192.0.2.2"], ["2001:db8::1"], 0, [f"ns1.{ZONE}"])


def ask(name: str, qtype: str, *, edns: bool = False, apex: bool = False) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=4096))
    packet = query.pack()
    reply = DNSRecord.parse(ANSWERS.answer(packet, parse_query(packet), apex=apex))
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1
    assert reply.header.aa == 1
    assert reply.header.ra == 0
    assert reply.header.rd == query.header.rd
    assert str(reply.q.qname) == str(query.q.qname)
    return reply


@pytest.mark.parametrize(
    ("qtype", "rtypes", "rdata"),
    [
        ("A", ["A", "A"], ["192.0.2.1", "192.0.2.2"]),
        ("AAAA", ["AAAA"], ["2001:db8::1"]),
        ("MX", ["MX"], [f"10 mail.{ZONE}."]),
        ("TXT", ["TXT"], ['""']),
        # dnslib has no HINFO type: this is "RFC8482" "" in RFC 3597 generic form.
        ("ANY", ["HINFO"], ["\\# 9 075246433834383200"]),
    ],
)
def test_answers_under_the_zone(qtype: str, rtypes: list[str], rdata: list[str]) -> None:
    reply = ask(f"Data.TOKEN.{ZONE}", qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert [QTYPE[rr.rtype] for rr in reply.rr] == rtypes
    assert [rr.rdata.toZone() for rr in reply.rr] == rdata
    assert all(str(rr.rname) == f"Data.TOKEN.{ZONE}." for rr in reply.rr)


@pytest.mark.parametrize("qtype", ["HTTPS", "SVCB", "CNAME", "SRV", "CAA", "PTR", "NS", "SOA"])
def test_other_types_under_the_zone_are_nodata_with_soa(qtype: str) -> None:
    reply = ask(f"tok.{ZONE}", qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.rr == []
    assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
    assert str(reply.auth[0].rname) == f"{ZONE}."


def test_apex_has_soa_and_ns() -> None:
    soa = ask(ZONE, "SOA", apex=True)
    assert QTYPE[soa.rr[0].rtype] == "SOA"
    assert str(soa.rr[0].rdata.mname) == f"ns1.{ZONE}."
    ns = ask(ZONE, "NS", apex=True)
    assert [rr.rdata.toZone() for rr in ns.rr] == [f"ns1.{ZONE}."]


def test_edns_is_echoed() -> None:
    reply = ask(f"tok.{ZONE}", "A", edns=True)
    assert [QTYPE[rr.rtype] for rr in reply.ar] == ["OPT"]


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
def test_zone_transfers_are_refused(qtype: str) -> None:
    packet = DNSRecord.question(ZONE, qtype).pack()
    reply = DNSRecord.parse(ANSWERS.answer(packet, parse_query(packet), apex=True))
    assert reply.header.rcode == RCODE.REFUSED


def test_refused_echoes_question_without_aa() -> None:
    packet = DNSRecord.question("www.example.com", "A").pack()
    reply = DNSRecord.parse(refuse(packet, parse_query(packet)))
    assert reply.header.rcode == RCODE.REFUSED
    assert reply.header.aa == 0
    assert str(reply.q.qname) == "www.example.com."


def test_answers_are_never_much_larger_than_queries() -> None:
    for qtype in ("A", "AAAA", "ANY", "TXT", "MX", "SOA", "NS", "HTTPS"):
        packet = DNSRecord.question(ZONE, qtype).pack()
        reply = ANSWERS.answer(packet, parse_query(packet), apex=True)
        assert len(reply) <= len(packet) + 120


@pytest.mark.parametrize(
    ("packet", "answerable"),
    [
        (b"", False),
        (b"\x00" * 11, False),
        (DNSRecord.question("a.b", "A").pack()[:-2], True),
        (b"\x12\x34\x81\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x00\x00\x01\x00\x01", False),
        (b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6, True),
        (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x01\x00\x01", True),
        (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3f" + b"a" * 10, True),
    ],
)
def test_malformed(packet: bytes, answerable: bool) -> None:
    with pytest.raises(MalformedQuery) as caught:
        parse_query(packet)
    assert caught.value.answerable is answerable
    if answerable:
        error = DNSRecord.parse(format_error(packet))
        assert error.header.rcode == RCODE.FORMERR
        assert error.header.qr == 1


def test_names_longer_than_255_are_rejected() -> None:
    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"
    packet = b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + name + b"\x00\x01\x00\x01"
    with pytest.raises(MalformedQuery):
        parse_query(packet)


@given(st.binary(max_size=600))
def test_parser_raises_only_its_own_error(packet: bytes) -> None:
    try:
        question = parse_query(packet)
    except MalformedQuery as error:
        if error.answerable:
            DNSRecord.parse(format_error(packet))
        return
    reply = DNSRecord.parse(ANSWERS.answer(packet, question, apex=False))
    assert reply.header.id == question.id


@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=3), st.integers(0, 65535))
def test_parsed_names_round_trip(labels: list[bytes], qtype: int) -> None:
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    packet = (
        b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + wire
        + qtype.to_bytes(2, "big")
        + b"\x00\x01"
    )
    question = parse_query(packet)
    assert list(question.labels) == labels
    assert question.qtype == qtype
    assert question.end == len(packet)
    assert name_text(question.labels).endswith(".")


def test_encode_name() -> None:
    assert encode_name("a.bc.") == b"\x01a\x02bc\x00"
    with pytest.raises(ValueError):
        encode_name("a..b")
