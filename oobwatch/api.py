"""The admin HTTP API: what the CLI does, over HTTP, for bearer tokens with the right scope.

Served by its own uvicorn server inside `oobwatch serve`, never on a
listener's port. Every endpoint requires a token: `read` for looking,
`mint` for minting, retiring and planting, `ack` for acknowledging and
resolving alerts, `admin` for everything. Handlers are plain functions, run
in FastAPI's thread pool, so store work never blocks the listeners' loop.
"""

import io
import ipaddress
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from alerts.incidents import Incidents, list_alerts
from canaries.kinds import CREDENTIAL_FORMATS
from canaries.mint import mint
from canaries.model import HEARTBEAT_SANDBOX, Canary
from canaries.plant import plant
from oobwatch import output
from oobwatch.config import Config
from store import ledger, registry, tokens
from store.clock import from_iso, now_us
from store.ledger import Event
from store.timeline import TimelineQuery, find_incident, incidents, timeline

Scope = Literal["read", "mint", "ack", "admin"]
SCOPES: tuple[str, ...] = ("read", "mint", "ack", "admin")
# Which token scopes may call an endpoint that needs a given scope.
_GRANTS = {
    "read": {"read", "mint", "ack", "admin"},
    "mint": {"mint", "admin"},
    "ack": {"ack", "admin"},
    "admin": {"admin"},
}

_bearer = HTTPBearer(auto_error=False, description="An API token from `oobwatch token create`.")


# Names and notes are stored, hashed and printed: no control characters (PostgreSQL refuses NUL).
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=_PRINTABLE)]
Text = Annotated[str, Field(max_length=2000, pattern=_PRINTABLE)]


class MintRequest(BaseModel):
    kind: Literal["dns", "email", "url", "credential"]
    sandbox: Name
    location: Text = ""
    labels: dict[Name, Text] = {}
    severity: Literal["low", "medium", "high", "critical"] = "high"
    note: Text = ""
    format: Literal[CREDENTIAL_FORMATS] | None = None  # type: ignore[valid-type]


class PlantRequest(BaseModel):
    sandbox: Name
    labels: dict[Name, Text] = {}


class ActorRequest(BaseModel):
    by: Name = "api"


class CanaryOut(BaseModel):
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
    format: str | None
    path_hint: str | None
    files: dict[str, str] | None


class AlertOut(BaseModel):
    id: str
    status: str
    canary_id: str
    sandbox: str
    routes: list[str]
    hit_count: int
    sources: list[str | None]
    protocols: list[str | None]
    opened_at: str | None
    last_hit_at: str | None
    acked_by: str | None
    acked_at: str | None
    resolved_at: str | None
    escalated_at: str | None


class HeadOut(BaseModel):
    seq: int
    hash: str


class VerifyOut(BaseModel):
    intact: bool
    count: int
    head_hash: str
    bad_seq: int | None
    problem: str | None


class HealthOut(BaseModel):
    status: str
    node: str
    ledger_head: int


def _filters(
    sandbox: str | None = None,
    canary: str | None = None,
    since: str | None = Query(default=None, description="ISO 8601, inclusive"),
    until: str | None = Query(default=None, description="ISO 8601, exclusive"),
    protocol: Literal["dns", "smtp", "http"] | None = None,
    source: str | None = Query(default=None, description="CIDR"),
    kind: Literal["dns", "email", "url", "credential"] | None = None,
    include_heartbeat: bool = False,
) -> TimelineQuery:
    try:
        return TimelineQuery(
            sandbox=sandbox,
            canary_id=canary,
            since_us=None if since is None else from_iso(since),
            until_us=None if until is None else from_iso(until),
            protocol=protocol,
            kind=kind,
            source=None if source is None else ipaddress.ip_network(source, strict=False),
            exclude_sandbox=None if include_heartbeat else HEARTBEAT_SANDBOX,
        )
    except (ValueError, OverflowError) as error:
        raise HTTPException(422, f"bad filter: {error}") from None


Filters = Annotated[TimelineQuery, Depends(_filters)]


