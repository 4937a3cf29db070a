"""The web console over real HTTP: what a visitor without a session gets, sessions, CSRF,
scopes, the security headers, downloads and the page links, on SQLite and PostgreSQL.

What a person sees and does in a real browser is in test_console_browser.py.
"""

import asyncio
import io
import json
import re
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dns.asyncquery
import dns.message
import httpx
import pytest

from listeners.base import hit_event
from oobwatch import output
from oobwatch.config import load
from oobwatch.console import live
from oobwatch.console.pages import PAGE_EVENTS
from oobwatch.operations import LocalOperations
from oobwatch.serve import Node, start
from oobwatch.views import EventView, Filters
from store import ledger, tokens
from support import Receiver, node_config, plant_canary, settle

PAGES = [
    "/ui/",
    "/ui/sandboxes",
    "/ui/sandboxes/sbx-c",
    "/ui/incidents/in-1",
    "/ui/alerts",
    "/ui/alerts/al-1",
    "/ui/canaries",
    "/ui/ledger",
    "/ui/ledger/export",
    "/ui/tokens",
    "/ui/export?sandbox=sbx-c&format=csv",
    "/ui/live?after=0",
    "/ui/static/console.js",
]
FORMS = [
    ("/ui/canaries", {"kind": "dns", "sandbox": "sbx-x"}, "mint"),
    ("/ui/plant", {"sandbox": "sbx-x"}, "mint"),
    ("/ui/canaries/{canary}/retire", {}, "mint"),
    ("/ui/alerts/{alert}/ack", {}, "ack"),
    ("/ui/alerts/{alert}/resolve", {}, "ack"),
    ("/ui/ledger/verify", {}, "admin"),
    ("/ui/tokens", {"name": "made-in-console", "scope": "read"}, "admin"),
    ("/ui/tokens/{token}/login-link", {}, "admin"),
    ("/ui/tokens/{token}/revoke", {}, "admin"),
]


def _config_text(tmp_path: Path, receiver: Receiver, store_url: str, api: str = "") -> Path:
    path = node_config(tmp_path, receiver.url(), store_url=store_url)
    text = path.read_text().replace("[api]\nport = 0\n", f"[api]\nport = 0\n{api}\n")
    path.write_text(text.replace("[alerts]", "[heartbeat]\nenabled = false\n[alerts]"))
    return path


def ops(node: Node) -> LocalOperations:
    return LocalOperations(node.config, node.engine)


@pytest.fixture
async def node(tmp_path: Path, receiver: Receiver, store_url: str) -> AsyncIterator[Node]:
    running = await start(load(_config_text(tmp_path, receiver, store_url)))
    yield running
    await running.stop()


def base(node: Node) -> str:
    assert node.api is not None
    host, port = node.api.addresses[0]
    return f"http://{host}:{port}"


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', page)
    assert found is not None, page
    return found.group(1)


def _keep(client: httpx.AsyncClient, response: httpx.Response) -> None:
    """Keep the console's cookies even when Secure: TLS ends at a proxy in front of the node."""
    for header in response.headers.get_list("set-cookie"):
        found = re.match(r"(oobwatch_\w+)=([^;]*)", header)
        if found is not None and found.group(2) and "Max-Age=0" not in header:
            client.cookies.set(found.group(1), found.group(2), path="/ui")


async def sign_in(client: httpx.AsyncClient, token: str) -> str:
    """Sign in through the form; returns the session's CSRF secret."""
    form = await client.get("/ui/login")
    _keep(client, form)
    signed = await client.post(
        "/ui/login", data={"csrf": _csrf(form.text), "token": token, "next": "/ui/"}
    )
    assert signed.status_code == 303, signed.text
    _keep(client, signed)
    return _csrf((await client.get("/ui/")).text)


def new_token(node: Node, scope: str, name: str | None = None) -> tuple[tokens.Token, str]:
    return tokens.create(node.engine, name or f"console-{scope}", scope)


