"""The operations layer: every operation oobwatch offers, once.

The CLI (on this host or against a remote node), the admin API and the web
console call these and only parse input and render the views they return.
`Operations` is the interface; `LocalOperations` does the work on a store,
`oobwatch.remote.RemoteOperations` asks a node's admin API, which is itself
a `LocalOperations` behind HTTP.

Heavier parts (alert state, the outbox, the integrity job) are imported where
an operation needs them, so a quick `oobwatch list` does not load them.
"""

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine

from canaries import plant as planting
from canaries.kinds import Web
from canaries.mint import mint, retire
from canaries.model import HEARTBEAT_SANDBOX, Canary
from oobwatch.config import Config
from oobwatch.views import (
    ActorRequest,
    AlertView,
    Bundle,
    CanaryView,
    ChecksView,
    CheckView,
    EventView,
    Filters,
    HeadView,
    HealthView,
    IncidentView,
    ListenerView,
    LoginLink,
    MintRequest,
    NewToken,
    OverviewView,
    PlantRequest,
    Retired,
    Revoked,
    SandboxView,
    Settled,
    TlsView,
    TokenRequest,
    TokenView,
    VerifyView,
    incident_view,
)
from store import checks, health, ledger, registry, sessions, tokens
from store.activity import activity, newest_incidents
from store.clock import now_us, to_iso
from store.engine import open_store
from store.timeline import find_incident, in_sql, query_incidents, timeline, timeline_page

if TYPE_CHECKING:
    from alerts.state import AlertState
    from oobwatch.integrity import Integrity


_RENEWING = threading.Lock()
# Ledger rows an export reads per query.
EXPORT_CHUNK = 2000
# The events an incident is shown with; its summary counts them all.
INCIDENT_EVENTS = 500


class NotFound(LookupError):
    """The thing asked for does not exist."""


class Invalid(ValueError):
    """The request cannot be carried out as asked; the message says why."""


class RemoteFailed(Exception):
    """A remote node could not be reached, or answered with an error that is not the caller's."""


class Operations(Protocol):
    """What every skin can ask for."""

    def health(self) -> HealthView: ...

    def canaries(self, sandbox: str | None = None, kind: str | None = None) -> list[CanaryView]: ...

    def mint(self, request: MintRequest) -> CanaryView: ...

    def retire(self, canary_id: str, request: ActorRequest) -> Retired: ...

    def plant(self, request: PlantRequest) -> Bundle: ...

    def timeline(self, filters: Filters) -> list[EventView]: ...

    def incidents(self, filters: Filters) -> list[IncidentView]: ...

    def timeline_chunks(self, filters: Filters) -> Iterator[list[EventView]]: ...

    def incident(self, incident_id: str) -> IncidentView: ...

    def alerts(self, open_only: bool = False) -> list[AlertView]: ...

    def ack(self, alert_id: str, request: ActorRequest) -> Settled: ...

    def resolve(self, alert_id: str, request: ActorRequest) -> Settled: ...

    def head(self) -> HeadView: ...

    def verify(self) -> VerifyView: ...

    def tls(self) -> TlsView: ...

    def renew_tls(self) -> TlsView: ...

    def anchor(self) -> HeadView: ...

    def tokens(self) -> list[TokenView]: ...

    def create_token(self, request: TokenRequest) -> NewToken: ...

    def revoke_token(self, token_id: str) -> Revoked: ...

    def rotate_token(self, token_id: str) -> NewToken: ...

    def overview(self) -> OverviewView: ...

    def sandboxes(self) -> list[SandboxView]: ...

    def checks(self) -> ChecksView: ...

    def ledger_export(self) -> Iterator[str]: ...

    def login_link(self, token_id: str) -> LoginLink: ...


