import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from listeners.dnswire import (
    MAX_GROWTH,
    MalformedQuery,
    Question,
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


# The amplification bound: the largest config DnsOptions allows (4 A, 4 AAAA, two
# nameservers outside the zone as long as the bound lets them be) on the longest zone
# the token check allows, and on the shortest zone, where queries are smallest.
LONG_ZONE = ".".join(["l" * 63, "o" * 63, "n" * 40, "test"])
FAR_NAMESERVERS = [f"ns{n}.{'x' * 26}.example.net" for n in (1, 2)]
FOUR_IPV4 = [f"192.0.2.{n}" for n in range(1, 5)]
FOUR_IPV6 = [f"2001:db8::{n}" for n in range(1, 5)]
LARGEST = {
    zone: ZoneAnswers(zone, FOUR_IPV4, FOUR_IPV6, 86400, FAR_NAMESERVERS)
    for zone in (LONG_ZONE, "z")
}
DISTINGUISHED = ["A", "AAAA", "ANY", "SOA", "NS", "TXT", "MX", "CNAME", "PTR", "SRV"]
DISTINGUISHED += ["CAA", "HTTPS", "SVCB", "DNSKEY", "TYPE65280", "AXFR", "IXFR"]
LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)


def raw_query(name: str, qtype: int, *, edns: bool, dnssec_ok: bool = False) -> bytes:
    """A query built by hand, so any qtype and any OPT record can go in it."""
    # OPT: root owner, type 41, 1232-byte payload, version 0, the DO bit or not, no options.
    opt = b"\x00\x00\x29\x04\xd0\x00\x00" + (b"\x80" if dnssec_ok else b"\x00") + b"\x00\x00\x00"
    header = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00" + (b"\x01" if edns else b"\x00")
    question = encode_name(name) + qtype.to_bytes(2, "big") + b"\x00\x01"
    return header + question + (opt if edns else b"")


def asked(name: str, qtype: str) -> tuple[bytes, Question]:
    packet = raw_query(name, dns.rdatatype.from_text(qtype), edns=False)
    return packet, parse_query(packet)


def test_the_largest_config_reaches_the_bound_and_no_further() -> None:
    assert {answers.growth for answers in LARGEST.values()} == {MAX_GROWTH}
    default = ZoneAnswers(ZONE, ["127.0.0.1"], [], 0, [f"ns1.{ZONE}"])
    assert default.growth == 51  # the NODATA SOA, every name in it a pointer


@pytest.mark.parametrize("zone", list(LARGEST))
def test_worst_case_over_every_distinguished_type_with_and_without_edns(zone: str) -> None:
    answers = LARGEST[zone]
    worst_ratio, most_added = 0.0, 0
    for name in (zone, f"x.{zone}", f"data.{'t' * 26}.{zone}"):
        for qtype in DISTINGUISHED:
            for edns, dnssec_ok in ((False, False), (True, False), (True, True)):
                packet = raw_query(
                    name, dns.rdatatype.from_text(qtype), edns=edns, dnssec_ok=dnssec_ok
                )
                reply = answers.answer(packet, parse_query(packet), apex=name == zone)
                dns.message.from_wire(reply)
                worst_ratio = max(worst_ratio, len(reply) / len(packet))
                most_added = max(most_added, len(reply) - len(packet))
    assert most_added == MAX_GROWTH
    # The smallest query for a name in the zone asks for the apex without EDNS.
    smallest = len(raw_query(zone, 1, edns=False))
    assert worst_ratio == (smallest + MAX_GROWTH) / smallest
    assert worst_ratio <= (1.59 if zone == LONG_ZONE else 6.9)


