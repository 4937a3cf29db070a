"""The console's pages and forms: each renders views of one or more operations, or posts one.

Pages are GET and change nothing; every change is a POSTed form that names
the scope it needs (403 otherwise) and carries the session's CSRF secret.
The routes stay out of the OpenAPI document: they are for people, the JSON
API is for programs.
"""

import hmac
from collections.abc import Callable
from typing import Annotated, Any, get_args
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from canaries.kinds import CREDENTIAL_FORMATS
from canaries.model import Kind, Protocol, Severity
from oobwatch import output
from oobwatch.apigate import in_console
from oobwatch.config import ApiConfig
from oobwatch.console import live, signin
from oobwatch.console.render import SCRIPT, page
from oobwatch.operations import Invalid, LocalOperations, NotFound
from oobwatch.views import (
    SCOPES,
    ActorRequest,
    Filters,
    MintRequest,
    PlantRequest,
    TokenRequest,
    detail,
    problems,
)
from store import sessions, tokens
from store.sessions import Session

KINDS: tuple[str, ...] = get_args(Kind)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
SEVERITIES: tuple[str, ...] = get_args(Severity)
STATES = ("active", "retired", "expired")
# The newest hits the overview lists before live ones arrive.
RECENT_HITS = 20
# The newest events a sandbox page shows unless asked for all: a page a phone can render.
PAGE_EVENTS = 500
# The newest incidents a sandbox page lists.
PAGE_INCIDENTS = 50


def _session(request: Request) -> Session:
    found: Session | None = getattr(request.state, "session", None)
    if found is None:  # the gate lets no console page through without one
        raise HTTPException(401, "sign in first")
    return found


Signed = Annotated[Session, Depends(_session)]


