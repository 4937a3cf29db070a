"""What operations take and give: one set of models for the CLI, the admin API and the console.

The API serialises these models, the remote CLI parses the same models back,
and every skin renders them; none of them has shapes of its own. Request
models bound and check what a caller may send (names are printable, since
they are stored, hashed and shown).
"""

import ipaddress
import json
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from canaries.kinds import CredentialFormat
from canaries.model import HEARTBEAT_SANDBOX, Canary, Kind, Protocol, Severity
from store import bursts
from store.activity import Activity
from store.checks import Check
from store.clock import from_iso, to_iso
from store.health import ListenerHealth
from store.ledger import Entry, Verdict
from store.timeline import Incident, TimelineQuery
from store.tokens import Token

Scope = Literal["read", "mint", "ack", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)

# Stored, hashed and printed: no control characters (PostgreSQL refuses NUL), not blank.
_CHAR = r"[^\x00-\x1f\x7f]"
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=rf"^{_CHAR}*\S{_CHAR}*$")]
Text = Annotated[str, Field(max_length=2000, pattern=rf"^{_CHAR}*$")]


def problems(error: ValidationError) -> str:
    """What was wrong with a request, field by field, on one line."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
        for problem in error.errors()
    )


def _when(time_us: int | None) -> str | None:
    return None if time_us is None else to_iso(time_us)


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MintRequest(Request):
    kind: Kind
    sandbox: Name
    location: Text = ""
    labels: dict[Name, Text] = {}
    severity: Severity = "high"
    note: Text = ""
    format: CredentialFormat | None = None
    # For url canaries: https needs the HTTPS listener on; default http.
    scheme: Literal["http", "https"] | None = None


class PlantRequest(Request):
    sandbox: Name
    labels: dict[Name, Text] = {}
    # Paths the target directory has already: nothing is minted for them.
    present: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=100)] = []


class ActorRequest(Request):
    by: Name = "api"


class TokenRequest(Request):
    name: Name
    scope: Scope


class Filters(Request):
    """A responder's timeline filters; None means no filter."""

    # In a query string, beside other parameters such as `format`.
    model_config = ConfigDict(extra="ignore", frozen=True)

    sandbox: str | None = None
    canary: str | None = None
    since: str | None = Field(default=None, description="ISO 8601, inclusive")
    until: str | None = Field(default=None, description="ISO 8601, exclusive")
    protocol: Protocol | None = None
    source: str | None = Field(default=None, description="an IP network (CIDR)")
    kind: Kind | None = None
    include_heartbeat: bool = False
    after: int | None = Field(default=None, ge=0, lt=2**63, description="only rows after this seq")
    types: list[str] | None = Field(default=None, max_length=20, description="event types")
    last: int | None = Field(
        default=None, ge=1, le=10000, description="only the newest this many (events, or incidents)"
    )

    @field_validator("since", "until")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                from_iso(value)
            except (ValueError, OverflowError):
                raise ValueError(f"{value!r} is not an ISO 8601 time") from None
        return value

    @field_validator("source")
    @classmethod
    def _network(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an IP network such as 198.51.100.0/24"
                ) from None
        return value

    def query(self) -> TimelineQuery:
        return TimelineQuery(
            sandbox=self.sandbox,
            canary_id=self.canary,
            since_us=None if self.since is None else from_iso(self.since),
            until_us=None if self.until is None else from_iso(self.until),
            protocol=self.protocol,
            kind=self.kind,
            source=None if self.source is None else ipaddress.ip_network(self.source, strict=False),
            exclude_sandbox=None if self.include_heartbeat else HEARTBEAT_SANDBOX,
            after_seq=self.after,
            types=self.types,
            newest=self.last,
        )

    def params(self) -> dict[str, Any]:
        """As query parameters, leaving out what is not set."""
        return {k: v for k, v in self.model_dump().items() if v is not None and v is not False}


