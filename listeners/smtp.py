"""The SMTP listener (aiosmtpd): canary recipients are hits, recorded at RCPT, enriched at DATA.

It accepts mail only for recipients in its own domains that carry a known
token, so it is never an open relay. A sender may hang up after RCPT, so the
hit is committed before RCPT is answered; DATA is answered only after the
message's evidence, and a `leaked` hit for every other canary token found
inside it, are committed too.
"""

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import Field

from canaries.find import in_address, in_domains, scan, split_name
from canaries.index import Unknowable
from canaries.model import Canary
from listeners.base import Context, DnsName, NotDurable, Peer, Port, format_peer
from listeners.certificates import Contexts
from listeners.guard import (
    BACKLOG,
    ConnectionGuard,
    Seconds,
    Slot,
    StreamOptions,
    listening_socket,
)
from listeners.mailparse import MailDetails, inspect_message
from listeners.tls import TlsFront
from store.ledger import Entry, Event

log = logging.getLogger(__name__)

MAX_PROTOCOL_ERRORS = 10
MAX_REJECTED_RECIPIENTS = 20
MAX_SCANNED_CHARS = 4 * 1024 * 1024
# Canary tokens looked up per message: a message stuffed with tokens gets no more store work.
MAX_LEAKED = 1000
# One message parsed at a time, beside (not in) the pool that store work uses.
_PARSING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mail-parse")
_ERROR_CODES = ("500", "501", "502", "503", "504")


class SmtpOptions(StreamOptions):
    """`[smtp]`: how it binds, which domains it serves (default: the zone), and its limits.

    `timeout` is aiosmtpd's: how long a session may stay silent.
    """

    port: Port = 2525
    domains: list[DnsName] = Field(default_factory=list)
    max_message_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 10 * 1024 * 1024
    # What messages being received may hold in all. A message in DATA holds twice its
    # max_message_bytes (aiosmtpd joins its lines into a copy), so this many bytes let
    # max_buffered_bytes // (2 x max_message_bytes) sessions be in DATA at once (at least one).
    max_buffered_bytes: Annotated[int, Field(ge=4096, le=16 * 1024**3)] = 128 * 1024 * 1024
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 64
    max_connections_per_source: Annotated[int, Field(ge=1, le=65536)] = 10
    timeout: Seconds = 30.0
    # A mail client pauses for DNS, TLS and its own queue between commands.
    eviction_grace: Annotated[float, Field(ge=0, le=60)] = 10.0
    # Implicit TLS (465 in production), with the node's certificate; STARTTLS is always offered.
    tls_port: Port | None = None


class CanaryHandler:
    """The aiosmtpd handler: RCPT and DATA turn the envelope into hits, nothing else."""

    def __init__(
        self,
        context: Context,
        domains: tuple[tuple[str, ...], ...],
        tls: Contexts | None,
    ) -> None:
        self._context = context
        self._domains = domains
        self._tls_contexts = tls

    def _tls(self, session: Session) -> dict[str, Any]:
        """Whether the session is in TLS (STARTTLS or implicit), and the server name it asked."""
        ssl_object = (session.ssl or {}).get("ssl_object")
        if self._tls_contexts is None or ssl_object is None:
            return {"tls": False}
        return self._tls_contexts.facts(ssl_object)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        counters = self._context.counters
        counters.received += 1
        domain = address.rpartition("@")[2]
        if not in_domains(domain, self._domains):
            counters.refused += 1
            return "550 5.7.1 Relaying denied"
        canary = None
        for zone in self._domains:
            match = in_address(address, zone)
            if match is not None:
                try:
                    canary = await self._context.index.lookup(match.candidate, _peer(session)[0])
                except Unknowable:
                    counters.record_failures += 1
                    return "451 4.3.0 Try again later"
                if canary is not None:
                    break
        if canary is None:
            counters.junk += 1
            return "550 5.1.1 Mailbox unavailable"
        evidence = {
            "trigger": "rcpt",
            "rcpt": address,
            "mail_from": envelope.mail_from,
            "helo": session.host_name,
            **self._tls(session),
        }
        try:
            [entry] = await self._context.record(self._hit(canary, session, evidence))
        except NotDurable:
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        _hits(envelope).append((canary, entry))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(server, GuardedSMTP):
            server.message_received()
        raw = envelope.original_content or b""
        index = self._context.index
        recipients = {canary.token for canary, _ in _hits(envelope)}

        def worth_asking(token: str) -> bool:
            return token not in recipients and index.worth_asking(token)

        # Parsing and scanning a large message is slow work: keep it off the listeners' loop,
        # on a thread of its own, so store work in the shared pool never queues behind it.
        details, found = await asyncio.get_running_loop().run_in_executor(
            _PARSING, _inspect, raw, worth_asking
        )
        leaked = []
        for token in sorted(found):
            try:
                canary = await index.lookup(token, _peer(session)[0])
            except Unknowable:
                self._context.counters.record_failures += 1
                return "451 4.3.0 Try again later"
            if canary is not None:
                leaked.append(
                    self._hit(
                        canary,
                        session,
                        {"trigger": "leaked", "subject": details.subject, "sha256": details.sha256},
                    )
                )
        events = [*self._evidence(session, envelope, details), *leaked]
        try:
            await self._context.record(*events)
        except NotDurable:
            return "451 4.3.0 Try again later"
        return "250 2.0.0 OK"

    def _hit(self, canary: Canary, session: Session, evidence: dict[str, Any]) -> Event:
        return self._context.hit(canary, "smtp", _peer(session), evidence)

    def _evidence(self, session: Session, envelope: Envelope, details: MailDetails) -> list[Event]:
        """One evidence event per canary whose address received the message."""
        events = []
        seen = set()
        for canary, entry in _hits(envelope):
            if canary.id in seen:
                continue
            seen.add(canary.id)
            events.append(
                self._context.observation(
                    "evidence",
                    canary,
                    "smtp",
                    _peer(session),
                    {
                        "hit_seq": entry.seq,
                        "mail_from": envelope.mail_from,
                        "rcpt_tos": list(envelope.rcpt_tos),
                        "helo": session.host_name,
                        **self._tls(session),
                        "subject": details.subject,
                        "headers": details.headers,
                        "size": details.size,
                        "sha256": details.sha256,
                        "attachments": [
                            {"name": a.name, "size": a.size, "sha256": a.sha256}
                            for a in details.attachments
                        ],
                        "excerpt": details.excerpt,
                        "parsed": details.parsed,
                    },
                )
            )
        return events


