"""The authoritative DNS listener: UDP and TCP, record-then-answer for canary names.

UDP is read straight off a non-blocking socket by a loop reader that drains
up to a batch of datagrams per wake-up, instead of asyncio's datagram
transport, which returns to the selector after every packet. A query for a
known token is answered only from the ledger writer's commit callback;
everything else is answered at once from templates.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated

from dnslib import QTYPE, RR, TXT, DNSError, DNSRecord
from pydantic import Field, field_validator, model_validator

from canaries.find import APEX, locate, split_name
from canaries.index import Unknowable
from canaries.model import Canary
from canaries.tokens import TOKEN_LENGTH, decode_exfil, is_plausible
from listeners.base import Context, DnsName, Port, format_peer
from listeners.certificates import ACME_LABEL
from listeners.dnswire import (
    CLASS_ANY,
    CLASS_IN,
    OPCODE_MASK,
    MalformedQuery,
    Question,
    ZoneAnswers,
    format_error,
    name_text,
    not_implemented,
    parse_query,
    refuse,
    server_failure,
)
from listeners.guard import (
    BACKLOG,
    ConnectionGuard,
    Slot,
    StreamOptions,
    dual_stack,
    family_of,
    listening_socket,
)

log = logging.getLogger(__name__)

Peer = tuple[str, int]
# A reply to send, or None when a query will get none (so a TCP session stops waiting for it).
Send = Callable[[bytes | None, Peer], None]

_DRAIN = 64
_MAX_DATAGRAM = 4096
_RECEIVE_BUFFER = 4 * 1024 * 1024
# Queries one TCP session may have waiting for their commit before it reads the next.
_TCP_IN_FLIGHT = 8
# Kernel send buffer of a TCP session: room for a few answers of the largest size.
_TCP_SEND_BUFFER = 64 * 1024
# Frames shorter than a DNS header a session may send before it is closed.
_HEADER_BYTES = 12
_TCP_MAX_RUNTS = 10


class DnsOptions(StreamOptions):
    """`[dns]`: the zone it is authoritative for, how it binds, and what every name answers.

    The connection bounds apply to DNS over TCP; `timeout` bounds a silent
    session, a frame that arrives slowly and a reply the client does not read.
    """

    zone: DnsName = "canary.example.test"
    port: Port = 5353
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 256
    # Few records per answer keep every answer small: no amplification.
    answer_ipv4: Annotated[list[IPv4Address], Field(max_length=4)] = Field(
        default_factory=lambda: [IPv4Address("127.0.0.1")]
    )
    answer_ipv6: Annotated[list[IPv6Address], Field(max_length=4)] = Field(default_factory=list)
    ttl: Annotated[int, Field(ge=0, le=86400)] = 0
    nameservers: Annotated[list[DnsName], Field(max_length=2)] = Field(default_factory=list)

    @field_validator("zone")
    @classmethod
    def _room_for_tokens(cls, zone: str) -> str:
        # Room for "<token>." plus a few labels of exfiltrated data on the left.
        if len(zone) + TOKEN_LENGTH + 1 > 200:
            raise ValueError(f"{zone!r} is too long to leave room for tokens under it")
        return zone

    @model_validator(mode="after")
    def _no_amplification(self) -> "DnsOptions":
        self.answers()
        return self

    def answers(self) -> ZoneAnswers:
        """The zone's answer templates; ValueError if they would grow a query too much."""
        return ZoneAnswers(
            self.zone,
            [str(address) for address in self.answer_ipv4],
            [str(address) for address in self.answer_ipv6],
            self.ttl,
            list(self.nameservers) or [f"ns1.{self.zone}"],
        )


