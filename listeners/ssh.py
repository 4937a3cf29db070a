"""The SSH listener (asyncssh): a planted key or password, tried, names its canary; all are refused.

SSH names no host (there is no SNI), so a planted `ssh-key` canary is known by
the fingerprint of the public key a client offers: the key is derived from the
canary's token (`canaries.kinds.ssh_key`), and the listener keeps the
fingerprints of the `ssh-key` canaries it knows. A token in the username, a
password or a keyboard-interactive answer counts too. Each is committed before
the server answers that attempt, and every attempt is refused, so the client
sees "Permission denied". Evidence: the client's version string, the username,
the key's type and fingerprint (as `ssh-keygen -lf` prints it), which method
was tried, the password's length, and a password or answer itself only when it
carries a token (a planted secret; any other may be a real one, mistakenly sent).

Bounds: the guard's connection caps (a refused connection is closed before the
version exchange), the login timeout, at most MAX_ATTEMPTS authentication
attempts a connection, and key exchange by elliptic curves only (cheap for
the server, as every handshake's is on the shared loop).
"""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import asyncssh

from canaries.find import scan
from canaries.index import Unknowable
from canaries.kinds import ssh_fingerprint
from canaries.model import Canary
from listeners.base import Context, NotDurable, Peer, Port, printable
from listeners.guard import (
    BACKLOG,
    ConnectionGuard,
    Seconds,
    Slot,
    StreamOptions,
    listening_socket,
)
from store.ledger import Event

log = logging.getLogger(__name__)

# OpenSSH's MaxAuthTries.
MAX_ATTEMPTS = 6
MAX_CANDIDATES = 8
VALUE_KEPT = 256
# What OpenSSH 9.2 on Debian says and offers (its defaults, less what asyncssh lacks): a
# honeypot should not announce itself. Only elliptic-curve key exchange: a client may not
# make the node generate an RSA key (rsa2048-sha256) or a large DH group for each handshake,
# on the loop every listener shares.
SERVER_VERSION = "OpenSSH_9.2p1 Debian-2+deb12u3"
KEX = (
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
)
CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
)
MACS = (
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha1-etm@openssh.com",
    "umac-64@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha1",
)


class SshOptions(StreamOptions):
    """`[ssh]`: where it binds (22 in production), and how long a client has to log in (a
    person reads a host-key prompt and types a password: OpenSSH allows 120 s)."""

    enabled: bool = False
    port: Port = 2222
    login_timeout: Seconds = 60.0