@settings(max_examples=400)
@given(
    zone=st.sampled_from(list(LARGEST)),
    left=st.lists(LABEL, max_size=4),
    qtype=st.sampled_from([dns.rdatatype.from_text(t) for t in DISTINGUISHED])
    | st.integers(0, 65535),
    edns=st.booleans(),
    dnssec_ok=st.booleans(),
    shout=st.booleans(),
)
def test_no_answer_adds_more_than_the_bound(
    zone: str, left: list[str], qtype: int, edns: bool, dnssec_ok: bool, shout: bool
) -> None:
    name = ".".join([*left, zone])
    assume(len(name) + 2 <= 255)  # its wire form, within the limit for a name
    name = name.upper() if shout else name
    packet = raw_query(name, qtype, edns=edns, dnssec_ok=dnssec_ok)
    question = parse_query(packet)
    reply = LARGEST[zone].answer(packet, question, apex=not left)
    assert len(reply) <= len(packet) + MAX_GROWTH
    parsed = dns.message.from_wire(reply)
    assert parsed.id == 0xBEEF
    assert (parsed.opt is not None) is edns
    assert bool(parsed.ednsflags & dns.flags.DO) is (edns and dnssec_ok)
    # Names written as pointers into the question still read as the zone's own.
    for rrset in parsed.authority:
        assert rrset.name == dns.name.from_text(zone)
        assert rrset[0].rname == dns.name.from_text(f"hostmaster.{zone}")
        assert rrset[0].mname == dns.name.from_text(FAR_NAMESERVERS[0])


@pytest.mark.parametrize(
    ("nameserver", "wire"),
    [
        (f"ns1.{ZONE}", b"\x03ns1\xc0\x0c"),  # under the zone: the rest is the question
        ("ns1.example.test", b"\x03ns1\xc0\x13"),  # shares example.test, 7 bytes into it
        ("ns1.example.net", encode_name("ns1.example.net")),  # nothing to point at
    ],
)
def test_nameservers_point_into_the_question(nameserver: str, wire: bytes) -> None:
    answers = ZoneAnswers(ZONE, [], [], 0, [nameserver])
    packet = raw_query(ZONE.upper(), dns.rdatatype.NS, edns=False)
    reply = answers.answer(packet, parse_query(packet), apex=True)
    assert reply.endswith(wire)
    [rrset] = dns.message.from_wire(reply).answer
    assert [rdata.target for rdata in rrset] == [dns.name.from_text(nameserver)]
    packet, question = asked(f"Q.x.{ZONE}", "CAA")
    [soa] = dns.message.from_wire(answers.answer(packet, question, apex=False)).authority
    assert soa[0].mname == dns.name.from_text(nameserver)


def test_mx_points_into_the_question() -> None:
    packet, question = asked(f"Q.x.{ZONE}", "MX")
    [mx] = dns.message.from_wire(ANSWERS.answer(packet, question, apex=False)).answer
    assert mx[0].exchange == dns.name.from_text(f"mail.{ZONE}")
    assert mx.name == dns.name.from_text(f"q.x.{ZONE}")


def test_nameservers_that_would_break_the_bound_are_refused() -> None:
    long_name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    with pytest.raises(ValueError, match="more than 112"):
        ZoneAnswers(ZONE, [], [], 0, [long_name, "x" + long_name[1:]])
    with pytest.raises(ValueError, match="longer than 255"):
        encode_name(long_name + ".e")


def test_a_name_outside_the_zone_is_never_answered_from_the_zone() -> None:
    packet, question = asked("canary.example.org", "A")
    reply = dns.message.from_wire(ANSWERS.answer(packet, question, apex=False))
    assert reply.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("edns", [False, True])
def test_refused_echoes_opt_and_is_never_larger_than_the_query(edns: bool) -> None:
    packet = raw_query("www.example.com", dns.rdatatype.A, edns=edns)
    reply = refuse(packet, parse_query(packet))
    assert len(reply) == len(packet)
    assert (dns.message.from_wire(reply).opt is not None) is edns


def test_a_partial_opt_record_is_not_echoed() -> None:
    whole = raw_query(f"x.{ZONE}", dns.rdatatype.A, edns=True)
    partial = whole[:-8]
    question = parse_query(partial)
    assert not question.edns
    assert len(ANSWERS.answer(partial, question, apex=False)) <= len(partial) + ANSWERS.growth