class LocalOperations:
    """Operations on this node's store, as its configuration says."""

    def __init__(
        self,
        config: Config,
        engine: Engine | None = None,
        alert_state: "AlertState | None" = None,
        integrity: "Integrity | None" = None,
    ) -> None:
        self.config = config
        self._engine = engine
        self._alert_state = alert_state
        self._integrity = integrity

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = open_store(self.config.store.url)
        return self._engine

    @property
    def alert_state(self) -> "AlertState":
        if self._alert_state is None:
            from oobwatch.alerting import alert_state

            self._alert_state = alert_state(self.config, self.engine)
        return self._alert_state

    @property
    def integrity(self) -> "Integrity":
        if self._integrity is None:
            from oobwatch.alerting import integrity

            self._integrity = integrity(self.config, self.engine)
        return self._integrity

    def health(self) -> HealthView:
        with self.engine.connect() as connection:
            seq, _digest = ledger.head(connection)
        return HealthView(status="ok", node=self.config.node.name, ledger_head=seq)

    def canaries(self, sandbox: str | None = None, kind: str | None = None) -> list[CanaryView]:
        with self.engine.connect() as connection:
            rows = registry.listing(connection, sandbox, kind)
            counts = registry.hit_counts(connection, [row["id"] for row in rows])
        moment = now_us()
        views = []
        for row in rows:
            hits, last = counts.get(row["id"], (0, None))
            views.append(CanaryView.of(Canary.from_row(row), moment, hits, last))
        return views

    def _view(self, canary: Canary) -> CanaryView:
        return CanaryView.of(canary, now_us())

    def mint(self, request: MintRequest) -> CanaryView:
        try:
            canary = mint(
                self.engine,
                kind=request.kind,
                zone=self.config.dns.zone,
                sandbox=request.sandbox,
                node=self.config.node.name,
                location=request.location,
                labels=request.labels,
                severity=request.severity,
                note=request.note,
                fmt=request.format,
                web=self._web(),
                scheme=request.scheme,
            )
        except ValueError as error:
            raise Invalid(str(error)) from None
        return self._view(canary)

    def _web(self) -> Web:
        """Where planted URLs point; over HTTPS, with the CA to trust if it is self-signed."""
        config = self.config
        postgres = config.postgres.port if config.postgres.enabled else 5432
        if not config.https.enabled:
            return Web(http_port=config.http.port, postgres_port=postgres)
        from cryptography.hazmat.primitives.serialization import Encoding

        from oobwatch import certs

        served = certs.served(config, self.engine)
        ca = served.chain[0].public_bytes(Encoding.PEM).decode()
        return Web(
            http_port=config.http.port,
            https_port=config.https.port,
            ca_pem=ca if served.source == "self-signed" else None,
            postgres_port=postgres,
        )

    def retire(self, canary_id: str, request: ActorRequest) -> Retired:
        found = retire(self.engine, canary_id, node=self.config.node.name, by=request.by)
        if found is None:
            raise NotFound(f"no canary {canary_id}")
        canary, already = found
        return Retired(canary=self._view(canary), already=already)

    def plant(self, request: PlantRequest) -> Bundle:
        try:
            planted = planting.plant(
                self.engine,
                sandbox=request.sandbox,
                zone=self.config.dns.zone,
                node=self.config.node.name,
                web=self._web(),
                labels=request.labels,
                present=set(request.present),
            )
        except ValueError as error:
            raise Invalid(str(error)) from None
        return Bundle(
            canaries=[self._view(canary) for canary in planted.canaries],
            files=planted.files,
            skipped=planted.skipped,
        )

    def timeline(self, filters: Filters) -> list[EventView]:
        with self.engine.connect() as connection:
            return [EventView.of(entry) for entry in timeline(connection, filters.query())]

    def timeline_chunks(self, filters: Filters) -> Iterator[list[EventView]]:
        """The timeline `filters` pick, a chunk at a time, each read on a connection of its
        own: an export of a long timeline holds neither the store nor all its rows."""
        query = filters.query()
        after: tuple[int, int] | None = None
        while True:
            with self.engine.connect() as connection:
                entries, after = timeline_page(connection, query, after, EXPORT_CHUNK)
            yield [EventView.of(entry) for entry in entries]
            if after is None:
                return

    def incidents(self, filters: Filters) -> list[IncidentView]:
        gap = self.config.timeline.incident_gap
        query = filters.query()
        with self.engine.connect() as connection:
            if query.newest is not None and in_sql(query):
                newest = newest_incidents(connection, query, gap, query.newest)
                return [incident_view(incident, summed=summed) for incident, summed in newest]
            found = query_incidents(connection, query, gap)
        return [incident_view(incident) for incident in found]

    def incident(self, incident_id: str) -> IncidentView:
        """An incident with its first `INCIDENT_EVENTS` events and every alert event, summed
        over all its hits."""
        gap = self.config.timeline.incident_gap
        with self.engine.connect() as connection:
            found = find_incident(connection, incident_id, gap, INCIDENT_EVENTS)
            if found is None:
                raise NotFound(f"no incident {incident_id}")
            summed = activity(connection, gap, *found.span)[found.sandbox]
        return incident_view(found, with_events=True, summed=summed)

    def alerts(self, open_only: bool = False) -> list[AlertView]:
        from alerts.state import list_alerts

        return [AlertView.of(row) for row in list_alerts(self.engine, open_only)]

    def ack(self, alert_id: str, request: ActorRequest) -> Settled:
        return self._settle(alert_id, request, self.alert_state.acknowledge)

    def resolve(self, alert_id: str, request: ActorRequest) -> Settled:
        return self._settle(alert_id, request, self.alert_state.resolve)

    def _settle(
        self,
        alert_id: str,
        request: ActorRequest,
        action: Callable[[str, str, int], tuple[Mapping[Any, Any], bool]],
    ) -> Settled:
        try:
            row, already = action(alert_id, request.by, now_us())
        except LookupError as error:
            raise NotFound(str(error)) from None
        return Settled(alert=AlertView.of(row), already=already)

    def head(self) -> HeadView:
        with self.engine.connect() as connection:
            seq, digest = ledger.head(connection)
        return HeadView(seq=seq, hash=digest)

    def verify(self) -> VerifyView:
        """The node's integrity check, run now: the chain, and the saved heads it must hold."""
        return VerifyView.of(self.integrity.check(now_us()))

    def checks(self) -> ChecksView:
        with self.engine.connect() as connection:
            return ChecksView(
                verifies=[CheckView.of(c) for c in checks.recent(connection, "verify")],
                anchors=[CheckView.of(c) for c in checks.recent(connection, "anchor")],
            )

    def ledger_export(self) -> Iterator[str]:
        """The chain up to the head it had when asked, as JSON lines with their hashes, for
        archiving and offline verify; a chunk of lines at a time.

        Each chunk is read on a connection of its own, so a slow or abandoned download
        holds none of the store's connections while it waits.
        """
        with self.engine.connect() as connection:
            upto, _ = ledger.head(connection)
        after = 0
        while after < upto:
            with self.engine.connect() as connection:
                chunk = ledger.chunk(connection, after, upto, EXPORT_CHUNK)
            if not chunk:
                return
            yield "".join(ledger.export_line(entry) + "\n" for entry in chunk)
            after = chunk[-1].seq

    def overview(self) -> OverviewView:
        from alerts.state import list_alerts

        with self.engine.connect() as connection:
            seq, digest = ledger.head(connection)
            listeners = health.listener_health(connection)
            verified = checks.recent(connection, "verify", 1)
            anchored = checks.recent(connection, "anchor", 1)
        return OverviewView(
            node=self.config.node.name,
            head=HeadView(seq=seq, hash=digest),
            listeners=[ListenerView.of(found) for found in listeners],
            open_alerts=[AlertView.of(row) for row in list_alerts(self.engine, True)],
            last_verify=CheckView.of(verified[0]) if verified else None,
            last_anchor=CheckView.of(anchored[0]) if anchored else None,
        )

    def sandboxes(self) -> list[SandboxView]:
        """Every sandbox with a canary or a hit, the one with the newest hit first."""
        moment = now_us()
        with self.engine.connect() as connection:
            rows = registry.listing(connection)
            summed = activity(
                connection, self.config.timeline.incident_gap, exclude=HEARTBEAT_SANDBOX
            )
        canaries: dict[str, list[Canary]] = {}
        for row in rows:
            canary = Canary.from_row(row)
            if canary.sandbox != HEARTBEAT_SANDBOX:
                canaries.setdefault(canary.sandbox, []).append(canary)
        views = []
        for sandbox in sorted({*canaries, *summed}):
            planted = canaries.get(sandbox, [])
            hits = summed.get(sandbox)
            views.append(
                SandboxView(
                    sandbox=sandbox,
                    canaries=len(planted),
                    active_canaries=sum(
                        CanaryView.of(c, moment).state == "active" for c in planted
                    ),
                    hits=hits.hits if hits else 0,
                    incidents=hits.incidents if hits else 0,
                    channels=sorted(hits.channels) if hits else [],
                    sources=hits.named_sources if hits else [],
                    source_count=len(hits.sources) if hits else 0,
                    last_hit_at=to_iso(hits.last_us) if hits else None,
                )
            )
        views.sort(key=lambda view: view.last_hit_at or "", reverse=True)
        return views

    def login_link(self, token_id: str) -> LoginLink:
        """A one-time link that signs the console in as a live token."""
        token = tokens.find(self.engine, token_id)
        if token is None:
            raise NotFound(f"no token {token_id}")
        if token.revoked_us is not None:
            raise Invalid(f"token {token_id} is revoked")
        api = self.config.api
        code, expires = sessions.new_link(self.engine, token_id, api.login_link_lifetime)
        return LoginLink(
            url=f"{api.base_url}/ui/login/link/{code}",
            token_id=token_id,
            expires_at=to_iso(expires),
        )

    def tls(self) -> TlsView:
        """The certificate a node on this store and config serves, and how ACME stands."""
        from oobwatch import certs
        from store import acme

        served = certs.served(self.config, self.engine)
        view = TlsView(**served.describe())
        if self.config.tls.acme_directory is None:
            return view
        state = acme.state(self.engine)
        due = certs.renewal_due(state, self.config.dns.zone, now_us())
        return view.with_acme(due, state.error, state.failed_us)

    def renew_tls(self) -> TlsView:
        """Have a serving node order a new ACME certificate now; its status once it ends."""
        from oobwatch import certs
        from store import acme

        if self.config.tls.acme_directory is None:
            raise Invalid(
                f"the certificate comes from {self.tls().source}: only an ACME one is renewed "
                "here (files are read again when they change; set tls.acme_directory to order)"
            )
        # One caller waits at a time: each holds a thread (an API worker) while it waits.
        if not _RENEWING.acquire(blocking=False):
            raise Invalid("a renewal is being waited for already; see tls status")
        try:
            asked = now_us()
            acme.ask_renewal(self.engine, asked)
            for _ in range(int(certs.RENEW_WAIT_SECONDS / certs.TICK_SECONDS)):
                state = acme.state(self.engine)
                if (state.issued_us or 0) >= asked:
                    return self.tls()
                if (state.failed_us or 0) >= asked:
                    raise Invalid(f"the ACME order failed: {state.error}")
                time.sleep(certs.TICK_SECONDS)
        finally:
            _RENEWING.release()
        raise Invalid(
            f"no node ordered within {certs.RENEW_WAIT_SECONDS:.0f} s: is one serving with "
            "tls.acme_directory on this store? The renewal stays asked for until one does."
        )

    def anchor(self) -> HeadView:
        """Save the head where `[ledger]` says (file and/or route) now."""
        if not self.config.ledger.anchored:
            raise Invalid("no anchor is configured: set ledger.anchor_file or ledger.anchor_route")
        seq, digest = self.integrity.anchor(now_us())
        return HeadView(seq=seq, hash=digest)

    def tokens(self) -> list[TokenView]:
        return [TokenView.of(token) for token in tokens.listing(self.engine)]

    def create_token(self, request: TokenRequest) -> NewToken:
        try:
            token, text = tokens.create(self.engine, request.name, request.scope)
        except ValueError as error:
            raise Invalid(str(error)) from None
        return NewToken(token=text, **TokenView.of(token).model_dump())

    def revoke_token(self, token_id: str) -> Revoked:
        found = tokens.revoke(self.engine, token_id)
        if found is None:
            raise NotFound(f"no token {token_id}")
        token, already = found
        return Revoked(token=TokenView.of(token), already=already)

    def rotate_token(self, token_id: str) -> NewToken:
        rotated = tokens.rotate(self.engine, token_id)
        if rotated is None:
            if tokens.find(self.engine, token_id) is not None:
                raise Invalid(f"token {token_id} is revoked; create a new one")
            raise NotFound(f"no token {token_id}")
        token, text = rotated
        # Whoever signed in with the old secret is signed out with it.
        sessions.end_all(self.engine, token_id)
        return NewToken(token=text, **TokenView.of(token).model_dump())