def _inspect(raw: bytes, worth_asking: Callable[[str], bool]) -> tuple[MailDetails, set[str]]:
    """The message's details, and the tokens in it that may be canaries (at most MAX_LEAKED)."""
    details = inspect_message(raw)
    found = {token for token in scan(details.text[:MAX_SCANNED_CHARS]) if worth_asking(token)}
    return details, set(sorted(found)[:MAX_LEAKED])


class CanaryEnvelope(Envelope):
    """An envelope that also carries the hits its recipients recorded at RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[Canary, Entry]] = []


def _hits(envelope: Envelope) -> list[tuple[Canary, Entry]]:
    assert isinstance(envelope, CanaryEnvelope)
    return envelope.hits


def _peer(session: Session | None) -> Peer:
    # aiosmtpd types the peer as a string, but it is the socket's address tuple.
    peer: Any = None if session is None else session.peer
    return peer if isinstance(peer, tuple) else (str(peer), 0)


# How long a network's use of message places is remembered (its weight halves in ~40 s),
# and for how many networks at most.
USAGE_DECAY_SECONDS = 60.0
USAGE_NETWORKS = 4096


class MessagePlaces(ConnectionGuard):
    """The messages that may be received at once, shared as connections are, and over time.

    Each holds twice `max_message_bytes`, so `max_buffered_bytes` bounds how
    many; one source, or one network, holds half of them at most. A place is
    never touched, so its age is how long its message has been arriving, and
    once the final dot is in it is pinned (see `GuardedSMTP.message_received`).

    At the cap, the network that has held places longest lately (place-seconds,
    decaying over USAGE_DECAY_SECONDS) yields its oldest message to a newcomer
    whose network has held them at least `eviction_grace` place-seconds less:
    a sender that keeps every place busy by starting each message again before
    the grace runs out, from a few networks, still gives way to one that has
    not (rotating through dozens of networks, about 48 with the defaults, it
    keeps them: each message it starts is a recorded RCPT hit). Then the connection rules: the busiest network's,
    or the oldest, message older than the grace. A stopped message's recipients'
    hits are recorded already, and a real sender retries.
    """

    def __init__(self, total: int, share: int, grace: float) -> None:
        super().__init__(total, share, grace, per_network=share)
        # Place-seconds of released places per network, decayed as of when they were noted.
        self._used: dict[str, tuple[float, float]] = {}
        self._stopping: Slot | None = None

    @classmethod
    def of_smtp(cls, options: SmtpOptions) -> "MessagePlaces":
        total = max(1, options.max_buffered_bytes // (2 * options.max_message_bytes))
        return cls(total, max(1, total // 2), options.eviction_grace)

    def usage(self, network: str, now: float) -> float:
        """Place-seconds `network` has held lately, its places held now included; a place
        counts until its message is in (parsing it is this node's time, not the sender's)."""
        held = self._networks.get(network, {})
        return self._decayed(network, now) + sum(_held_for(slot, now) for slot in held)

    def release(self, slot: Slot) -> None:
        # A stopped message is not counted against its network: its sender may retry as soon
        # as it would have, and a heavy network that was made to yield is light again.
        if slot in self._all and slot is not self._stopping:
            now = time.monotonic()
            used = self._decayed(slot.network, now) + _held_for(slot, now)
            self._used[slot.network] = (used, now)
            if len(self._used) > USAGE_NETWORKS:
                # Forget the networks that held least: they would be the last to yield anyway.
                ranked = sorted(self._used.items(), key=lambda item: self._decayed(item[0], now))
                self._used = dict(ranked[len(ranked) // 2 :])
        super().release(slot)

    def _decayed(self, network: str, now: float) -> float:
        used, noted = self._used.get(network, (0.0, now))
        return used * math.exp((noted - now) / USAGE_DECAY_SECONDS)

    def _close(self, slot: Slot, reason: str) -> None:
        self._stopping = slot
        try:
            super()._close(slot, reason)
        finally:
            self._stopping = None

    def _make_room(self, network: str, now: float) -> bool:
        enough = self.usage(network, now) + self.grace
        heaviest: dict[Slot, None] | None = None
        for other, held in self._networks.items():
            if other != network and next(iter(held)).active != math.inf:
                used = self.usage(other, now)
                if used >= enough:
                    heaviest, enough = held, used
        if heaviest is not None:
            self._close(next(iter(heaviest)), "fair")
            return True
        return super()._make_room(network, now)


def _held_for(slot: Slot, now: float) -> float:
    return min(now, slot.pinned) - slot.opened


class GuardedSMTP(SMTP):
    """aiosmtpd's SMTP with the limits it lacks: the listener's connection bounds, and error floods.

    aiosmtpd does not count empty or non-ASCII lines toward its bogus-command
    limit, and answers a buffered flood of them without yielding, stalling
    every other session. Here every reply yields to the loop, and a session
    that draws too many syntax errors or rejected recipients is closed. DATA
    takes one of the listener's `MessagePlaces`, so the memory messages hold
    is bounded whatever the number of sessions.
    """

    def __init__(
        self,
        *args: Any,
        guard: ConnectionGuard,
        places: ConnectionGuard,
        context: Context,
        slot: Slot | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._counters = context.counters
        self._guard = guard
        self._places = places
        self._place: Slot | None = None
        self._step = float(kwargs.get("timeout", 30.0))
        # Admitted before, when the connection came in through TLS.
        self._slot = slot
        self._errors = 0
        self._rejected = 0
        self._closing = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection, not the STARTTLS upgrade of one
            assert isinstance(transport, asyncio.Transport)
            if self._slot is not None:
                self._slot.close = self._end
            else:
                self._slot = self._guard.admit(
                    str(transport.get_extra_info("peername")[0]), self._end
                )
            if self._slot is None:
                self._counters.dropped += 1
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
                transport.close()
                return
        super().connection_made(transport)
        assert self.session is not None
        if self.session.ssl is None and transport.get_extra_info("ssl_object") is not None:
            # Implicit TLS: as secure as a STARTTLS session, which aiosmtpd alone marks.
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}

    def data_received(self, data: bytes) -> None:
        if self._slot is not None:
            self._slot.touch()
        if self._place is not None and self._place.pinned == math.inf:
            # `timeout` is seconds of silence; aiosmtpd counts it from the command, which
            # would cut off a message still arriving.
            self._reset_timeout()
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        if self._slot is None or self._lost:
            return  # refused in connection_made (aiosmtpd never started a session), or ended
        self._lost = True
        self._slot.release()
        super().connection_lost(error)

    def _end(self) -> None:
        """Abort the connection and end the session now. Mid-STARTTLS, asyncio's TLS layer
        does not pass a lost connection on to this protocol: without this, the session would
        wait for a line for ever."""
        for transport in (self._original_transport, self.transport):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self.connection_lost(None)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # aiosmtpd would start TLS inside TLS, a handshake's cost each time, for ever.
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        if self._tls_protocol is not None and self.session is not None and self.session.ssl is None:
            # The handshake ended without completing: closed for the idle timeout (counted
            # there) or cut off.
            self._end()

    async def smtp_DATA(self, arg: str) -> None:
        if arg or self.session is None or not self.session.host_name or not self._rcpt_tos():
            await super().smtp_DATA(arg)  # refused by aiosmtpd before anything is read
            return
        place = self._place = self._places.admit(_peer(self.session)[0], self._stop_message)
        if place is None:
            # The recipients' hits are recorded already; a real sender retries a 4xx later.
            self._counters.refused += 1
            log.warning(
                "%s DATA refused: messages being received hold max_buffered_bytes",
                format_peer(_peer(self.session)),
            )
            await self.push("452 4.3.1 Insufficient system storage, try again later")
            return
        try:
            await super().smtp_DATA(arg)
        finally:
            self._place = None
            place.release()
            handle = self._timeout_handle
            if self.transport is not None and handle is not None and handle.cancelled():
                self._reset_timeout()  # after the message: silence counts again

    def _rcpt_tos(self) -> bool:
        return self.envelope is not None and bool(self.envelope.rcpt_tos)

    def message_received(self) -> None:
        """The whole message is in: from now on its place is not taken for a newcomer (its
        sender did its part; what remains is parsing and recording it)."""
        if self._place is not None:
            self._place.pin()
            # Nor does the idle timeout run while this node parses and records it.
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()

    def _stop_message(self) -> None:
        """Stopped for a newcomer (see `MessagePlaces`): say so if the client still listens."""
        log.warning(
            "%s message stopped mid-DATA: it took longer than eviction_grace and another "
            "sender needed its place",
            format_peer(_peer(self.session)),
        )
        if isinstance(self.transport, asyncio.Transport):
            self.transport.write(b"421 4.3.2 Message stopped for another sender, try again\r\n")
        self._end()

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timeout (it closes the transport), counted and bounded."""
        transport = self.transport
        if not isinstance(transport, asyncio.Transport):
            return
        self._guard.timeouts["idle"] += 1
        transport.close()
        # close() waits for unsent replies; a client that stopped reading gets a step more.
        asyncio.get_running_loop().call_later(self._step, self._end)

    def _create_envelope(self) -> Envelope:
        return CanaryEnvelope()

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        code = status[:3].decode() if isinstance(status, bytes) else status[:3]
        if code in _ERROR_CODES:
            self._errors += 1
            self._counters.malformed += 1
        elif code == "550":
            self._rejected += 1
        over = self._errors >= MAX_PROTOCOL_ERRORS or self._rejected >= MAX_REJECTED_RECIPIENTS
        if over and not self._closing and self.transport is not None:
            self._closing = True
            self._counters.dropped += 1
            log.warning("%s too many errors; closing", format_peer(_peer(self.session)))
            await super().push("421 4.7.0 Too many errors, closing connection")
            self.transport.close()
        # Yield after every reply, so one client's buffered flood cannot starve other sessions.
        await asyncio.sleep(0)