def build_api(
    engine: Engine, config: Config, incidents_of: Incidents, collector: Collector | None = None
) -> FastAPI:
    """The API app for one node's store and configuration."""
    app = FastAPI(
        # The OpenAPI document stays public (it holds no data); the browsable pages do not exist.
        docs_url=None,
        redoc_url=None,
        title="oobwatch admin API",
        version="1",
        description="Mint and plant canaries, read timelines and incidents, act on alerts, check the ledger.",
    )
    registry_ = CollectorRegistry(auto_describe=True)
    if collector is not None:
        registry_.register(collector)

    def require(scope: str) -> Callable[..., tokens.Token]:
        def check(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> tokens.Token:
            token = (
                None
                if credentials is None
                else tokens.authenticate(engine, credentials.credentials)
            )
            if token is None:
                raise HTTPException(
                    401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
                )
            if token.scope not in _GRANTS[scope]:
                raise HTTPException(403, f"this endpoint needs the {scope} scope")
            return token

        return check

    Reader = Annotated[tokens.Token, Depends(require("read"))]
    Minter = Annotated[tokens.Token, Depends(require("mint"))]
    Acker = Annotated[tokens.Token, Depends(require("ack"))]
    Admin = Annotated[tokens.Token, Depends(require("admin"))]

    @app.get("/health", response_model=HealthOut)
    def health(_: Reader) -> dict[str, Any]:
        with engine.connect() as connection:
            seq, _digest = ledger.head(connection)
        return {"status": "ok", "node": config.node.name, "ledger_head": seq}

    @app.get("/canaries", response_model=list[CanaryOut])
    def list_canaries(_: Reader, sandbox: str | None = None) -> list[dict[str, Any]]:
        with engine.connect() as connection:
            rows = registry.listing(connection, sandbox)
        return [output.canary_json(Canary.from_row(row)) for row in rows]

    @app.post("/canaries", response_model=CanaryOut, status_code=201)
    def mint_canary(request: MintRequest, _: Minter) -> dict[str, Any]:
        try:
            canary = mint(
                engine,
                kind=request.kind,
                zone=config.dns.zone,
                sandbox=request.sandbox,
                node=config.node.name,
                location=request.location,
                labels=request.labels,
                severity=request.severity,
                note=request.note,
                fmt=request.format,
                http_port=config.http.port,
            )
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        return output.canary_json(canary)

    @app.post("/canaries/{canary_id}/retire", response_model=CanaryOut)
    def retire(canary_id: str, token: Minter) -> dict[str, Any]:
        moment = now_us()
        with engine.begin() as connection:
            row = registry.retire(connection, canary_id, moment)
            if row is None:
                raise HTTPException(404, f"no canary {canary_id}")
            retired = Event(
                "canary_retired",
                moment,
                config.node.name,
                canary_id,
                row["sandbox"],
                data={"by": token.name},
            )
            ledger.append(connection, [retired])
        return output.canary_json(Canary.from_row(row))

    @app.post(
        "/plant", responses={200: {"content": {"application/zip": {}}}}, response_class=Response
    )
    def plant_bundle(request: PlantRequest, _: Minter) -> Response:
        with tempfile.TemporaryDirectory(prefix="oobwatch-plant-") as directory:
            try:
                planted = plant(
                    engine,
                    into=Path(directory),
                    sandbox=request.sandbox,
                    zone=config.dns.zone,
                    node=config.node.name,
                    http_port=config.http.port,
                    labels=request.labels,
                )
            except ValueError as error:
                raise HTTPException(422, str(error)) from None
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(Path(directory).rglob("*")):
                    if path.is_file():
                        archive.write(path, path.relative_to(directory).as_posix())
        ids = ",".join(canary.id for canary in planted.canaries)
        return Response(
            buffer.getvalue(),
            media_type="application/zip",
            headers={
                "Content-Disposition": 'attachment; filename="canaries.zip"',
                "X-Oobwatch-Canaries": ids,
            },
        )

    @app.get("/timeline", responses={200: {"content": {"text/csv": {}}}})
    def get_timeline(query: Filters, _: Reader, format: Literal["json", "csv"] = "json") -> Any:
        with engine.connect() as connection:
            entries = timeline(connection, query)
        if format == "csv":
            return Response(output.timeline_csv(entries), media_type="text/csv")
        return [output.event_json(entry) for entry in entries]

    @app.get("/incidents", responses={200: {"content": {"text/csv": {}}}})
    def get_incidents(query: Filters, _: Reader, format: Literal["json", "csv"] = "json") -> Any:
        with engine.connect() as connection:
            found = incidents(timeline(connection, query), config.timeline.incident_gap)
        rows = [output.incident_json(incident) for incident in found]
        if format == "csv":
            return Response(output.incidents_csv(rows), media_type="text/csv")
        return rows

    @app.get("/incidents/{incident_id}")
    def get_incident(incident_id: str, _: Reader) -> dict[str, Any]:
        with engine.connect() as connection:
            found = find_incident(connection, incident_id, config.timeline.incident_gap)
        if found is None:
            raise HTTPException(404, f"no incident {incident_id}")
        story = output.incident_json(found)
        story["events"] = [output.event_json(entry) for entry in found.entries]
        return story

    @app.get("/alerts", response_model=list[AlertOut])
    def get_alerts(_: Reader, open: bool = False) -> list[dict[str, Any]]:
        return [output.alert_json(row) for row in list_alerts(engine, open)]

    def settle(alert_id: str, action: Callable[[str, str, int], None], by: str) -> dict[str, Any]:
        try:
            action(alert_id, by, now_us())
        except LookupError as error:
            raise HTTPException(404, str(error)) from None
        except ValueError as error:
            raise HTTPException(409, str(error)) from None
        [row] = [row for row in list_alerts(engine) if row["id"] == alert_id]
        return output.alert_json(row)

    @app.post("/alerts/{alert_id}/ack", response_model=AlertOut)
    def ack(alert_id: str, request: ActorRequest, _: Acker) -> dict[str, Any]:
        return settle(alert_id, incidents_of.acknowledge, request.by)

    @app.post("/alerts/{alert_id}/resolve", response_model=AlertOut)
    def resolve(alert_id: str, request: ActorRequest, _: Acker) -> dict[str, Any]:
        return settle(alert_id, incidents_of.resolve, request.by)

    @app.get("/ledger/head", response_model=HeadOut)
    def head(_: Reader) -> dict[str, Any]:
        with engine.connect() as connection:
            seq, digest = ledger.head(connection)
        return {"seq": seq, "hash": digest}

    @app.post("/ledger/verify", response_model=VerifyOut)
    def verify(_: Admin) -> dict[str, Any]:
        with engine.connect() as connection:
            verdict = ledger.verify(connection)
        return {
            "intact": verdict.intact,
            "count": verdict.count,
            "head_hash": verdict.head_hash,
            "bad_seq": verdict.bad_seq,
            "problem": verdict.problem,
        }

    @app.get(
        "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
    )
    def metrics(_: Reader) -> Response:
        return Response(generate_latest(registry_), media_type=CONTENT_TYPE_LATEST)

    return app