class CanaryView(View):
    id: str
    token: str
    kind: str
    value: str
    sandbox: str
    location: str
    labels: dict[str, str]
    severity: str
    note: str
    created_at: str
    expires_at: str | None
    retired_at: str | None
    state: Literal["active", "retired", "expired"]
    format: str | None
    path_hint: str | None
    files: dict[str, str] | None
    hits: int = 0
    last_hit_at: str | None = None

    @classmethod
    def of(
        cls, canary: Canary, now_us: int, hits: int = 0, last_hit_us: int | None = None
    ) -> "CanaryView":
        if canary.retired_us is not None:
            state: Literal["active", "retired", "expired"] = "retired"
        elif canary.expires_us is not None and canary.expires_us <= now_us:
            state = "expired"
        else:
            state = "active"
        return cls(
            id=canary.id,
            token=canary.token,
            kind=canary.kind,
            value=canary.value,
            sandbox=canary.sandbox,
            location=canary.location,
            labels=dict(canary.labels),
            severity=canary.severity,
            note=canary.note,
            created_at=to_iso(canary.created_us),
            expires_at=_when(canary.expires_us),
            retired_at=_when(canary.retired_us),
            state=state,
            format=canary.format or None,
            path_hint=canary.path_hint or None,
            files=dict(canary.files) or None,
            hits=hits,
            last_hit_at=_when(last_hit_us),
        )


class Retired(View):
    canary: CanaryView
    already: bool


class Bundle(View):
    """A planted bundle: its canaries, the files to write (path -> text), the paths left alone."""

    canaries: list[CanaryView]
    files: dict[str, str]
    skipped: list[str]

    def written(self, paths: Collection[str]) -> list[CanaryView]:
        """Its canaries whose every file is among `paths` (a contact canary's is its location)."""
        return [
            canary
            for canary in self.canaries
            if all(path in paths for path in (canary.files or {canary.location: ""}))
        ]