def host_key() -> bytes:
    """A new host key, as OpenSSH's private key format (kept in the store, shared by nodes)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    exported: bytes = key.export_private_key()
    return exported


class SshListener:
    """Takes SSH connections as far as authentication, and refuses every attempt."""

    name = "ssh"

    def __init__(self, context: Context, options: SshOptions) -> None:
        if context.ssh_host_key is None:
            raise ValueError("the SSH listener needs the node's host key (context.ssh_host_key)")
        self._context = context
        self._options = options
        self._key = asyncssh.import_private_key(context.ssh_host_key)
        context.connections = self._guard = ConnectionGuard.of(options)
        self._server: asyncssh.SSHAcceptor | None = None
        # Fingerprint -> token of the ssh-key canaries known, added to when the index grows.
        self._fingerprints: dict[str, str] = {}
        self._indexed = -1
        self._attempts: set[asyncio.Future[None]] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [(self._options.listen, self._server.get_port())]

    async def start(self) -> None:
        self._server = await asyncssh.create_server(
            lambda: _Session(self),
            sock=listening_socket(self._options),
            backlog=BACKLOG,
            server_host_keys=[self._key],
            server_version=SERVER_VERSION,
            kex_algs=list(KEX),
            encryption_algs=list(CIPHERS),
            mac_algs=list(MACS),
            login_timeout=self._options.login_timeout,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # Attempts being recorded are let finish: each is one commit at most.
        await asyncio.gather(*self._attempts, return_exceptions=True)

    def admit(self, peer: Peer, close: Any) -> Slot | None:
        slot = self._guard.admit(str(peer[0]), close)
        if slot is None:
            self._context.counters.dropped += 1
        return slot

    async def token_of(self, fingerprint: str) -> str | None:
        """The token of the ssh-key canary whose key has `fingerprint`, if one is known.

        The fingerprints of canaries new to the index are derived off the loop, once each.
        """
        index = self._context.index
        if len(index) != self._indexed:
            self._indexed = len(index)
            known = set(self._fingerprints.values())
            new = [
                canary.token
                for canary in index.canaries()
                if canary.format == "ssh-key" and canary.token not in known
            ]
            if new:
                derived = await asyncio.to_thread(lambda: {ssh_fingerprint(t): t for t in new})
                self._fingerprints.update(derived)
        return self._fingerprints.get(fingerprint)

    async def attempt(
        self, session: "_Session", method: str, found: dict[str, list[str]], facts: dict[str, Any]
    ) -> None:
        """`_attempt`, carried on even when asyncssh cancels the attempt (the client hung up,
        or sent its next one): the hit it carries is recorded all the same."""
        task = asyncio.ensure_future(self._attempt(session, method, found, facts))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)
        await asyncio.shield(task)

    async def _attempt(
        self, session: "_Session", method: str, found: dict[str, list[str]], facts: dict[str, Any]
    ) -> None:
        """Record what one authentication attempt carries; it is refused either way.

        An attempt naming a canary is a hit, with the connection's attempts before it; once a
        connection has a hit, each attempt after it is that hit's evidence (every key offered,
        every password's length), so the record holds all the connection tried.
        """
        context = self._context
        context.counters.received += 1
        tried = {**facts, "method": method}
        try:
            hits = await context.index.among(found, str(session.peer[0]), MAX_CANDIDATES)
            events: list[Event] = [
                context.hit(
                    canary,
                    "ssh",
                    session.peer,
                    {
                        **session.facts(),
                        **tried,
                        "found_in": where,
                        "attempts_before": session.tried[:MAX_ATTEMPTS],
                    },
                )
                for canary, where in hits
                if canary.id not in session.hits
            ]
            events += [
                context.observation(
                    "evidence", canary, "ssh", session.peer, {"hit_seq": seq, **tried}
                )
                for canary, seq in session.hits.values()
            ]
            entries = await context.record(*events)
        except (NotDurable, Unknowable):
            # Not recorded, or not known: the attempt is refused as every other is.
            context.counters.record_failures += 1
            return
        for entry in entries:
            if entry.type == "hit" and entry.canary_id is not None:
                canary = next(c for c, _ in hits if c.id == entry.canary_id)
                session.hits[canary.id] = (canary, entry.seq)
        if not session.hits:
            context.counters.junk += 1
        session.tried.append(tried)


class _Session(asyncssh.SSHServer):
    """One connection's authentication, held to the caps and an attempt bound."""

    def __init__(self, listener: SshListener) -> None:
        self._listener = listener
        self._connection: asyncssh.SSHServerConnection | None = None
        self._slot: Slot | None = None
        self._attempts = 0
        self.peer: Peer = ("?", 0)
        # What this connection tried, and the hits it made (by canary id: the canary, its row).
        self.tried: list[dict[str, Any]] = []
        self.hits: dict[str, tuple[Canary, int]] = {}

    def connection_made(self, connection: asyncssh.SSHServerConnection) -> None:
        self._connection = connection
        self.peer = connection.get_extra_info("peername") or ("?", 0)
        self._slot = self._listener.admit(self.peer, connection.abort)
        if self._slot is None:
            connection.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()

    def facts(self) -> dict[str, Any]:
        connection = self._connection
        version = connection.get_extra_info("client_version") if connection else None
        return {"client_version": printable(str(version or ""), VALUE_KEPT)}

    def _counted(self) -> bool:
        """One more attempt; False (and the connection closed) past the bound."""
        self._attempts += 1
        if self._slot is not None:
            self._slot.touch()
        if self._attempts > MAX_ATTEMPTS and self._connection is not None:
            self._connection.close()
            return False
        return True

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self._counted():
            fingerprint = key.get_fingerprint("sha256")
            found = _in_username(username)
            token = await self._listener.token_of(fingerprint)
            if token is not None:
                found.setdefault(token, []).append("public_key")
            facts = {
                "username": printable(username, VALUE_KEPT),
                "key_type": printable(key.get_algorithm(), VALUE_KEPT),
                "key_fingerprint": fingerprint,
            }
            await self._listener.attempt(self, "publickey", found, facts)
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        if self._counted():
            found = _in_username(username)
            for token in scan(password):
                found.setdefault(token, []).append("password")
            facts = {
                "username": printable(username, VALUE_KEPT),
                "password_length": len(password),
                **_planted(password),
            }
            await self._listener.attempt(self, "password", found, facts)
        return False

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> tuple[str, str, str, list[tuple[str, bool]]]:
        return "", "", "", [("Password: ", False)]

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        if self._counted():
            found = _in_username(username)
            planted = [answer for answer in responses[:4] if scan(answer)]
            for answer in planted:
                for token in scan(answer):
                    found.setdefault(token, []).append("keyboard_interactive")
            facts = {
                "username": printable(username, VALUE_KEPT),
                "answers": len(responses),
                "planted_answers": [printable(answer, VALUE_KEPT) for answer in planted],
            }
            await self._listener.attempt(self, "keyboard-interactive", found, facts)
        return False


def _planted(password: str) -> dict[str, str]:
    """A password that carries a token is a planted secret, kept; any other is only its length
    (it may be a real one, mistakenly sent)."""
    return {"password": printable(password, VALUE_KEPT)} if scan(password) else {}


def _in_username(username: str) -> dict[str, list[str]]:
    return {token: ["username"] for token in scan(username)}