async def trip(node: Node, receiver: Receiver, client: httpx.AsyncClient) -> dict[str, str]:
    """A DNS canary minted in the console and hit for real; the ids the forms need."""
    csrf = _csrf((await client.get("/ui/canaries")).text)
    minted = await client.post(
        "/ui/canaries", data={"csrf": csrf, "kind": "dns", "sandbox": "sbx-c"}
    )
    assert minted.status_code == 200, minted.text
    value = re.search(r'<code class="value">([^<]+)</code>', minted.text)
    assert value is not None
    await dns.asyncquery.udp(
        dns.message.make_query(value.group(1), "A"),
        "127.0.0.1",
        port=node.listeners["dns"].addresses[0][1],
        timeout=5,
    )
    await settle(lambda: bool(ops(node).alerts()))
    [alert] = ops(node).alerts()
    # Its page, delivered by this loop: waited for without blocking it.
    await settle(lambda: any(alert.id.encode() in r.body for r in receiver.requests))
    spare, _ = new_token(node, "read", "spare")
    return {"canary": alert.canary_id, "alert": alert.id, "token": spare.id}


async def test_nothing_is_shown_without_a_session(node: Node) -> None:
    async with httpx.AsyncClient(base_url=base(node)) as client:
        root = await client.get("/")
        assert root.status_code == 307
        assert root.headers["location"] == "/ui/"
        for path in PAGES:
            response = await client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/ui/login?next=")
            assert "oobwatch" not in response.text.lower() or "sign in" in response.text.lower()
        for path, fields, _ in FORMS:
            target = path.format(canary="cn-1", alert="al-1", token="t1")
            assert (await client.post(target, data=fields)).status_code == 401, target
        # The page asked for comes back as it was sent: `a?b` is one sandbox, not a query.
        asked = await client.get("/ui/sandboxes/a%3Fb?protocol=dns")
        target = parse_qs(urlsplit(asked.headers["location"]).query)["next"]
        assert target == ["/ui/sandboxes/a%3Fb?protocol=dns"]
        # A bearer token is for the JSON API only: it does not open a console page.
        _, text = new_token(node, "admin")
        with_bearer = await client.get("/ui/", headers={"Authorization": f"Bearer {text}"})
        assert with_bearer.status_code == 303
        login = await client.get("/ui/login")
        assert login.status_code == 200
        assert 'name="token"' in login.text
        assert "<script" not in login.text


async def test_every_console_answer_carries_the_security_headers(node: Node) -> None:
    _, text = new_token(node, "admin")
    async with httpx.AsyncClient(base_url=base(node)) as client:
        answers = [await client.get("/ui/login"), await client.get("/ui/")]
        await sign_in(client, text)
        answers += [await client.get(path) for path in ("/ui/", "/ui/canaries", "/ui/nowhere")]
    for answer in answers:
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "same-origin"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"