class EventView(View):
    """One timeline event: the ledger columns, with its evidence lifted to the top level."""

    model_config = ConfigDict(frozen=True, extra="allow")

    seq: int
    time: str
    type: str
    canary_id: str | None
    sandbox: str | None
    protocol: str | None
    source_ip: str | None
    source_port: int | None
    node: str
    hash: str

    @classmethod
    def of(cls, entry: Entry) -> "EventView":
        evidence = {k: v for k, v in entry.evidence.items() if k not in cls.model_fields}
        return cls(
            seq=entry.seq,
            time=to_iso(entry.time_us),
            type=entry.type,
            canary_id=entry.canary_id,
            sandbox=entry.sandbox,
            protocol=entry.protocol,
            source_ip=entry.source_ip,
            source_port=entry.source_port,
            node=entry.node,
            hash=entry.hash,
            **evidence,
        )

    @property
    def evidence(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class FollowUp(View):
    time: str
    type: str
    detail: str


class IncidentView(View):
    id: str
    sandbox: str
    first: str
    last: str
    hits: int
    channels: list[str]
    sources: list[str]
    canaries: list[str]
    alerts: list[str | None]
    acked_by: list[str | None]
    follow_up: list[FollowUp]
    events: list[EventView] = []
    events_cut: bool = Field(
        default=False, description="events holds the first events and every alert event only"
    )


class AlertView(View):
    id: str
    status: str
    canary_id: str
    sandbox: str
    routes: list[str]
    hit_count: int
    first_hit_seq: int = Field(description="the ledger row of the hit that opened it")
    sources: list[str | None]
    protocols: list[str | None]
    opened_at: str | None
    last_hit_at: str | None
    acked_by: str | None
    acked_at: str | None
    resolved_at: str | None
    escalated_at: str | None
    undelivered: int = Field(description="deliveries given up with no other route to take them")

    @classmethod
    def of(cls, row: Mapping[Any, Any]) -> "AlertView":
        return cls(
            id=row["id"],
            status=row["status"],
            canary_id=row["canary_id"],
            sandbox=row["sandbox"],
            routes=json.loads(row["routes"]),
            hit_count=row["hit_count"],
            first_hit_seq=row["first_hit_seq"],
            sources=json.loads(row["sources"]),
            protocols=json.loads(row["protocols"]),
            opened_at=_when(row["opened_us"]),
            last_hit_at=_when(row["last_hit_us"]),
            acked_by=row["acked_by"],
            acked_at=_when(row["acked_us"]),
            resolved_at=_when(row["resolved_us"]),
            escalated_at=_when(row["escalated_us"]),
            undelivered=row["undelivered"],
        )


class Settled(View):
    alert: AlertView
    already: bool


class HeadView(View):
    seq: int
    hash: str


class TlsView(View):
    """The certificate the TLS listeners serve, and, with ACME, how ordering stands."""

    subject: str
    sans: list[str]
    issuer: str
    not_before: str
    not_after: str
    source: str
    # With ACME: why an order is due (None when it is not), and the last failure.
    renewal_due: str | None = None
    acme_error: str | None = None
    acme_failed_at: str | None = None

    def with_acme(
        self, renewal_due: str | None, error: str | None, failed_us: int | None
    ) -> "TlsView":
        return self.model_copy(
            update={
                "renewal_due": renewal_due,
                "acme_error": error,
                "acme_failed_at": _when(failed_us),
            }
        )


class VerifyView(View):
    intact: bool
    count: int
    head_hash: str
    bad_seq: int | None
    problem: str | None

    @classmethod
    def of(cls, verdict: Verdict, problem: str | None = None) -> "VerifyView":
        problem = verdict.problem or problem
        return cls(
            intact=problem is None,
            count=verdict.count,
            head_hash=verdict.head_hash,
            bad_seq=verdict.bad_seq,
            problem=problem,
        )


class TokenView(View):
    id: str
    name: str
    scope: str
    created_at: str
    revoked_at: str | None

    @classmethod
    def of(cls, token: Token) -> "TokenView":
        return cls(
            id=token.id,
            name=token.name,
            scope=token.scope,
            created_at=to_iso(token.created_us),
            revoked_at=_when(token.revoked_us),
        )


class NewToken(TokenView):
    """A token with its full text (`oob_<id>_<secret>`): shown once."""

    token: str


class Revoked(View):
    token: TokenView
    already: bool


class HealthView(View):
    status: str
    node: str
    ledger_head: int


class CheckView(View):
    """One integrity check as it ran: a verify (with its problem, if any) or an anchor."""

    kind: str
    node: str
    time: str
    seq: int
    hash: str
    problem: str | None

    @classmethod
    def of(cls, check: Check) -> "CheckView":
        return cls(
            kind=check.kind,
            node=check.node,
            time=to_iso(check.time_us),
            seq=check.seq,
            hash=check.hash,
            problem=check.problem,
        )


class ChecksView(View):
    """The newest verifies and anchors, newest first."""

    verifies: list[CheckView]
    anchors: list[CheckView]


class ListenerView(View):
    """A listener of a node as the heartbeat sees it."""

    node: str
    listener: str
    healthy: bool
    last_ok_at: str | None
    failing_since: str | None

    @classmethod
    def of(cls, health: ListenerHealth) -> "ListenerView":
        return cls(
            node=health.node,
            listener=health.listener,
            healthy=health.failing_since_us is None,
            last_ok_at=_when(health.last_ok_us),
            failing_since=_when(health.failing_since_us),
        )


class OverviewView(View):
    """What a responder looks at first: listeners, open alerts, the ledger's state."""

    node: str
    head: HeadView
    listeners: list[ListenerView]
    open_alerts: list[AlertView]
    last_verify: CheckView | None
    last_anchor: CheckView | None


class SandboxView(View):
    """A sandbox: its canaries, and what its hits add up to."""

    sandbox: str
    canaries: int
    active_canaries: int
    hits: int
    incidents: int
    channels: list[str]
    sources: list[str] = Field(description="up to 20 of its source addresses")
    source_count: int
    last_hit_at: str | None


class LoginLink(View):
    """A one-time console sign-in link for a token."""

    url: str
    token_id: str
    expires_at: str


def detail(event: EventView) -> str:
    """One line saying what an event is about, from its evidence."""
    data = event.evidence
    kind, protocol = event.type, event.protocol
    if kind in ("hit", "evidence") and bursts.burst_of(data) is not None:
        return bursts.summary(event.canary_id, data)
    if kind == "hit" and protocol == "dns":
        text = f"{data.get('qtype', '')} {data.get('qname', '')}"
        return text + (f" decoded={data['decoded']!r}" if data.get("decoded") else "")
    if kind == "hit" and protocol == "smtp":
        if data.get("trigger") == "leaked":
            return f"token leaked in mail {data.get('subject', '')!r}"
        return f"RCPT {data.get('rcpt', '')} from {data.get('mail_from', '')}"
    if kind == "hit" and protocol == "tls":
        return f"SNI {data.get('sni', '')} ALPN {','.join(data.get('alpn', []))} JA4 {data.get('ja4', '')}"
    if kind == "hit" and protocol == "postgres":
        found_in = ", ".join(data.get("found_in", []))
        return f"login user={data.get('user', '')!r} database={data.get('database', '')!r} (in {found_in})"
    if kind == "evidence" and protocol == "postgres":
        return f"password step: secret {'presented' if data.get('secret_presented') else 'not presented'}"
    if kind == "evidence" and protocol == "tls":
        return f"TLS handshake {data.get('handshake', '')}"
    if kind == "evidence" and protocol == "mcp":
        tool = f" {data['tool']}({data.get('arguments', '')})" if data.get("tool") else ""
        return f"MCP {data.get('method', '')}{tool}"
    if kind == "evidence" and data.get("model") is not None:
        return f"{data.get('provider', '')} {data.get('endpoint', '')} model {data['model']}"
    if kind == "hit" and protocol in ("http", "https", "mcp"):
        found_in = ", ".join(data.get("found_in", []))
        return f"{data.get('method', '')} {data.get('target', '')} (in {found_in})"
    if kind == "evidence" and protocol in ("http", "https"):
        return f"body {data.get('body_size', 0)} bytes sha256 {data.get('body_sha256', '')[:16]}"
    if kind == "evidence":
        return f"mail {data.get('subject', '')!r}, {data.get('size', 0)} bytes"
    if kind in ("alert_sent", "alert_failed"):
        text = f"{data.get('purpose')} via {data.get('route')}/{data.get('target')}, attempt {data.get('attempt')}"
        return text + (f": {data['error']}" if data.get("error") else "")
    if kind == "alert_opened":
        return f"alert {data.get('alert_id')} to {', '.join(data.get('routes', []))}"
    if kind.startswith("alert_"):
        extra = {key: value for key, value in data.items() if key != "alert_id"}
        return f"alert {data.get('alert_id')} {json.dumps(extra, sort_keys=True)}"
    if kind == "suppressed":
        return f"hit {data.get('hit_seq')} not paged: {data.get('reason')}"
    if kind.startswith("heartbeat_"):
        return f"{data.get('listener')} listener"
    return str(data.get("value", ""))


def incident_view(
    incident: Incident, with_events: bool = False, summed: Activity | None = None
) -> IncidentView:
    """An incident summarised (from `summed` when its hits were counted by the database), with
    the events read when `with_events`."""
    entries = incident.entries
    hits = summed.hits if summed else incident.hit_count
    return IncidentView(
        id=incident.id,
        sandbox=incident.sandbox,
        first=to_iso(incident.first_us),
        last=to_iso(summed.last_us if summed else incident.last_us),
        hits=hits,
        channels=sorted(summed.channels) if summed else incident.channels,
        sources=list(summed.sources) if summed else incident.sources,
        canaries=list(summed.canaries) if summed else incident.canaries,
        alerts=[e.evidence.get("alert_id") for e in entries if e.type == "alert_opened"],
        acked_by=[e.evidence.get("by") for e in entries if e.type == "alert_acked"],
        follow_up=[
            FollowUp(time=to_iso(e.time_us), type=e.type, detail=detail(EventView.of(e)))
            for e in incident.follow_up
        ],
        events=[EventView.of(e) for e in entries] if with_events else [],
        events_cut=incident.cut,
    )
