"""Which certificate a node serves, kept current: `[tls]` files, ACME, or the self-signed one.

- Files are read again when they change (size, time or inode); files that
  cannot be served are logged and the certificate before them kept.
- ACME: the certificate lives in the store (`store.acme`), so every node
  serves the same and a restart orders nothing. A node orders when the stored
  one is missing, unusable, for other names, or due: within 30 days of expiry,
  or a third of its lifetime for short-lived certificates. One node orders at
  a time; a failure waits RETRY_AFTER_FAILURE before the next attempt, unless
  `tls renew` asks for one. Until the first order succeeds the node serves the
  self-signed certificate, so ClientHellos are caught from the first start.
- Without either: the self-signed certificate for the zone, made once and kept
  in the store.
"""

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from sqlalchemy import Engine

from listeners.certificates import Challenges, Served, from_files, self_signed
from oobwatch.config import Config
from store import acme
from store.clock import now_us
from store.deployment import secret

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
# How long `tls renew` waits for a serving node to order (as oobwatch.remote waits for it).
RENEW_WAIT_SECONDS = 300.0
RENEW_BEFORE = datetime.timedelta(days=30)
RETRY_AFTER_FAILURE = datetime.timedelta(minutes=15)
# Extended every tick while the order runs; a node that dies holding it blocks the others
# no longer than this.
ORDER_LEASE = datetime.timedelta(minutes=2)
# Other nodes load the DNS-01 answers at their next tick: two, before the CA is told to look.
SETTLE_SECONDS = 2 * TICK_SECONDS
_US = 1_000_000


def served(config: Config, engine: Engine) -> Served:
    """What a node serves now, as configured: files, the stored ACME one, else self-signed."""
    tls = config.tls
    if tls.cert is not None and tls.key is not None:
        return from_files(tls.cert, tls.key)
    if tls.acme_directory is not None:
        stored = acme.state(engine).pem
        if stored is not None and unusable(stored, config.dns.zone, now_us()) is None:
            return Served(stored, "acme")
    pem = secret(engine, "tls-self-signed", make=lambda: self_signed(config.dns.zone))
    return Served(pem, "self-signed")


def unusable(pem: bytes, zone: str, now: int) -> str | None:
    """Why `pem` cannot serve `zone` and `*.zone` now, or None when it can."""
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, IndexError, x509.ExtensionNotFound):
        return "it is not a certificate with names"
    missing = {zone, f"*.{zone}"} - set(names.get_values_for_type(x509.DNSName))
    if missing:
        return f"it does not name {', '.join(sorted(missing))}"
    if leaf.not_valid_after_utc.timestamp() * _US <= now:
        return f"it expired at {leaf.not_valid_after_utc.isoformat()}"
    return None


def renewal_due(state: acme.OrderState, zone: str, now: int) -> str | None:
    """Why a new order is due for the stored certificate now, or None."""
    if state.renew_asked_us is not None:
        return "a renewal was asked for"
    if state.failed_us is not None and now - state.failed_us < RETRY_AFTER_FAILURE / _one_us():
        return None
    if state.pem is None:
        return "there is no certificate yet"
    why = unusable(state.pem, zone, now)
    if why is not None:
        return f"the stored certificate is unusable: {why}"
    leaf = x509.load_pem_x509_certificates(state.pem)[0]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    before = min(RENEW_BEFORE, lifetime / 3)
    renew_at = leaf.not_valid_after_utc - before
    if now >= renew_at.timestamp() * _US:
        return f"it expires at {leaf.not_valid_after_utc.isoformat()}"
    return None


def _one_us() -> datetime.timedelta:
    return datetime.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class _Stamp:
    size: int
    mtime_ns: int
    inode: int


def _stamps(*paths: Path) -> tuple[_Stamp | None, ...]:
    found: list[_Stamp | None] = []
    for path in paths:
        try:
            status = path.stat()
        except OSError:
            found.append(None)
            continue
        found.append(_Stamp(status.st_size, status.st_mtime_ns, status.st_ino))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Tick:
    """What a tick found: a certificate to serve now, or an order this node claimed (and why)."""

    serve: Served | None = None
    order: str | None = None