class DnsListener:
    """Authoritative for one zone; every name under it exists; each token query is a hit."""

    name = "dns"

    def __init__(self, context: Context, options: DnsOptions) -> None:
        self._context = context
        self._options = options
        self._zone = split_name(options.zone)
        self._answers = options.answers()
        self._udp: socket.socket | None = None
        self._tcp: asyncio.Server | None = None
        context.connections = self._guard = ConnectionGuard.of(options)
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._udp is None:
            return []
        host, port = self._udp.getsockname()[:2]
        return [(host, port)]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # With port 0 the UDP port is picked first, then TCP must get the same one.
        for _ in range(20):
            udp = socket.socket(family_of(self._options.listen), socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            dual_stack(udp)
            udp.setblocking(False)
            udp.bind((self._options.listen, self._options.port))
            port = udp.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(
                    self._tcp_client, sock=listening_socket(self._options, port), backlog=BACKLOG
                )
            except OSError:
                udp.close()
                if self._options.port:
                    raise
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        self._udp = udp
        loop.add_reader(udp.fileno(), self._readable)

    async def stop(self) -> None:
        if self._udp is not None:
            asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        for task in list(self._pending):
            task.cancel()

    def _readable(self) -> None:
        udp = self._udp
        if udp is None:
            return
        for _ in range(_DRAIN):
            try:
                packet, peer = udp.recvfrom(_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                # ICMP errors from earlier sends surface here; they say nothing about this socket.
                continue
            self.respond(packet, peer, self._send_udp, "udp")

    def _send_udp(self, reply: bytes | None, peer: Peer) -> None:
        if reply is None or self._udp is None:
            return
        try:
            self._udp.sendto(reply, peer)
        except OSError:
            # A full socket buffer under flood: UDP may drop, the client retries.
            self._context.counters.dropped += 1

    def respond(self, packet: bytes, peer: Peer, send: Send, transport: str) -> None:
        """Answer one query through `send`, recording it first if it names a canary."""
        counters = self._context.counters
        counters.received += 1
        try:
            question = parse_query(packet)
        except MalformedQuery as error:
            counters.malformed += 1
            log.debug("%s malformed query: %s", format_peer(peer), error)
            send(format_error(packet) if error.answerable else None, peer)
            return
        if question.flags & OPCODE_MASK:
            counters.refused += 1
            send(not_implemented(packet, question), peer)
            return
        labels = tuple([label.decode("latin-1").lower() for label in question.labels])
        match = locate(labels, self._zone) if question.qclass in (CLASS_IN, CLASS_ANY) else None
        if match is None:
            counters.refused += 1
            send(refuse(packet, question), peer)
            return
        if match.candidate == ACME_LABEL and not match.left and self._challenged(question):
            send(self._challenge(packet), peer)
            return
        reply = self._answers.answer(packet, question, apex=match is APEX)
        if match is APEX:
            send(reply, peer)
            return
        canary = self._context.index.get(match.candidate)
        if canary is not None:
            self._record(canary, question, match.left, peer, transport, reply, send)
        elif is_plausible(match.candidate, self._context.index.key):
            # Well formed but not in memory: perhaps minted a moment ago; ask the store first.
            task = asyncio.ensure_future(
                self._respond_late(
                    packet, question, match.candidate, match.left, peer, transport, reply, send
                )
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            counters.junk += 1
            send(reply, peer)

    def _challenged(self, question: Question) -> bool:
        challenges = self._context.challenges
        return (
            challenges is not None
            and bool(challenges.values)
            and question.qtype in (QTYPE.TXT, QTYPE.ANY)
        )

    def _challenge(self, packet: bytes) -> bytes | None:
        """The pending ACME order's DNS-01 values, as TXT records (rare: dnslib builds them)."""
        assert self._context.challenges is not None
        try:
            query = DNSRecord.parse(packet)
        except DNSError:
            return None
        reply = query.reply(aa=1)
        for value in self._context.challenges.values:
            reply.add_answer(RR(query.q.qname, QTYPE.TXT, rdata=TXT(value), ttl=0))
        return bytes(reply.pack())

    async def _respond_late(
        self,
        packet: bytes,
        question: Question,
        candidate: str,
        left: tuple[str, ...],
        peer: Peer,
        transport: str,
        reply: bytes,
        send: Send,
    ) -> None:
        try:
            canary = await self._context.index.lookup(candidate, peer[0])
        except Unknowable:
            # Perhaps a canary: answer nothing a resolver would take as final, so it asks again.
            self._context.counters.record_failures += 1
            send(server_failure(packet, question), peer)
            return
        if canary is None:
            self._context.counters.junk += 1
            send(reply, peer)
        else:
            self._record(canary, question, left, peer, transport, reply, send)

    def _record(
        self,
        canary: Canary,
        question: Question,
        left: tuple[str, ...],
        peer: Peer,
        transport: str,
        reply: bytes,
        send: Send,
    ) -> None:
        evidence = {
            "qname": name_text(question.labels),
            "qtype": QTYPE.get(question.qtype, f"TYPE{question.qtype}"),
            "transport": transport,
            "left_labels": list(left),
            "decoded": decode_exfil(list(left)),
        }
        event = self._context.hit(canary, "dns", peer, evidence)
        self._context.record_then(event, lambda durable: send(reply if durable else None, peer))

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        transport = writer.transport
        slot = self._guard.admit(peer[0], transport.abort)
        if slot is None:
            # DNS over TCP has no refusal message for a connection: closing it is the refusal.
            self._context.counters.dropped += 1
            transport.abort()
            return
        # The kernel would otherwise buffer megabytes of answers for a client that never
        # reads (it grows a send buffer up to tcp_wmem): bounded, the write timeout comes soon.
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, _TCP_SEND_BUFFER
        )
        timeout = self._options.timeout
        unanswered: set[asyncio.Future[None]] = set()
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await self._tcp_queries(reader, writer, peer, slot, unanswered)
            if unanswered:
                # A client may half-close after its last query: its answers still go out,
                # within the same slot and the same bound.
                await asyncio.wait(unanswered, timeout=timeout)
                await asyncio.wait_for(writer.drain(), timeout)
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s dns tcp session failed", format_peer(peer))
        finally:
            slot.release()
            # Closing waits for the rest to be written, however long an unread socket takes.
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                writer.close()

    async def _tcp_queries(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        slot: Slot,
        unanswered: set[asyncio.Future[None]],
    ) -> None:
        """Answer length-prefixed queries until the client stops, stalls or stops reading."""
        timeout = self._options.timeout
        loop = asyncio.get_running_loop()
        runts = 0
        while True:
            if len(unanswered) >= _TCP_IN_FLIGHT:
                done, _ = await asyncio.wait(
                    unanswered, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    return
            try:
                prefix = await asyncio.wait_for(reader.readexactly(2), timeout)
                size = int.from_bytes(prefix, "big")
                packet = await asyncio.wait_for(reader.readexactly(size), timeout)
            except TimeoutError:
                self._guard.timeouts["read"] += 1
                return
            slot.touch()
            if size < _HEADER_BYTES:
                runts += 1
                if runts > _TCP_MAX_RUNTS:
                    self._context.counters.dropped += 1
                    return
            settled = loop.create_future()
            unanswered.add(settled)
            settled.add_done_callback(unanswered.discard)
            self.respond(packet, peer, self._tcp_sender(writer, settled), "tcp")
            try:
                await asyncio.wait_for(writer.drain(), timeout)
            except TimeoutError:
                self._guard.timeouts["write"] += 1
                raise ConnectionError("the client does not read its answers") from None

    @staticmethod
    def _tcp_sender(writer: asyncio.StreamWriter, settled: asyncio.Future[None]) -> Send:
        def send(reply: bytes | None, _peer: Peer) -> None:
            if reply is not None and not writer.is_closing():
                writer.write(len(reply).to_bytes(2, "big") + reply)
            if not settled.done():
                settled.set_result(None)

        return send
