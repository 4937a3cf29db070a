"""The SMTP listener over real sockets, driven by smtplib."""

import asyncio
import contextlib
import hashlib
import secrets
import smtplib
import socket
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from canaries.tokens import is_plausible
from listeners import smtp as smtp_module
from listeners.mailparse import inspect_message
from store import ledger
from support import ZONE, hits, plant_canary, run_smtp, settle, trusting

T = TypeVar("T")


async def blocking(function: Callable[[], T]) -> T:
    return await asyncio.to_thread(function)


def message(
    to: str, subject: str = "quarterly numbers", body: str = "see attached"
) -> EmailMessage:
    mail = EmailMessage(policy=SMTP_POLICY)
    mail["From"] = "agent@sandbox.internal"
    mail["To"] = to
    mail["Subject"] = subject
    mail.set_content(body)
    return mail


def send(
    port: int, to: str, mail: EmailMessage | None = None, **login: object
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("sandbox-7")
        return client.send_message(mail or message(to), "agent@sandbox.internal", [to])


def addressed(port: int, source: str, recipient: str) -> smtplib.SMTP:
    """A session from `source` (an address of 127/8) that has named `recipient`, ready for DATA."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))
    client.ehlo("x")
    client.mail("a@b.c")
    client.rcpt(recipient)
    return client


def in_data(port: int, source: str, recipient: str) -> tuple[smtplib.SMTP, int]:
    """`addressed`, then DATA: the session and DATA's reply code."""
    client = addressed(port, source, recipient)
    return client, client.docmd("DATA")[0]


async def test_local_part_and_domain_forms_fire(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    token = canary.token
    async with run_smtp(sqlite_engine) as node:
        assert await blocking(lambda: send(node.port, canary.value)) == {}
        assert await blocking(lambda: send(node.port, f"ceo@{token}.{ZONE}")) == {}
        assert await blocking(lambda: send(node.port, f"x@mx.{token.upper()}.{ZONE}")) == {}
    recorded = hits(sqlite_engine)
    assert [entry.evidence["rcpt"] for entry in recorded] == [
        canary.value,
        f"ceo@{token}.{ZONE}",
        f"x@mx.{token.upper()}.{ZONE}",
    ]
    assert {entry.canary_id for entry in recorded} == {canary.id}
    first = recorded[0]
    assert first.protocol == "smtp"
    assert first.evidence["trigger"] == "rcpt"
    assert first.evidence["mail_from"] == "agent@sandbox.internal"
    assert first.evidence["helo"] == "sandbox-7"
    assert first.evidence["tls"] is False
    assert first.source == "127.0.0.1"
    assert isinstance(first.source_port, int)
    assert first.source_port > 0


async def test_data_is_recorded_as_evidence_with_attachments(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    mail = message(canary.value, subject="=?utf-8?q?r=C3=A9sum=C3=A9?= <script>")
    mail.add_attachment(
        b"\x00secret bytes", maintype="application", subtype="octet-stream", filename="dump.bin"
    )
    async with run_smtp(sqlite_engine) as node:
        await blocking(lambda: send(node.port, canary.value, mail))
    [evidence] = hits(sqlite_engine, "evidence")
    [hit] = hits(sqlite_engine)
    data = evidence.evidence
    assert evidence.canary_id == canary.id
    assert data["hit_seq"] == hit.seq
    assert data["rcpt_tos"] == [canary.value]
    assert "<script>" in data["subject"]
    assert data["attachments"] == [
        {"name": "dump.bin", "size": 13, "sha256": hashlib.sha256(b"\x00secret bytes").hexdigest()}
    ]
    assert data["size"] > 0
    assert "quarterly" not in data["subject"]
    assert "see attached" in data["excerpt"]


async def test_unknown_and_foreign_recipients_are_refused(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine) as node:

        def session() -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
                client.ehlo("x")
                client.mail("spammer@example.org")
                for rcpt in (
                    f"nobody@{ZONE}",
                    f"{'a' * 26}@{ZONE}",
                    "victim@gmail.com",
                    f"ok@{ZONE}.evil.com",
                ):
                    codes.append(client.rcpt(rcpt)[0])
                codes.append(client.rcpt(canary.value)[0])
            return codes

        assert await blocking(session) == [550, 550, 550, 550, 250]
        counters = node.context.counters
        # The same meaning on every listener: `hits` are committed hits.
        assert (counters.received, counters.refused, counters.junk, counters.hits) == (5, 2, 2, 1)
    assert len(hits(sqlite_engine)) == 1


async def test_relay_attempt_is_denied(sqlite_engine: Engine) -> None:
    async with run_smtp(sqlite_engine) as node:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await blocking(lambda: send(node.port, "someone@example.com"))
        code, reply = refused.value.recipients["someone@example.com"]
        assert code == 550
        assert b"Relaying denied" in reply
    assert hits(sqlite_engine) == []


async def test_oversize_message_is_refused_with_552(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine, max_message_bytes=4096) as node:

        def oversize() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
                client.ehlo("x")
                assert client.has_extn("size")
                assert client.esmtp_features["size"] == "4096"
                client.mail("a@b.c")
                client.rcpt(canary.value)
                return client.data(message(canary.value, body="x" * 10_000).as_bytes())

        code, _ = await blocking(oversize)
        assert code == 552
    # The RCPT hit was still recorded.
    assert len(hits(sqlite_engine)) == 1


async def test_messages_in_flight_are_bounded_and_one_source_cannot_take_every_place(
    sqlite_engine: Engine,
) -> None:
    """Room for two messages of 4 KiB (each held twice): one source, or one network, gets one of
    them at a time."""
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(
        sqlite_engine, max_message_bytes=4096, max_buffered_bytes=16 * 1024
    ) as node:

        def stall_then_send() -> tuple[int, int, int, int]:
            def envelope(source: str) -> smtplib.SMTP:
                return addressed(node.port, source, canary.value)

            stalled = envelope("127.0.0.1")
            assert stalled.docmd("DATA")[0] == 354
            stalled.send(b"Subject: half a message\r\n")
            second = envelope("127.0.0.1")
            refused = second.docmd("DATA")[0]
            # Nor can its network: another address of the /24 is held to the same share.
            neighbour = envelope("127.0.0.2")
            assert neighbour.docmd("DATA")[0] == 452
            neighbour.close()
            other = envelope("127.0.1.9")
            other_code, _ = other.data(message(canary.value).as_bytes())
            stalled.send(b"\r\nbody\r\n.\r\n")
            finished = stalled.getreply()[0]
            retried = second.docmd("DATA")[0]
            for client in (stalled, second, other):
                client.close()
            return refused, other_code, finished, retried

        refused, other_code, finished, retried = await blocking(stall_then_send)
        assert (refused, other_code, finished, retried) == (452, 250, 250, 354)
    # Every RCPT was recorded, the refused DATA's included.
    assert len([h for h in hits(sqlite_engine) if h.evidence["trigger"] == "rcpt"]) == 4


async def test_a_sender_on_several_networks_cannot_hold_every_message_place(
    sqlite_engine: Engine,
) -> None:
    """Two places, one per network: a sender stalled in DATA from two /24s holds both, and a
    third network's message is refused only until the stalled ones are older than the grace."""
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(
        sqlite_engine, max_message_bytes=4096, max_buffered_bytes=16 * 1024, eviction_grace=0.5
    ) as node:

        def stall_two_networks_then_send() -> tuple[list[int], int, int, list[bool]]:
            stalled = [
                in_data(node.port, source, canary.value) for source in ("127.0.0.1", "127.0.1.1")
            ]
            for client, _ in stalled:
                client.send(b"Subject: half a message\r\n")
            early, early_code = in_data(node.port, "127.0.2.1", canary.value)
            early.close()
            time.sleep(0.8)
            late, _ = in_data(node.port, "127.0.2.1", canary.value)
            late.send(message(canary.value).as_bytes() + b"\r\n.\r\n")
            accepted = late.getreply()[0]
            late.close()
            # Each network holds one: one stalled message was stopped, and only one.
            stopped = []
            for client, _ in stalled:
                try:
                    client.send(b"\r\nbody\r\n.\r\n")
                    stopped.append(client.getreply()[0] != 250)
                except (OSError, smtplib.SMTPException):
                    stopped.append(True)
                client.close()
            return [code for _, code in stalled], early_code, accepted, stopped

        held, early, accepted, stopped = await blocking(stall_two_networks_then_send)
        assert held == [354, 354]
        assert early == 452
        assert accepted == 250
        assert sorted(stopped) == [False, True]
        places = node.context.messages
        assert places is not None
        assert places.refused["total"] == 1
        assert places.evicted["fair"] == 1
    # Every RCPT was recorded, the refused message's included.
    assert len([h for h in hits(sqlite_engine) if h.evidence["trigger"] == "rcpt"]) == 4


async def test_starting_messages_again_within_the_grace_does_not_keep_every_place(
    sqlite_engine: Engine,
) -> None:
    """A sender on two networks that starts a new message on each before the old one is
    older than the grace holds both places continuously: a third network still gets in."""
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(
        sqlite_engine, max_message_bytes=4096, max_buffered_bytes=16 * 1024, eviction_grace=0.5
    ) as node:

        def churn_then_send() -> tuple[list[int], int, int]:
            sources = ("127.0.0.1", "127.0.1.1")
            held = [in_data(node.port, source, canary.value) for source in sources]
            codes = [code for _, code in held]
            for _ in range(4):  # 1.2 s of places never older than 0.3 s
                time.sleep(0.3)
                for place, source in enumerate(sources):
                    held[place][0].close()
                    held[place] = in_data(node.port, source, canary.value)
                    codes.append(held[place][1])
            real, real_code = in_data(node.port, "127.0.2.1", canary.value)
            real.send(message(canary.value).as_bytes() + b"\r\n.\r\n")
            accepted = real.getreply()[0]
            for client in (real, *(client for client, _ in held)):
                client.close()
            return codes, real_code, accepted

        codes, real_code, accepted = await blocking(churn_then_send)
        assert codes == [354] * 10
        assert (real_code, accepted) == (354, 250)
        places = node.context.messages
        assert places is not None
        assert places.evicted["fair"] == 1


async def test_neither_a_refused_data_nor_any_newcomer_stops_a_message_already_received(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A place is taken only by a DATA aiosmtpd accepts, and once the final dot is in, the
    message keeps its place while it is parsed and recorded, however long that takes."""
    inspect = smtp_module._inspect

    def slow_inspect(*args: Any) -> Any:
        time.sleep(1.5)
        return inspect(*args)

    monkeypatch.setattr(smtp_module, "_inspect", slow_inspect)
    inbox = plant_canary(sqlite_engine, "email")
    secret = plant_canary(sqlite_engine, "credential", sandbox="sbx-2", fmt="env")
    async with run_smtp(
        sqlite_engine, max_message_bytes=4096, max_buffered_bytes=16 * 1024, eviction_grace=0.5
    ) as node:

        def client(source: str) -> smtplib.SMTP:
            return addressed(node.port, source, inbox.value)

        def send_while_others_push() -> tuple[int, list[int], int]:
            real = client("127.0.0.1")
            assert real.docmd("DATA")[0] == 354
            real.send(message(inbox.value, body=f"found:\n{secret.value}").as_bytes())
            real.send(b"\r\n.\r\n")
            # Parsing now. Another network takes the second place and stalls in it.
            stalled, refused, newcomer = (
                client(source) for source in ("127.0.1.1", "127.0.2.1", "127.0.3.1")
            )
            codes = [stalled.docmd("DATA")[0]]
            time.sleep(0.7)  # both places older than the grace, the stalled one heavy
            codes.append(refused.docmd("DATA", "x")[0])
            evicted_by_refused = sum(places.evicted.values())
            codes.append(newcomer.docmd("DATA")[0])
            finished = real.getreply()[0]
            for session in (real, stalled, refused, newcomer):
                session.close()
            return finished, codes, evicted_by_refused

        places = node.context.messages
        assert places is not None
        finished, codes, evicted_by_refused = await blocking(send_while_others_push)
        # The refused DATA took no place; the newcomer took the stalled message's, never the
        # one being parsed.
        assert codes == [354, 501, 354]
        assert evicted_by_refused == 0
        assert places.evicted == {"fair": 1}
        assert finished == 250
    assert {(h.canary_id, h.evidence["trigger"]) for h in hits(sqlite_engine)} >= {
        (secret.id, "leaked")
    }


async def test_timeout_is_silence_a_slow_message_and_its_parsing_are_not_cut_off(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    inspect = smtp_module._inspect

    def slow_inspect(*args: Any) -> Any:
        time.sleep(1.5)  # parsing behind others' messages, longer than the timeout
        return inspect(*args)

    monkeypatch.setattr(smtp_module, "_inspect", slow_inspect)
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine, timeout=1.0) as node:

        def trickle_then_wait() -> tuple[int, bool]:
            client = addressed(node.port, "127.0.0.1", canary.value)
            assert client.docmd("DATA")[0] == 354
            lines = message(canary.value).as_bytes().split(b"\n")
            for line in lines:  # 2 s or more in all, never 1 s of silence
                client.send(line + b"\n")
                time.sleep(0.3)
            client.send(b"\r\n.\r\n")
            accepted = client.getreply()[0]
            time.sleep(1.5)  # and after the message, silence counts again
            try:
                client.noop()
            except (OSError, smtplib.SMTPException):
                return accepted, True
            finally:
                client.close()
            return accepted, False

        accepted, cut_when_silent = await blocking(trickle_then_wait)
        assert accepted == 250
        assert cut_when_silent
    assert len(hits(sqlite_engine, "evidence")) == 1


async def test_a_token_inside_the_message_records_a_leaked_hit(sqlite_engine: Engine) -> None:
    inbox = plant_canary(sqlite_engine, "email")
    secret = plant_canary(sqlite_engine, "credential", sandbox="sbx-2", fmt="env")
    mail = message(inbox.value, body=f"found this:\n{secret.value}")
    async with run_smtp(sqlite_engine) as node:
        await blocking(lambda: send(node.port, inbox.value, mail))
    recorded = hits(sqlite_engine)
    assert [(e.canary_id, e.evidence["trigger"]) for e in recorded] == [
        (inbox.id, "rcpt"),
        (secret.id, "leaked"),
    ]
    assert recorded[1].sandbox == "sbx-2"
    assert recorded[1].evidence["subject"] == "quarterly numbers"


async def test_the_hit_exists_when_the_sender_quits_before_data(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine) as node:

        def rcpt_then_drop() -> None:
            client = smtplib.SMTP("127.0.0.1", node.port, timeout=10)
            client.ehlo("x")
            client.mail("a@b.c")
            assert client.rcpt(canary.value)[0] == 250
            assert len(hits(sqlite_engine)) == 1  # committed before the 250 arrived
            client.sock.close()  # no QUIT, no DATA

        await blocking(rcpt_then_drop)
    assert len(hits(sqlite_engine, "evidence")) == 0


async def test_connections_per_source_are_capped(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine, max_connections_per_source=2, eviction_grace=0) as node:

        def open_three() -> bytes:
            keep = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
            for sock in keep:
                assert sock.recv(100).startswith(b"220")
            # The newest connection wins: the third gets its session and the oldest is closed,
            # so a source that stalls sessions still leaves the hit it sends next.
            assert send(node.port, canary.value) == {}
            keep[0].settimeout(5)
            try:
                closed = keep[0].recv(100)
            except ConnectionResetError:
                closed = b""
            for sock in keep:
                sock.close()
            return closed

        assert await blocking(open_three) == b""
        guard = node.context.connections
        assert guard is not None
        assert guard.evicted["source"] >= 1
        assert guard.open <= 2
    assert len(hits(sqlite_engine)) == 1


async def test_idle_sessions_of_one_network_make_room_for_another(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(
        sqlite_engine, max_connections=6, max_connections_per_source=6, eviction_grace=0
    ) as node:

        def hog_then_send() -> tuple[dict[str, tuple[int, bytes]], bytes]:
            hogs = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(6)]
            for sock in hogs:
                assert sock.recv(100).startswith(b"220")
            with smtplib.SMTP(
                "127.0.0.1", node.port, timeout=10, source_address=("127.0.1.2", 0)
            ) as client:
                client.ehlo("sandbox-7")
                refused = client.send_message(
                    message(canary.value), "agent@sandbox.internal", [canary.value]
                )
            hogs[0].settimeout(5)
            # The oldest idle session was the one closed to make room.
            try:
                closed = hogs[0].recv(100)
            except ConnectionResetError:
                closed = b""
            for sock in hogs:
                sock.close()
            return refused, closed

        refused, closed = await blocking(hog_then_send)
        assert refused == {}
        assert closed == b""
        guard = node.context.connections
        assert guard is not None
        assert guard.evicted["fair"] == 1
    [hit] = hits(sqlite_engine)
    assert hit.source == "127.0.1.2"


async def test_floods_are_cut_off_and_do_not_stall_a_real_hit(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine, max_connections_per_source=20) as node:
        flood = b"\r\n" * 20_000 + b"\xff\xfe\r\n" * 5_000

        def flooder() -> bytes:
            with socket.create_connection(("127.0.0.1", node.port)) as sock:
                sock.settimeout(10)
                sock.recv(100)
                with contextlib.suppress(OSError):  # the server may hang up mid-flood
                    sock.sendall(flood)
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
                return received

        flooders = [asyncio.create_task(blocking(flooder)) for _ in range(4)]
        assert await asyncio.wait_for(blocking(lambda: send(node.port, canary.value)), 30) == {}
        for replies in await asyncio.gather(*flooders):
            assert b"421 4.7.0 Too many errors" in replies
            assert replies.count(b"500") < 20
        assert node.context.counters.malformed >= 4 * 10
        assert node.context.counters.dropped == 4
    assert len(hits(sqlite_engine)) == 1


async def test_a_silent_session_is_closed_and_counted(sqlite_engine: Engine) -> None:
    async with run_smtp(sqlite_engine, timeout=0.3) as node:

        def idle() -> bytes:
            with socket.create_connection(("127.0.0.1", node.port)) as sock:
                sock.settimeout(5)
                banner = sock.recv(100)
                assert banner.startswith(b"220")
                return sock.recv(100)

        assert await blocking(idle) == b""
        guard = node.context.connections
        assert guard is not None
        await settle(lambda: guard.open == 0)
        assert guard.timeouts["idle"] == 1


async def test_a_message_stuffed_with_token_shaped_words_costs_no_lookups(
    sqlite_engine: Engine,
) -> None:
    recipient = plant_canary(sqlite_engine, "email")
    leaked = plant_canary(sqlite_engine, "dns")
    async with run_smtp(sqlite_engine) as node:
        shaped = (secrets.token_hex(13)[:26].translate(_TO_BASE32) for _ in range(50_000))
        # Leave out the one in 65,536 that passes the key's check by chance.
        words = " ".join(w for w in shaped if not is_plausible(w, node.index.key))
        mail = message(recipient.value, body=f"{words}\nsee {leaked.value}\n")
        assert await blocking(lambda: send(node.port, recipient.value, mail)) == {}
        # 50,000 candidates, none plausible under the deployment's key: checked off the
        # loop, none asked of the store.
        assert node.index.store_lookups == 0
    assert {hit.canary_id for hit in hits(sqlite_engine)} == {recipient.id, leaked.id}


_TO_BASE32 = str.maketrans("0123456789", "abcdefghij")


class ByName(smtplib.SMTP):
    """smtplib naming `host` in TLS (as it does the host it connects to), connected to loopback."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout)


class ImplicitByName(smtplib.SMTP_SSL):
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", port), timeout)
        return self.context.wrap_socket(raw, server_hostname=host)


async def test_starttls_with_the_node_certificate_records_the_name_the_client_asked_for(
    engine: Engine,
) -> None:
    canary = plant_canary(engine, "email")
    async with run_smtp(engine) as node:

        def over_tls() -> None:
            with ByName(f"mail.{ZONE}", node.port, timeout=10) as client:
                client.ehlo("x")
                assert client.has_extn("starttls")
                client.starttls(context=trusting())
                client.ehlo("x")
                client.send_message(message(canary.value), "a@b.c", [canary.value])

        await blocking(over_tls)
    [hit] = hits(engine)
    assert hit.evidence["tls"] is True
    assert hit.evidence["sni"] == f"mail.{ZONE}"
    assert hit.evidence["tls_version"] in ("TLSv1.2", "TLSv1.3")
    [evidence] = hits(engine, "evidence")
    assert evidence.evidence["tls"] is True
    assert evidence.evidence["sni"] == f"mail.{ZONE}"


async def test_a_session_without_tls_says_so(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine) as node:
        assert await blocking(lambda: send(node.port, canary.value, message(canary.value))) == {}
    [hit] = hits(sqlite_engine)
    assert hit.evidence["tls"] is False
    assert "sni" not in hit.evidence


async def test_implicit_tls_takes_mail_and_catches_a_canary_in_the_client_hello(
    engine: Engine,
) -> None:
    recipient = plant_canary(engine, "email")
    named = plant_canary(engine, "dns")
    async with run_smtp(engine, tls_port=0) as node:
        plain, implicit = node.listener.addresses
        assert plain[1] != implicit[1]

        def send_named(server_name: str) -> None:
            with ImplicitByName(server_name, implicit[1], timeout=10, context=trusting()) as client:
                client.ehlo("x")
                # Already in TLS: no STARTTLS offered inside it.
                assert not client.has_extn("starttls")
                client.send_message(message(recipient.value), "a@b.c", [recipient.value])

        await blocking(lambda: send_named(f"mail.{ZONE}"))
        await blocking(lambda: send_named(named.value))
    mail_hits = [hit for hit in hits(engine) if hit.protocol == "smtp"]
    assert [hit.canary_id for hit in mail_hits] == [recipient.id, recipient.id]
    assert [hit.evidence["sni"] for hit in mail_hits] == [f"mail.{ZONE}", named.value]
    assert all(hit.evidence["tls"] is True for hit in mail_hits)
    # The ClientHello naming a canary is a hit of its own, before any certificate is seen.
    [tls_hit] = [hit for hit in hits(engine) if hit.protocol == "tls"]
    assert tls_hit.canary_id == named.id
    assert tls_hit.evidence["sni"] == named.value


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_inspecting_any_bytes_never_raises(raw: bytes) -> None:
    details = inspect_message(raw)
    assert details.size == len(raw)
    assert len(details.excerpt) <= 4096


@settings(max_examples=100)
@given(
    st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=200),
    st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=50),
)
def test_inspecting_a_message_finds_its_text(body: str, filename: str) -> None:
    mail = EmailMessage()
    mail["Subject"] = "s"
    mail.set_content(body)
    mail.add_attachment(
        b"attached", maintype="application", subtype="octet-stream", filename=filename or "f"
    )
    details = inspect_message(mail.as_bytes())
    assert details.parsed
    assert body.strip() in details.text
    assert len(details.attachments) == 1


async def test_undecodable_bytes_in_the_envelope_are_still_recorded(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "email")
    async with run_smtp(sqlite_engine) as node:

        def session() -> list[bytes]:
            replies = []
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
                stream = sock.makefile("rb")
                replies.append(stream.readline())
                for line in (
                    b"HELO h\xffst",
                    b"MAIL FROM:<a\xfe@x.example>",
                    b"RCPT TO:<" + canary.value.encode() + b">",
                ):
                    sock.sendall(line + b"\r\n")
                    replies.append(stream.readline())
                sock.sendall(b"QUIT\r\n")
            return replies

        replies = await blocking(session)
        assert replies[-1].startswith(b"250")
    [hit] = hits(sqlite_engine)
    assert hit.evidence["helo"] == "h\udcffst"
    with sqlite_engine.connect() as connection:
        assert ledger.verify(connection).intact


def sessions_waiting() -> int:
    """SMTP sessions of this loop still waiting for a command."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("_handle_client")
    )


async def test_a_starttls_that_never_completes_ends_its_session_and_frees_its_slot(
    engine: Engine,
) -> None:
    """STARTTLS, then silence or half a ClientHello: asyncio's TLS layer never tells the session
    the connection went, so without ending it the session would wait for ever."""
    async with run_smtp(engine, timeout=0.5) as node:
        guard = node.context.connections
        assert guard is not None
        stalled = []
        for partial in (b"", b"\x16\x03\x01\x00"):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            await reader.readline()
            writer.write(b"EHLO x\r\nSTARTTLS\r\n")
            while not (await reader.readline()).startswith(b"220 "):
                pass
            writer.write(partial)
            stalled.append(writer)
        await settle(lambda: guard.open == 2)
        await settle(lambda: guard.open == 0, 5)
        assert guard.open == 0
        await settle(lambda: sessions_waiting() == 0, 5)
        assert sessions_waiting() == 0
        for writer in stalled:
            writer.close()


async def test_starttls_inside_tls_is_refused(engine: Engine) -> None:
    async with run_smtp(engine) as node:

        def twice() -> tuple[int, bytes]:
            with ByName(f"mail.{ZONE}", node.port, timeout=10) as client:
                client.ehlo("x")
                client.starttls(context=trusting())
                client.ehlo("x")
                return client.docmd("STARTTLS")

        code, reply = await blocking(twice)
    assert code == 503
    assert b"TLS already active" in reply