async def test_signing_in_sets_a_strict_session_cookie_and_signing_out_ends_it(
    node: Node,
) -> None:
    _, text = new_token(node, "read")
    async with httpx.AsyncClient(base_url=base(node)) as client:
        form = await client.get("/ui/login")
        wrong = await client.post(
            "/ui/login", data={"csrf": _csrf(form.text), "token": "oob_nope_nope"}
        )
        assert wrong.status_code == 401
        assert "not valid" in wrong.text
        assert "oobwatch_session" not in wrong.headers.get("set-cookie", "")
        form = await client.get("/ui/login")
        signed = await client.post(
            "/ui/login", data={"csrf": _csrf(form.text), "token": text, "next": "/ui/alerts"}
        )
        assert signed.status_code == 303
        assert signed.headers["location"] == "/ui/alerts"
        cookie = next(
            c for c in signed.headers.get_list("set-cookie") if c.startswith("oobwatch_session=")
        )
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/ui" in cookie
        assert "Max-Age=28800" in cookie
        assert "Secure" not in cookie  # plain HTTP here; see the public_url test
        value = client.cookies["oobwatch_session"]
        csrf = _csrf((await client.get("/ui/")).text)
        # The session cookie is for the console only: the JSON API wants a bearer token.
        assert (await client.get("/health")).status_code == 401
        out = await client.post("/ui/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert out.headers["location"] == "/ui/login"
    # The cookie, replayed after signing out, opens nothing: the session is gone in the store.
    async with httpx.AsyncClient(
        base_url=base(node), cookies={"oobwatch_session": value}
    ) as replay:
        assert (await replay.get("/ui/")).status_code == 303


async def test_an_open_redirect_after_sign_in_is_refused(node: Node) -> None:
    _, text = new_token(node, "read")
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example", "/ui/\x01x"):
        async with httpx.AsyncClient(base_url=base(node)) as client:
            form = await client.get("/ui/login")
            signed = await client.post(
                "/ui/login", data={"csrf": _csrf(form.text), "token": text, "next": target}
            )
            assert signed.headers["location"] == "/ui/", target


async def test_forms_without_their_csrf_token_or_from_another_site_are_refused(
    node: Node, receiver: Receiver
) -> None:
    _, text = new_token(node, "admin")
    async with httpx.AsyncClient(base_url=base(node)) as client:
        # The sign-in form's own secret: missing, or not the cookie's.
        assert (await client.post("/ui/login", data={"token": text})).status_code == 403
        await client.get("/ui/login")
        assert (
            await client.post("/ui/login", data={"token": text, "csrf": "guess"})
        ).status_code == 403
        csrf = await sign_in(client, text)
        ids = await trip(node, receiver, client)
        for path, fields, _ in FORMS:
            target = path.format(**ids)
            assert (await client.post(target, data=fields)).status_code == 403, target
            forged = {**fields, "csrf": "x" * len(csrf)}
            assert (await client.post(target, data=forged)).status_code == 403, target
            elsewhere = await client.post(
                target, data={**fields, "csrf": csrf}, headers={"Origin": "https://evil.example"}
            )
            assert elsewhere.status_code == 403, target
        # Nothing was done: the alert is open, the token is live, no canary minted in sbx-x.
        [alert] = ops(node).alerts()
        assert alert.status == "open"
        assert tokens.find(node.engine, ids["token"]).revoked_us is None  # type: ignore[union-attr]
        assert "sbx-x" not in (await client.get("/ui/sandboxes")).text


@pytest.mark.parametrize("scope", ["read", "mint", "ack"])
async def test_a_session_may_post_only_what_its_token_scope_allows(
    node: Node, receiver: Receiver, scope: str
) -> None:
    _, admin = new_token(node, "admin")
    _, limited = new_token(node, scope)
    async with httpx.AsyncClient(base_url=base(node)) as setup:
        await sign_in(setup, admin)
        ids = await trip(node, receiver, setup)
    async with httpx.AsyncClient(base_url=base(node)) as client:
        csrf = await sign_in(client, limited)
        tokens_page = await client.get("/ui/tokens")
        assert tokens_page.status_code == (200 if scope == "admin" else 403)
        for path, fields, needed in FORMS:
            response = await client.post(path.format(**ids), data={**fields, "csrf": csrf})
            allowed = tokens.GRANTS[needed]
            if scope in allowed:
                assert response.status_code in (200, 303), (path, scope, response.text)
            else:
                assert response.status_code == 403, (path, scope)


async def test_a_revoked_token_signs_its_sessions_out_and_a_rotated_one_too(node: Node) -> None:
    revoked, revoked_text = new_token(node, "read", "to-revoke")
    rotated, rotated_text = new_token(node, "read", "to-rotate")
    _, admin = new_token(node, "admin")
    async with (
        httpx.AsyncClient(base_url=base(node)) as one,
        httpx.AsyncClient(base_url=base(node)) as two,
        httpx.AsyncClient(base_url=base(node)) as boss,
    ):
        await sign_in(one, revoked_text)
        await sign_in(two, rotated_text)
        csrf = await sign_in(boss, admin)
        assert (await one.get("/ui/")).status_code == 200
        await boss.post(f"/ui/tokens/{revoked.id}/revoke", data={"csrf": csrf})
        assert (await one.get("/ui/")).status_code == 303
        ops(node).rotate_token(rotated.id)
        assert (await two.get("/ui/")).status_code == 303
        assert (await boss.get("/ui/")).status_code == 200


async def test_a_session_expires(tmp_path: Path, receiver: Receiver, store_url: str) -> None:
    config = load(_config_text(tmp_path, receiver, store_url, 'session_lifetime = "1s"'))
    running = await start(config)
    try:
        _, text = new_token(running, "read")
        async with httpx.AsyncClient(base_url=base(running)) as client:
            await sign_in(client, text)
            await asyncio.sleep(1.2)
            assert (await client.get("/ui/")).status_code == 303
    finally:
        await running.stop()


async def test_a_login_link_signs_in_once(node: Node) -> None:
    token, _ = new_token(node, "ack")
    link = ops(node).login_link(token.id)
    # The node's port is 0 in its config: the link's path is what the test can open.
    path = urlsplit(link.url).path
    assert path.startswith("/ui/login/link/")
    async with httpx.AsyncClient(base_url=base(node)) as first:
        # Fetching the link (a chat preview, a mail scanner) does not use it up.
        for _ in range(2):
            shown = await first.get(path)
            assert shown.status_code == 200
        assert f"as token <strong>console-ack</strong> ({token.id}, scope ack)" in shown.text
        used = await first.post(path, data={"csrf": _csrf(shown.text)})
        assert used.status_code == 303
        page = await first.get("/ui/")
        assert page.status_code == 200
        assert "console-ack (ack)" in page.text
    async with httpx.AsyncClient(base_url=base(node)) as second:
        shown = await second.get(path)
        assert shown.status_code == 401
        assert "used already" in shown.text
        form = await second.get("/ui/login")
        again = await second.post(path, data={"csrf": _csrf(form.text)})
        assert again.status_code == 401
        assert "used already" in again.text
        assert (await second.get("/ui/")).status_code == 303
    # A link for a token revoked after it was made signs nobody in.
    other, _ = new_token(node, "read", "later-revoked")
    late = urlsplit(ops(node).login_link(other.id).url).path
    tokens.revoke(node.engine, other.id)
    async with httpx.AsyncClient(base_url=base(node)) as third:
        assert (await third.get(late)).status_code == 401
        form = await third.get("/ui/login")
        assert (await third.post(late, data={"csrf": _csrf(form.text)})).status_code == 303
        assert (await third.get("/ui/")).status_code == 303


async def test_the_plant_bundle_downloads_as_the_files_plant_writes(node: Node) -> None:
    _, text = new_token(node, "mint")
    async with httpx.AsyncClient(base_url=base(node)) as client:
        csrf = await sign_in(client, text)
        answer = await client.post("/ui/plant", data={"csrf": csrf, "sandbox": "sbx-bundle"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/gzip"
    assert "attachment" in answer.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as archive:
        members = {member.name: member for member in archive.getmembers()}
        manifest = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        files = {
            name.removeprefix("home/"): archive.extractfile(member).read().decode()  # type: ignore[union-attr]
            for name, member in members.items()
            if name.startswith("home/")
        }
    assert set(members) == {"manifest.json", *(f"home/{path}" for path in files)}
    assert all(member.mode == 0o600 and member.isfile() for member in members.values())
    planted = ops(node).canaries("sbx-bundle")
    assert {c["id"] for c in manifest} == {c.id for c in planted}
    expected: dict[str, str] = {}
    for canary in planted:
        expected.update(canary.files or {})
    assert {path: text for path, text in files.items() if path in expected} == expected
    assert "project/CONTACTS.md" in files
    assert all(canary.token in json.dumps(files) for canary in planted)


async def test_the_timeline_export_is_the_clis(node: Node, receiver: Receiver) -> None:
    _, text = new_token(node, "admin")
    async with httpx.AsyncClient(base_url=base(node)) as client:
        await sign_in(client, text)
        await trip(node, receiver, client)
        as_csv = await client.get("/ui/export?sandbox=sbx-c&format=csv&protocol=dns")
        as_json = await client.get("/ui/export?sandbox=sbx-c&format=json")
        bad = await client.get("/ui/export?sandbox=sbx-c&source=nonsense")
        ledger_lines = (await client.get("/ui/ledger/export")).text.splitlines()
    events = ops(node).timeline(Filters(sandbox="sbx-c", protocol="dns"))
    assert as_csv.text == output.timeline_csv(events)
    assert "attachment" in as_csv.headers["content-disposition"]
    assert [e["seq"] for e in as_json.json()] == [
        e.seq for e in ops(node).timeline(Filters(sandbox="sbx-c"))
    ]
    assert bad.status_code == 422
    assert ledger_lines == "".join(ops(node).ledger_export()).splitlines()


async def test_a_pages_link_opens_its_incident(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    config = load(
        _config_text(tmp_path, receiver, store_url, 'public_url = "https://oob.example.test/"')
    )
    running = await start(config)
    try:
        _, text = new_token(running, "admin")
        async with httpx.AsyncClient(base_url=base(running)) as client:
            form = await client.get("/ui/login")
            assert "Secure" in form.headers["set-cookie"]
            await sign_in(client, text)
            ids = await trip(running, receiver, client)
            [page] = [r.body.decode() for r in receiver.requests if ids["alert"].encode() in r.body]
            link = f"https://oob.example.test/ui/alerts/{ids['alert']}"
            assert link in page
            opened = await client.get(link.removeprefix("https://oob.example.test"))
            assert opened.status_code == 303
            assert re.fullmatch(r"/ui/incidents/in-\d+#alert-al-\w+", opened.headers["location"])
            incident = await client.get(opened.headers["location"].partition("#")[0])
            assert f'id="alert-{ids["alert"]}"' in incident.text
    finally:
        await running.stop()


async def test_live_rows_arrive_and_streams_are_capped(node: Node, receiver: Receiver) -> None:
    _, text = new_token(node, "admin")
    async with httpx.AsyncClient(base_url=base(node), timeout=10) as client:
        await sign_in(client, text)
        head = ops(node).head().seq
        async with client.stream("GET", f"/ui/live?after={head}&only_hits=true") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            await trip(node, receiver, client)
            lines = stream.aiter_lines()
            async with asyncio.timeout(10):
                async for line in lines:
                    if line.startswith("data: ") and '"hit"' in line:
                        row = json.loads(line.removeprefix("data: "))
                        break
        assert row["sandbox"] == "sbx-c"
        assert row["protocol"] == "dns"
    # Over a cap a stream says so and ends, holding nothing: one token's cap, then the node's.
    full = live.Streams(cap=2, per_token=1)

    def opened(token_id: str) -> AsyncIterator[str]:
        return live.stream(ops(node), node.engine, "", token_id, Filters(), full, lambda: False)

    held = opened("tk-a")
    assert (await anext(held)).startswith("retry:")
    assert [text async for text in opened("tk-a")] == ["event: busy\ndata: {}\n\n"]
    other = opened("tk-b")
    assert (await anext(other)).startswith("retry:")
    assert [text async for text in opened("tk-c")] == ["event: busy\ndata: {}\n\n"]
    assert full.open == {"tk-a": 1, "tk-b": 1}
    await held.aclose()
    await other.aclose()
    assert full.open == {}


async def test_a_flood_streams_its_newest_rows_and_says_it_skipped(node: Node) -> None:
    canary = plant_canary(node.engine, "dns", sandbox="sbx-flood")
    head = ops(node).head().seq
    with node.engine.begin() as connection:
        ledger.append(
            connection,
            [
                hit_event(canary, protocol="dns", peer=("198.51.100.9", 53), node="n1", evidence={})
                for _ in range(live.MAX_ROWS + 5)
            ],
        )
    rows = live.stream(
        ops(node), node.engine, "", "tk-a", Filters(after=head), live.Streams(), lambda: False
    )
    assert (await anext(rows)).startswith("retry:")
    assert await anext(rows) == "event: skipped\ndata: {}\n\n"
    sent = [await anext(rows) for _ in range(live.MAX_ROWS)]
    await rows.aclose()
    seqs = [int(text.partition("\n")[0].removeprefix("id: ")) for text in sent]
    assert seqs == list(range(head + 6, head + live.MAX_ROWS + 6))


async def test_a_big_sandbox_page_shows_its_newest_events_and_all_on_request(
    node: Node,
) -> None:
    canary = plant_canary(node.engine, "dns", sandbox="sbx-big")
    with node.engine.begin() as connection:
        ledger.append(
            connection,
            [
                hit_event(canary, protocol="dns", peer=("198.51.100.9", 53), node="n1", evidence={})
                for _ in range(PAGE_EVENTS + 100)
            ],
        )
    _, text = new_token(node, "read")
    async with httpx.AsyncClient(base_url=base(node), timeout=30) as client:
        await sign_in(client, text)
        cut = (await client.get("/ui/sandboxes/sbx-big")).text
        whole = (await client.get("/ui/sandboxes/sbx-big?all=true")).text
    assert cut.count('<tr class="type-') == PAGE_EVENTS
    assert 'id="cut"' in cut
    # Every hit, and the canary_minted row before them.
    assert whole.count('<tr class="type-hit"') == PAGE_EVENTS + 100
    assert 'id="cut"' not in whole


def test_a_live_row_shows_an_escaped_sandbox_and_links_to_the_real_one() -> None:
    entry = ledger.Entry(
        seq=7,
        time_us=1_790_000_000_000_000,
        type="hit",
        canary_id="cn-1",
        sandbox="sbx\x1b[2J\u202e",
        protocol="dns",
        source="198.51.100.7",
        node="n1",
        data="{}",
        prev_hash="0" * 64,
        hash="1" * 64,
    )
    message = live.as_message(EventView.of(entry))
    row = json.loads(message.partition("data: ")[2])
    assert row["sandbox_name"] == "sbx\x1b[2J\u202e"
    assert "\x1b" not in row["sandbox"]
    assert "\u202e" not in row["sandbox"]