def rendered(
    request: Request,
    name: str,
    node: str,
    session: Session | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    text = page(
        name,
        session=session,
        token=None if session is None else session.token,
        node=node,
        path=request.url.path,
        detail=detail,
        **context,
    )
    return HTMLResponse(text, status_code=status)


def error_pages(app: FastAPI, node: str) -> None:
    """Console errors as pages (the JSON API's stay JSON)."""

    async def shown(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if not in_console(request.url.path):
            return await http_exception_handler(request, error)
        session: Session | None = getattr(request.state, "session", None)
        answer = rendered(
            request, "problem.html", node, session, error.status_code, problem=error.detail
        )
        answer.headers.update(error.headers or {})
        return answer

    app.add_exception_handler(StarletteHTTPException, shown)


def build_console(
    operations: LocalOperations,
    stopping: Callable[[], bool] = lambda: False,
    streams: live.Streams | None = None,
) -> APIRouter:
    """The console's routes over one node's operations; `stopping` ends live streams."""
    router = APIRouter(prefix="/ui", include_in_schema=False)
    ops = operations
    api: ApiConfig = operations.config.api
    public_url = None if api.public_url is None else str(api.public_url)
    open_streams = streams or live.Streams()

    def render(
        request: Request,
        name: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        return rendered(request, name, ops.config.node.name, session, status, **context)

    def posted(request: Request, session: Session, scope: str) -> dict[str, str]:
        """A form that passed the origin, CSRF and scope checks."""
        signin.check_origin(request, public_url)
        fields = signin.form(request)
        signin.check_csrf(fields, session.csrf)
        if not session.token.may(scope):
            raise HTTPException(
                403, f"this needs the {scope} scope; you signed in with {session.token.scope}"
            )
        return fields

    def done(target: str) -> RedirectResponse:
        return RedirectResponse(target, status_code=303)

    def refused(request: Request, session: Session, problem: str, status: int) -> HTMLResponse:
        return render(request, "problem.html", session, problem=problem, status=status)

    def attempt(request: Request, session: Session, action: Callable[[], Response]) -> Response:
        """Carry out one form's operation; a refusal is a page saying why."""
        try:
            return action()
        except ValidationError as error:
            return refused(request, session, problems(error), 422)
        except Invalid as error:
            return refused(request, session, str(error), 422)
        except NotFound as error:
            return refused(request, session, str(error), 404)

    def tokens_page(request: Request, session: Session, **shown: Any) -> HTMLResponse:
        if not session.token.may("admin"):
            raise HTTPException(403, "tokens need the admin scope")
        context = {"created": None, "link": None, **shown}
        return render(
            request, "tokens.html", session, tokens=ops.tokens(), scopes=SCOPES, **context
        )

    def ledger_page(request: Request, session: Session, **shown: Any) -> HTMLResponse:
        context = {"verdict": None, **shown}
        return render(
            request,
            "ledger.html",
            session,
            head=ops.head(),
            checks=ops.checks(),
            anchored=ops.config.ledger.anchored,
            **context,
        )

    # Sign-in and sign-out.

    def with_login_secret(request: Request, response: HTMLResponse, secret: str) -> HTMLResponse:
        """A sign-in form's answer, with the cookie its post must repeat the secret of."""
        signin.set_cookie(
            response,
            signin.LOGIN_COOKIE,
            secret,
            600,
            secure_only=signin.secure(request, public_url),
        )
        return response

    @router.get("/login")
    def login_form(request: Request, next: str | None = None, failed: bool = False) -> HTMLResponse:
        secret = signin.new_login_secret()
        response = render(
            request,
            "login.html",
            None,
            csrf=secret,
            next=signin.safe_next(next),
            failed=failed,
            status=401 if failed else 200,
        )
        return with_login_secret(request, response, secret)

    def start_session(request: Request, token_id: str, target: str) -> RedirectResponse:
        try:
            value, _ = sessions.open_session(ops.engine, token_id, api.session_lifetime)
        except LookupError:
            return done("/ui/login?failed=1")
        response = done(signin.safe_next(target))
        signin.set_cookie(
            response,
            signin.COOKIE,
            value,
            api.session_lifetime // 1_000_000,
            secure_only=signin.secure(request, public_url),
        )
        response.delete_cookie(signin.LOGIN_COOKIE, path="/ui")
        return response

    def login_secret_matches(request: Request, fields: dict[str, str]) -> bool:
        expected = request.cookies.get(signin.LOGIN_COOKIE, "")
        given = fields.get("csrf", "")
        return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())

    @router.post("/login")
    def login(request: Request) -> Response:
        signin.check_origin(request, public_url)
        fields = signin.form(request)
        if not login_secret_matches(request, fields):
            raise HTTPException(403, "the sign-in form's CSRF token is missing or wrong: reload it")
        token = tokens.authenticate(ops.engine, fields.get("token", "").strip())
        if token is None:
            return render(
                request,
                "login.html",
                None,
                csrf=fields.get("csrf", ""),
                next=signin.safe_next(fields.get("next")),
                failed=True,
                status=401,
            )
        return start_session(request, token.id, fields.get("next", "/ui/"))

    @router.get("/login/link/{code}")
    def link_form(request: Request, code: str) -> HTMLResponse:
        # Redeemed by the button's post, not here: a link preview or scanner that fetches
        # the URL must not use up the link.
        token = sessions.link_token(ops.engine, code)
        if token is None:
            return render(request, "link.html", None, csrf="", code="", used=True, status=401)
        secret = signin.new_login_secret()
        response = render(request, "link.html", None, csrf=secret, code=code, signs_in_as=token)
        return with_login_secret(request, response, secret)

    @router.post("/login/link/{code}")
    def redeem_link(request: Request, code: str) -> Response:
        signin.check_origin(request, public_url)
        fields = signin.form(request)
        if not login_secret_matches(request, fields):
            raise HTTPException(403, "the sign-in form's CSRF token is missing or wrong: reload it")
        token_id = sessions.redeem(ops.engine, code)
        if token_id is None:
            return render(request, "link.html", None, csrf="", code="", used=True, status=401)
        return start_session(request, token_id, "/ui/")

    @router.post("/logout")
    def logout(request: Request, session: Signed) -> Response:
        posted(request, session, "read")
        sessions.end(ops.engine, session.cookie)
        response = done("/ui/login")
        response.delete_cookie(signin.COOKIE, path="/ui")
        return response

    @router.get("/static/console.js")
    def script(_: Signed) -> Response:
        return Response(SCRIPT, media_type="text/javascript")

    # Overview and the live stream.

    @router.get("/")
    def overview(request: Request, session: Signed) -> HTMLResponse:
        # The head first: the live stream starts after it, so a hit recorded meanwhile is
        # streamed rather than missed (and not listed twice).
        summary = ops.overview()
        after = summary.head.seq
        recent = ops.timeline(Filters(types=["hit"], last=RECENT_HITS))
        return render(
            request,
            "overview.html",
            session,
            overview=summary,
            recent=[event for event in recent[::-1] if event.seq <= after],
            after=after,
        )

    @router.get("/live")
    async def live_rows(
        request: Request,
        session: Signed,
        after: Annotated[int, Query(ge=0, lt=2**63)] = 0,
        sandbox: str | None = None,
        only_hits: bool = False,
    ) -> StreamingResponse:
        # A reconnecting browser says the last row it got: it resumes there, not at `after`.
        resumed = request.headers.get("last-event-id", "")
        if resumed.isdigit() and len(resumed) < 19:
            after = max(after, int(resumed))
        filters = Filters(sandbox=sandbox, after=after, types=["hit"] if only_hits else None)
        return StreamingResponse(
            live.stream(
                ops, ops.engine, session.cookie, session.token.id, filters, open_streams, stopping
            ),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    # Sandboxes, incidents and alerts.

    @router.get("/sandboxes")
    def sandbox_list(request: Request, session: Signed) -> HTMLResponse:
        return render(request, "sandboxes.html", session, sandboxes=ops.sandboxes())

    def filters_of(request: Request, sandbox: str) -> tuple[Filters, dict[str, str]]:
        asked = {
            key: value
            for key in ("since", "until", "protocol", "canary", "source")
            if (value := request.query_params.get(key, "").strip())
        }
        try:
            return Filters(sandbox=sandbox, **asked), asked  # type: ignore[arg-type]
        except ValidationError as error:
            raise HTTPException(422, problems(error)) from None

    @router.get("/sandboxes/{sandbox:path}")
    def sandbox_page(
        request: Request, sandbox: str, session: Signed, all: bool = False
    ) -> HTMLResponse:
        filters, asked = filters_of(request, sandbox)
        head = ops.head().seq
        events = ops.timeline(filters if all else filters.model_copy(update={"last": PAGE_EVENTS}))
        return render(
            request,
            "sandbox.html",
            session,
            sandbox=sandbox,
            asked=asked,
            protocols=PROTOCOLS,
            events=events,
            incidents=ops.incidents(Filters(sandbox=sandbox, last=PAGE_INCIDENTS)),
            incidents_cap=PAGE_INCIDENTS,
            canaries=ops.canaries(sandbox),
            after=max([head, *(event.seq for event in events)]),
            live=not asked,
            cut=not all and len(events) == PAGE_EVENTS,
        )

    @router.get("/export")
    def sandbox_export(request: Request, sandbox: str, _: Signed, format: str = "json") -> Response:
        filters, _asked = filters_of(request, sandbox)
        chunks = ops.timeline_chunks(filters)
        name = f"timeline-{''.join(c if c.isascii() and (c.isalnum() or c in '-_.') else '_' for c in sandbox)}"
        if format == "csv":
            body, media, suffix = output.csv_chunks(chunks), "text/csv", "csv"
        else:
            body, media, suffix = output.json_chunks(chunks), "application/json", "json"
        return StreamingResponse(
            body,
            media_type=media,
            headers={"content-disposition": f'attachment; filename="{name}.{suffix}"'},
        )

    @router.get("/incidents/{incident_id}")
    def incident_page(request: Request, incident_id: str, session: Signed) -> Response:
        def shown() -> Response:
            found = ops.incident(incident_id)
            alerts = {alert.id: alert for alert in ops.alerts()}
            return render(
                request,
                "incident.html",
                session,
                incident=found,
                events=found.events,
                cut=found.events_cut,
                alerts=[alerts[a] for a in found.alerts if a in alerts],
            )

        return attempt(request, session, shown)

    @router.get("/alerts")
    def alert_list(request: Request, session: Signed, open: bool = False) -> HTMLResponse:
        return render(request, "alerts.html", session, alerts=ops.alerts(open), open_only=open)

    @router.get("/alerts/{alert_id}")
    def alert_page(alert_id: str, _: Signed) -> RedirectResponse:
        """Where a page's link lands: the incident the alert was opened for."""
        alert = next((a for a in ops.alerts() if a.id == alert_id), None)
        if alert is None:
            raise HTTPException(404, f"no alert {alert_id}")
        try:
            found = ops.incident(f"in-{alert.first_hit_seq}")
        except NotFound:
            return done(f"/ui/sandboxes/{quote(alert.sandbox, safe='')}")
        return done(f"/ui/incidents/{found.id}#alert-{alert_id}")

    @router.post("/alerts/{alert_id}/{action}")
    def settle(request: Request, alert_id: str, action: str, session: Signed) -> Response:
        fields = posted(request, session, "ack")
        settling = {"ack": ops.ack, "resolve": ops.resolve}.get(action)
        if settling is None:
            raise HTTPException(404, f"no action {action}")

        def settled() -> Response:
            settling(alert_id, ActorRequest(by=session.token.name))
            return done(signin.safe_next(fields.get("back") or "/ui/alerts"))

        return attempt(request, session, settled)

    # Canaries.

    @router.get("/canaries")
    def canary_list(
        request: Request,
        session: Signed,
        sandbox: str | None = None,
        kind: str | None = None,
        state: str | None = None,
        hit: str | None = None,
    ) -> HTMLResponse:
        shown = ops.canaries(sandbox or None, kind if kind in KINDS else None)
        if state in STATES:
            shown = [c for c in shown if c.state == state]
        if hit in ("hit", "unhit"):
            shown = [c for c in shown if (c.hits > 0) == (hit == "hit")]
        return render(
            request,
            "canaries.html",
            session,
            canaries=shown,
            asked={
                "sandbox": sandbox or "",
                "kind": kind or "",
                "state": state or "",
                "hit": hit or "",
            },
            kinds=KINDS,
            states=STATES,
            severities=SEVERITIES,
            formats=CREDENTIAL_FORMATS,
        )

    @router.post("/canaries")
    def mint_form(request: Request, session: Signed) -> Response:
        fields = posted(request, session, "mint")

        def minted() -> Response:
            asked = MintRequest(
                kind=fields.get("kind", ""),  # type: ignore[arg-type]
                sandbox=fields.get("sandbox", ""),
                location=fields.get("location", ""),
                note=fields.get("note", ""),
                severity=fields.get("severity") or "high",  # type: ignore[arg-type]
                format=fields.get("format") or None,  # type: ignore[arg-type]
            )
            return render(request, "minted.html", session, canary=ops.mint(asked))

        return attempt(request, session, minted)

    @router.post("/canaries/{canary_id}/retire")
    def retire_form(request: Request, canary_id: str, session: Signed) -> Response:
        posted(request, session, "mint")

        def retired() -> Response:
            ops.retire(canary_id, ActorRequest(by=session.token.name))
            return done("/ui/canaries")

        return attempt(request, session, retired)

    @router.post("/plant")
    def plant_form(request: Request, session: Signed) -> Response:
        fields = posted(request, session, "mint")

        def planted() -> Response:
            bundle = ops.plant(PlantRequest(sandbox=fields.get("sandbox", "")))
            return Response(
                output.plant_archive(bundle),
                media_type="application/gzip",
                headers={"content-disposition": 'attachment; filename="plant-bundle.tar.gz"'},
            )

        return attempt(request, session, planted)

    # Ledger and tokens.

    @router.get("/ledger")
    def ledger_view(request: Request, session: Signed) -> HTMLResponse:
        return ledger_page(request, session)

    @router.post("/ledger/verify")
    def verify_form(request: Request, session: Signed) -> HTMLResponse:
        posted(request, session, "admin")
        return ledger_page(request, session, verdict=ops.verify())

    @router.post("/ledger/anchor")
    def anchor_form(request: Request, session: Signed) -> Response:
        posted(request, session, "admin")

        def anchored() -> Response:
            ops.anchor()
            return done("/ui/ledger")

        return attempt(request, session, anchored)

    @router.get("/ledger/export")
    def ledger_export(_: Signed) -> StreamingResponse:
        return StreamingResponse(
            ops.ledger_export(),
            media_type="application/x-ndjson",
            headers={"content-disposition": 'attachment; filename="ledger.jsonl"'},
        )

    @router.get("/tokens")
    def token_list(request: Request, session: Signed) -> HTMLResponse:
        return tokens_page(request, session)

    @router.post("/tokens")
    def token_create(request: Request, session: Signed) -> Response:
        fields = posted(request, session, "admin")

        def created() -> Response:
            asked = TokenRequest(name=fields.get("name", ""), scope=fields.get("scope", ""))  # type: ignore[arg-type]
            return tokens_page(request, session, created=ops.create_token(asked))

        return attempt(request, session, created)

    @router.post("/tokens/{token_id}/{action}")
    def token_action(request: Request, token_id: str, action: str, session: Signed) -> Response:
        posted(request, session, "admin")

        def revoked() -> Response:
            ops.revoke_token(token_id)
            return done("/ui/tokens")

        def linked() -> Response:
            return tokens_page(request, session, link=ops.login_link(token_id))

        acting = {"revoke": revoked, "login-link": linked}.get(action)
        if acting is None:
            raise HTTPException(404, f"no action {action}")
        return attempt(request, session, acting)

    return router
