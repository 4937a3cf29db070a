"""The admin HTTP API: the operations layer over HTTP, for bearer tokens with the right scope.

Served by its own uvicorn server inside `oobwatch serve`, never on a
listener's port, behind `ApiGate`, which checks the token before any body is
read. Every endpoint but the probes (`/healthz`, `/readyz`, which say only
"ok" or not) requires a token: `read` for looking,
`mint` for minting, retiring and planting, `ack` for acknowledging and
resolving alerts, `admin` for everything (tokens, verify, anchor). Each
handler parses, calls one operation and returns its view; handlers are plain
functions, run in FastAPI's thread pool, so store work never blocks the
listeners' loop.
"""

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from canaries.model import Kind
from oobwatch import output
from oobwatch.apigate import ApiGate
from oobwatch.console.pages import build_console, error_pages
from oobwatch.operations import Invalid, LocalOperations, NotFound
from oobwatch.views import (
    ActorRequest,
    AlertView,
    Bundle,
    CanaryView,
    ChecksView,
    EventView,
    Filters,
    HeadView,
    HealthView,
    IncidentView,
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
)
from store import tokens

_bearer = HTTPBearer(auto_error=False, description="An API token from `oobwatch token create`.")


# The query string's filter parameters, validated as the CLI's are (a bad one is 422).
Filtered = Annotated[Filters, Query()]


def build_api(
    operations: LocalOperations,
    collector: Collector | None = None,
    ready: Callable[[], bool] = lambda: True,
    stopping: Callable[[], bool] = lambda: False,
) -> FastAPI:
    """The API app over one node's operations; `ready` says whether the node records hits,
    `stopping` whether it is shutting down (live console streams end then)."""
    app = FastAPI(
        # The OpenAPI document stays public (it holds no data); the browsable pages do not exist.
        docs_url=None,
        redoc_url=None,
        title="oobwatch admin API",
        version="1",
        description="Mint and plant canaries, read timelines and incidents, act on alerts, check the ledger.",
    )
    api = operations.config.api
    app.add_middleware(
        ApiGate, engine=operations.engine, max_body_bytes=api.max_body_bytes, timeout=api.timeout
    )
    metrics_registry = CollectorRegistry(auto_describe=True)
    if collector is not None:
        metrics_registry.register(collector)

    @app.exception_handler(NotFound)
    def not_found(_request: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(Invalid)
    def invalid(_request: Request, error: Invalid) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    def require(scope: str) -> Callable[..., tokens.Token]:
        # The gate has authenticated the request; the bearer scheme is declared for the OpenAPI document.
        def check(
            request: Request,
            _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> tokens.Token:
            token: tokens.Token | None = getattr(request.state, "token", None)
            if token is None:
                raise HTTPException(
                    401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
                )
            if not token.may(scope):
                raise HTTPException(403, f"this endpoint needs the {scope} scope")
            return token

        return check

    Reader = Annotated[tokens.Token, Depends(require("read"))]
    Minter = Annotated[tokens.Token, Depends(require("mint"))]
    Acker = Annotated[tokens.Token, Depends(require("ack"))]
    Admin = Annotated[tokens.Token, Depends(require("admin"))]
    ops = operations

    # For container and load-balancer probes: no token, and nothing said but the verdict.
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    # Browsers ask for it on every console page; there is none.
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    def health(_: Reader) -> HealthView:
        return ops.health()

    @app.get("/overview")
    def overview(_: Reader) -> OverviewView:
        return ops.overview()

    @app.get("/sandboxes")
    def sandboxes(_: Reader) -> list[SandboxView]:
        return ops.sandboxes()

    @app.get("/canaries")
    def canaries(
        _: Reader, sandbox: str | None = None, kind: Kind | None = None
    ) -> list[CanaryView]:
        return ops.canaries(sandbox, kind)

    @app.post("/canaries", status_code=201)
    def mint(request: MintRequest, _: Minter) -> CanaryView:
        return ops.mint(request)

    @app.post("/canaries/{canary_id}/retire")
    def retire(canary_id: str, token: Minter) -> Retired:
        return ops.retire(canary_id, ActorRequest(by=token.name))

    @app.post("/plant")
    def plant(request: PlantRequest, _: Minter) -> Bundle:
        return ops.plant(request)

    # A CSV Response is passed through as it is; the model describes the JSON answer.
    @app.get(
        "/timeline",
        response_model=list[EventView],
        responses={200: {"content": {"text/csv": {}}}},
    )
    def timeline(filters: Filtered, _: Reader, format: Literal["json", "csv"] = "json") -> Any:
        events = ops.timeline(filters)
        if format == "csv":
            return Response(output.timeline_csv(events), media_type="text/csv")
        return events

    @app.get(
        "/incidents",
        response_model=list[IncidentView],
        responses={200: {"content": {"text/csv": {}}}},
    )
    def incidents(filters: Filtered, _: Reader, format: Literal["json", "csv"] = "json") -> Any:
        found = ops.incidents(filters)
        if format == "csv":
            return Response(output.incidents_csv(found), media_type="text/csv")
        return found

    @app.get("/incidents/{incident_id}")
    def incident(incident_id: str, _: Reader) -> IncidentView:
        return ops.incident(incident_id)

    @app.get("/alerts")
    def alerts(_: Reader, open: bool = False) -> list[AlertView]:
        return ops.alerts(open)

    @app.post("/alerts/{alert_id}/ack")
    def ack(alert_id: str, request: ActorRequest, _: Acker) -> Settled:
        return ops.ack(alert_id, request)

    @app.post("/alerts/{alert_id}/resolve")
    def resolve(alert_id: str, request: ActorRequest, _: Acker) -> Settled:
        return ops.resolve(alert_id, request)

    @app.get("/ledger/head")
    def head(_: Reader) -> HeadView:
        return ops.head()

    @app.post("/ledger/verify")
    def verify(_: Admin) -> VerifyView:
        return ops.verify()

    @app.get("/ledger/checks")
    def ledger_checks(_: Reader) -> ChecksView:
        return ops.checks()

    @app.get(
        "/ledger/export",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    def ledger_export(_: Reader) -> StreamingResponse:
        return StreamingResponse(ops.ledger_export(), media_type="application/x-ndjson")

    @app.post("/ledger/anchor")
    def anchor(_: Admin) -> HeadView:
        return ops.anchor()

    @app.get("/tls")
    def tls(_: Reader) -> TlsView:
        return ops.tls()

    @app.post("/tls/renew")
    def renew_tls(_: Admin) -> TlsView:
        return ops.renew_tls()

    @app.get("/tokens")
    def list_tokens(_: Admin) -> list[TokenView]:
        return ops.tokens()

    @app.post("/tokens", status_code=201)
    def create_token(request: TokenRequest, _: Admin) -> NewToken:
        return ops.create_token(request)

    @app.post("/tokens/{token_id}/revoke")
    def revoke_token(token_id: str, _: Admin) -> Revoked:
        return ops.revoke_token(token_id)

    @app.post("/tokens/{token_id}/login-link", status_code=201)
    def login_link(token_id: str, _: Admin) -> LoginLink:
        return ops.login_link(token_id)

    @app.post("/tokens/{token_id}/rotate")
    def rotate_token(token_id: str, _: Admin) -> NewToken:
        return ops.rotate_token(token_id)

    @app.get(
        "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
    )
    def metrics(_: Reader) -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(build_console(operations, stopping))
    error_pages(app, operations.config.node.name)
    return app
