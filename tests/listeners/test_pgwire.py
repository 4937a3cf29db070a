"""The PostgreSQL protocol reader: what libpq sends, checked by hand, and hostile bytes."""

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listeners import pgwire


def test_a_startup_message_is_read_back_with_its_parameters() -> None:
    packet = pgwire.startup_message(
        {"user": "app_rw", "database": "app_production", "application_name": "psql"}
    )
    body = packet[4:]
    assert pgwire.packet_length(packet[:4]) == len(body)
    startup = pgwire.opening(body)
    assert isinstance(startup, pgwire.Startup)
    assert (startup.major, startup.minor) == (3, 0)
    assert startup.user == "app_rw"
    assert startup.database == "app_production"
    assert startup.parameters["application_name"] == "psql"


def test_without_a_database_it_is_named_like_the_user() -> None:
    startup = pgwire.opening(pgwire.startup_message({"user": "deploy"})[4:])
    assert isinstance(startup, pgwire.Startup)
    assert startup.database == "deploy"


@pytest.mark.parametrize(
    ("code", "rest", "kind"),
    [
        (80877103, b"", pgwire.SslRequest),
        (80877104, b"", pgwire.GssRequest),
        (80877102, b"\x00" * 8, pgwire.CancelRequest),
    ],
)
def test_encryption_and_cancel_requests(code: int, rest: bytes, kind: type) -> None:
    assert isinstance(pgwire.opening(struct.pack("!i", code) + rest), kind)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (struct.pack("!i", 2 << 16) + b"\x00", "unsupported frontend protocol 2.0"),
        (struct.pack("!i", 3 << 16) + b"user\x00x", "not terminated"),
        (struct.pack("!i", 3 << 16) + b"user\x00\x00", "no value"),
        (struct.pack("!i", 3 << 16) + b"\x00x\x00\x00", "no name"),
        (b"\x00\x00", "at least its code"),
    ],
)
def test_malformed_startups_say_why(body: bytes, problem: str) -> None:
    with pytest.raises(pgwire.Malformed, match=problem):
        pgwire.opening(body)


def test_lengths_outside_the_bounds_are_refused() -> None:
    for length in (0, 7, pgwire.MAX_STARTUP_BYTES + 1, -1):
        with pytest.raises(pgwire.Malformed):
            pgwire.packet_length(struct.pack("!i", length))
    with pytest.raises(pgwire.Malformed):
        pgwire.message_header(b"p" + struct.pack("!i", pgwire.MAX_MESSAGE_BYTES + 5))
    assert pgwire.message_header(b"p" + struct.pack("!i", 9)) == (b"p", 5)


def test_a_password_and_a_scram_first_message() -> None:
    assert pgwire.password(b"s3cret\x00") == "s3cret"
    with pytest.raises(pgwire.Malformed):
        pgwire.password(b"two\x00words\x00")
    data = b"n,,n=alice,r=abcdef"
    first = pgwire.sasl_initial(b"SCRAM-SHA-256\x00" + struct.pack("!i", len(data)) + data)
    assert first.mechanism == "SCRAM-SHA-256"
    assert first.username == "alice"
    with pytest.raises(pgwire.Malformed, match="not the length"):
        pgwire.sasl_initial(b"SCRAM-SHA-256\x00" + struct.pack("!i", 99) + data)


def test_the_server_messages_are_framed_as_the_protocol_says() -> None:
    assert pgwire.auth_cleartext() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    sasl = pgwire.auth_sasl("SCRAM-SHA-256")
    assert sasl[:1] == b"R"
    assert struct.unpack("!i", sasl[1:5])[0] == len(sasl) - 1
    assert sasl.endswith(b"SCRAM-SHA-256\x00\x00")
    failed = pgwire.error("28P01", "password authentication failed")
    assert failed[:1] == b"E"
    assert struct.unpack("!i", failed[1:5])[0] == len(failed) - 1
    assert b"C28P01\x00" in failed
    assert failed.endswith(b"\x00\x00")


@given(st.binary(max_size=600))
def test_any_bytes_are_a_packet_or_malformed(data: bytes) -> None:
    for read in (
        lambda: pgwire.packet_length(data[:4]),
        lambda: pgwire.opening(data),
        lambda: pgwire.message_header(data[:5]),
        lambda: pgwire.password(data),
        lambda: pgwire.sasl_initial(data).username,
    ):
        with contextlib.suppress(pgwire.Malformed):
            read()


@given(
    st.dictionaries(
        st.text(
            st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
            min_size=1,
            max_size=20,
        ),
        st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40),
        max_size=10,
    ),
    st.integers(min_value=0, max_value=200),
    st.binary(min_size=1, max_size=4),
)
def test_mutated_startups_never_raise_anything_else(
    parameters: dict[str, str], at: int, junk: bytes
) -> None:
    body = pgwire.startup_message(parameters)[4:]
    assert pgwire.opening(body) == pgwire.Startup(3, 0, parameters)
    mutated = body[:at] + junk + body[at + len(junk) :]
    with contextlib.suppress(pgwire.Malformed):
        pgwire.opening(mutated)