class CertificateKeeper:
    """One node's certificate kept current. `tick()` runs every TICK_SECONDS, off the loop;
    an order it claims runs in `order()`, off the loop too, while ticks go on."""

    def __init__(self, config: Config, engine: Engine, current: Served, challenges: Challenges):
        self._config = config
        self._engine = engine
        self._current = current
        self._challenges = challenges
        tls = config.tls
        self._files = (tls.cert, tls.key) if tls.cert and tls.key else None
        self._seen = _stamps(*self._files) if self._files else ()

    def serving(self, served: Served) -> None:
        """The node now serves `served`."""
        self._current = served

    def tick(self, ordering: bool = False) -> Tick:
        """`ordering`: an order of this node's runs now (its lease is extended, nothing else)."""
        if self._files is not None:
            return Tick(serve=self._reread())
        if self._config.tls.acme_directory is not None:
            return self._acme(now_us(), ordering)
        return Tick()

    def _reread(self) -> Served | None:
        assert self._files is not None
        stamps = _stamps(*self._files)
        if stamps == self._seen:
            return None
        self._seen = stamps
        try:
            fresh = from_files(*self._files)
        except (OSError, ValueError) as error:
            log.warning("tls: keeping the certificate served now: the new files: %s", error)
            return None
        if fresh.pem == self._current.pem:
            return None
        log.info("tls: serving the certificate from the changed files")
        return fresh

    def _acme(self, now: int, ordering: bool) -> Tick:
        zone = self._config.dns.zone
        node = self._config.node.name
        lease = ORDER_LEASE // _one_us()
        if ordering:
            # It sets its own answers, before the store has them; it keeps its lease while
            # it runs, however slow the CA (a node that dies lets it lapse).
            acme.extend(self._engine, node, now + lease)
            return Tick()
        state = acme.state(self._engine)
        self._challenges.values = state.pending(now)
        if (
            state.pem is not None
            and state.pem != self._current.pem
            and unusable(state.pem, zone, now) is None
        ):
            log.info("tls: serving the ACME certificate from the store")
            return Tick(serve=Served(state.pem, "acme"))
        why = renewal_due(state, zone, now)
        if why is None or not acme.claim(self._engine, node, now, lease, state.pem):
            return Tick()
        return Tick(order=why)

    def order(self, why: str) -> Served | None:
        """Order the certificate this node claimed; what to serve, or None when it failed."""
        node = self._config.node.name
        from oobwatch.acme_client import OrderFailed, account_key, order

        tls = self._config.tls
        zone = self._config.dns.zone
        assert tls.acme_directory is not None
        directory = str(tls.acme_directory)
        log.info(
            "tls: ordering a certificate for %s and *.%s from %s: %s", zone, zone, directory, why
        )

        def publish(values: list[str]) -> None:
            acme.publish(self._engine, node, values)
            self._challenges.values = tuple(values)

        account = secret(self._engine, "acme-account-key", make=account_key)
        try:
            pem = order(
                directory,
                zone,
                account,
                publish,
                email=tls.acme_email,
                ca_bundle=tls.acme_ca_bundle,
                settle_seconds=SETTLE_SECONDS,
            )
            why_not = unusable(pem, zone, now_us())
            if why_not is not None:
                raise OrderFailed(f"the certificate issued cannot be served: {why_not}")
        except OrderFailed as error:
            log.error("tls: the ACME order for %s failed: %s", zone, error)
            acme.failed(self._engine, node, str(error), now_us())
            return None
        finally:
            self._challenges.values = ()
        acme.succeeded(self._engine, node, pem, now_us())
        leaf = x509.load_pem_x509_certificates(pem)[0]
        log.info(
            "tls: ACME certificate for %s issued by %s, valid until %s",
            zone,
            leaf.issuer.rfc4514_string(),
            leaf.not_valid_after_utc.isoformat(),
        )
        return Served(pem, "acme")