class SmtpListener:
    """Receives mail for the zone and its names; never relays.

    STARTTLS is offered with the node's certificate, and `tls_port` takes implicit
    TLS through the same ClientHello catcher as `[https]`; the name a client asked
    for in TLS (SNI) is part of every hit's evidence.
    """

    name = "smtp"

    def __init__(self, context: Context, options: SmtpOptions) -> None:
        self._context = context
        self._options = options
        domains = options.domains or [context.zone]
        self._tls = None if context.tls is None else context.tls.contexts(names=True)
        self._handler = CanaryHandler(
            context, tuple(split_name(domain) for domain in domains), self._tls
        )
        context.connections = self._guard = ConnectionGuard.of(options)
        context.messages = self._places = MessagePlaces.of_smtp(options)
        self._front: TlsFront | None = None
        if options.tls_port is not None and self._tls is not None:
            implicit = options.model_copy(update={"port": options.tls_port})
            self._front = TlsFront(
                context, implicit, self._guard, self._tls, lambda slot: self._session(slot)
            )
        self._server: asyncio.Server | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The plaintext port first (the heartbeat's), then the implicit-TLS one."""
        if self._server is None:
            return []
        host, port = self._server.sockets[0].getsockname()[:2]
        return [(host, port), *(self._front.addresses if self._front else [])]

    def _session(self, slot: Slot | None = None) -> GuardedSMTP:
        return GuardedSMTP(
            self._handler,
            guard=self._guard,
            places=self._places,
            context=self._context,
            slot=slot,
            hostname=f"mail.{self._context.zone}",
            ident="ESMTP",
            data_size_limit=self._options.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self._options.timeout,
            # NOOP, RSET, VRFY and friends cost a reply each and carry nothing.
            command_call_limit={"NOOP": 10, "RSET": 20, "VRFY": 5, "EXPN": 5, "HELP": 5, "*": 200},
            # No STARTTLS inside implicit TLS.
            tls_context=self._tls.current if self._tls is not None and slot is None else None,
            require_starttls=False,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._session, sock=listening_socket(self._options), backlog=BACKLOG
        )
        if self._front is not None:
            await self._front.start()

    async def stop(self) -> None:
        if self._front is not None:
            await self._front.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
