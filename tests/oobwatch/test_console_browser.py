"""The console in a real browser: Debian's Chromium, driven by Playwright, against a real
`oobwatch serve` process, on SQLite and PostgreSQL.

A responder signs in, sees a hit arrive live after a real DNS query, opens its
incident and acks its alert (the ack reaches the pager like the CLI's); whoever
seeds canaries mints one and downloads a plant bundle; an admin revokes a
token and its holder is signed out. Canaries tripped with hostile strings
(script tags, event handlers, `javascript:` links, template syntax, terminal
escapes, direction overrides) are shown as text, and a sentinel proves none of
them ran. Every page is saved as a screenshot at desktop and phone width into
`artifacts/console/` (not committed).
"""

import contextlib
import io
import json
import os
import shutil
import smtplib
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.message
import dns.name
import dns.query
import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from oobwatch.config import load
from oobwatch.operations import LocalOperations
from oobwatch.views import MintRequest, PlantRequest
from store import tokens
from support import Receiver, Serving, node_config

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("OOBWATCH_ARTIFACTS", REPO / "artifacts")) / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root and on a closed network: no sandbox (root), none of Chromium's own traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"viewport": {"width": 1280, "height": 900}, "color_scheme": "light"}
PHONE = {"viewport": {"width": 360, "height": 780}, "color_scheme": "dark", "is_mobile": True}
# What a page's scripts could set or call if any hostile string ran.
SENTINEL = """
window.__ran = 0;
window.__violations = 0;
document.addEventListener("securitypolicyviolation", () => { window.__violations += 1; });
"""
SCRIPT = "<script>window.__ran=1</script>"
IMAGE = "<img src=x onerror=window.__ran=2>"
SVG = "<svg/onload=window.__ran=3>"
LINK = "javascript:window.__ran=4"
TEMPLATE = "{{7*7}}"
TERMINAL = "\x1b[31mred\x1b[0m"
OVERRIDE = "\u202egnp.exe"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed; `make test` installs it with apt-get")
        pytest.skip("Chromium is not installed")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Console:
    """A served node, its store, and where its console is."""

    def __init__(self, serving: Serving, config: Path) -> None:
        self.serving = serving
        self.config = load(config)
        self.ops = LocalOperations(self.config)
        self.url = f"http://127.0.0.1:{serving.ports['api']}"

    def token(self, scope: str, name: str) -> tuple[tokens.Token, str]:
        return tokens.create(self.ops.engine, name, scope)

    def port(self, listener: str) -> int:
        return self.serving.ports[listener]


@contextlib.contextmanager
def serving(tmp_path: Path, receiver: Receiver, store_url: str) -> Iterator[Console]:
    path = node_config(
        tmp_path,
        receiver.url(),
        store_url=store_url,
        extra='[heartbeat]\ninterval = "2s"\n[ledger]\nanchor_file = "anchors.jsonl"',
    )
    served = Serving(path).start()
    console = Console(served, path)
    try:
        yield console
    finally:
        served.stop()
        console.ops.engine.dispose()


@pytest.fixture
def console(tmp_path: Path, receiver: Receiver, store_url: str) -> Iterator[Console]:
    """On SQLite and on PostgreSQL."""
    with serving(tmp_path, receiver, store_url) as served:
        yield served


@pytest.fixture
def sqlite_console(tmp_path: Path, receiver: Receiver) -> Iterator[Console]:
    """For what does not depend on the store: rendering, layout."""
    with serving(tmp_path, receiver, f"sqlite:///{tmp_path / 'oobwatch.db'}") as served:
        yield served


def context(browser: Browser, **options: Any) -> BrowserContext:
    made = browser.new_context(accept_downloads=True, **(options or DESKTOP))
    made.add_init_script(SENTINEL)
    made.set_default_timeout(15_000)
    return made


def sign_in(page: Page, console: Console, token: str) -> None:
    page.goto(f"{console.url}/")
    expect(page).to_have_url(f"{console.url}/ui/login?next=%2Fui%2F")
    page.fill("input[name=token]", token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{console.url}/ui/")


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def dns_hit(console: Console, name: dns.name.Name | str) -> None:
    dns.query.udp(
        dns.message.make_query(name, "A"), "127.0.0.1", port=console.port("dns"), timeout=5
    )


def test_a_responder_follows_a_hit_live_acks_it_and_seeds_canaries(
    browser: Browser, console: Console, receiver: Receiver, store_url: str
) -> None:
    store = "postgres" if store_url.startswith("postgresql") else "sqlite"
    _, admin = console.token("admin", "alice")
    ctx = context(browser)
    page = ctx.new_page()
    sign_in(page, console, admin)

    # Mint a DNS canary in the console, then trip it for real while the overview is open.
    page.get_by_role("link", name="Canaries", exact=True).click()
    mint = page.locator("form#mint")
    mint.locator("select[name=kind]").select_option("dns")
    mint.locator("input[name=sandbox]").fill("sbx-live")
    mint.get_by_role("button", name="Mint").click()
    value = page.locator("code.value").inner_text()
    assert value.endswith(".canary.example.test")
    page.get_by_role("link", name="Overview").click()
    hits = page.locator("#hits tbody tr")
    before = hits.count()
    sent = time.monotonic()
    dns_hit(console, f"live.{value}")
    expect(hits).to_have_count(before + 1)
    arrived = time.monotonic() - sent
    newest = hits.first
    expect(newest).to_contain_text(f"live.{value}")
    expect(newest).to_contain_text("sbx-live")
    print(f"\nlive hit shown {arrived * 1000:.0f} ms after the query ({store})")
    assert page.evaluate("window.__ran") == 0

    # Its sandbox, its incident, its alert: ack it, and the pager hears of it.
    newest.get_by_role("link", name="sbx-live").click()
    expect(page.locator("h1")).to_contain_text("sbx-live")
    page.locator("a[href^='/ui/incidents/']").first.click()
    expect(page.locator("h1")).to_contain_text("Incident in-")
    expect(page.locator("table.events")).to_contain_text(f"live.{value}")
    [alert] = console.ops.alerts()
    page.locator(f"#row-{alert.id}").get_by_role("button", name="Ack").click()
    expect(page.locator(f"#row-{alert.id}")).to_contain_text("acknowledged")
    expect(page.locator(f"#row-{alert.id}")).to_contain_text("alice")
    deliveries = receiver.wait_for(2)
    assert any(b'"ack"' in r.body or b"acknowledged" in r.body.lower() for r in deliveries[1:])
    assert console.ops.alerts()[0].status == "acknowledged"

    # Seed: a plant bundle, downloaded.
    page.get_by_role("link", name="Canaries", exact=True).click()
    plant = page.locator("form#plant")
    plant.locator("input[name=sandbox]").fill("sbx-seeded")
    with page.expect_download() as download:
        plant.get_by_role("button", name="Mint and download").click()
    archive = download.value.path().read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as bundle:
        names = bundle.getnames()
        manifest = json.loads(bundle.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert "home/.netrc" in names
    assert {c["sandbox"] for c in manifest} == {"sbx-seeded"}
    page.reload()
    page.locator("#canary-filters input[name=sandbox]").fill("sbx-seeded")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("table.canaries tbody tr")).to_have_count(len(manifest))

    # An admin makes a read token in the console; its holder signs in, is revoked, is out.
    page.get_by_role("link", name="Tokens").click()
    page.locator("#new-token-form input[name=name]").fill("bob")
    page.locator("#new-token-form select[name=scope]").select_option("read")
    page.get_by_role("button", name="Create").click()
    bob_token = page.locator("#new-token").inner_text()
    bob_ctx = context(browser)
    bob = bob_ctx.new_page()
    sign_in(bob, console, bob_token)
    expect(bob.locator("nav")).not_to_contain_text("Tokens")
    bob_id = bob_token.split("_")[1]
    page.locator(f"#token-{bob_id}").get_by_role("button", name="Revoke").click()
    expect(page.locator(f"#token-{bob_id}")).not_to_contain_text("Revoke")
    bob.reload()
    expect(bob).to_have_url(f"{console.url}/ui/login?next=%2Fui%2F")
    # The live view that was open learns it too, within a session check.
    bob_live = bob_ctx.new_page()
    bob_live.goto(f"{console.url}/ui/")
    expect(bob_live).to_have_url(f"{console.url}/ui/login?next=%2Fui%2F")

    # Sign out: the session ends.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{console.url}/ui/login")
    page.goto(f"{console.url}/ui/alerts")
    expect(page).to_have_url(f"{console.url}/ui/login?next=%2Fui%2Falerts")
    assert page.evaluate("window.__violations") == 0
    ctx.close()
    bob_ctx.close()


def _trip_hostile(console: Console) -> dict[str, str]:
    """Trip a DNS, an email and a URL canary with hostile strings; their values."""
    ops = console.ops
    minted = {
        kind: ops.mint(MintRequest(kind=kind, sandbox="sbx-hostile"))  # type: ignore[arg-type]
        for kind in ("dns", "email", "url")
    }
    base = dns.name.from_text(minted["dns"].value)
    dns_hit(console, dns.name.Name([SCRIPT.encode(), TEMPLATE.encode(), *base.labels]))
    # Sent as raw 8-bit text, as a hostile client would, not as encoded words.
    mail = (
        f"From: agent@sbx.internal\r\nTo: {minted['email'].value}\r\n"
        f"Subject: {SCRIPT} {TEMPLATE} {TERMINAL} {OVERRIDE}\r\n\r\n{LINK} {IMAGE}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", console.port("smtp"), local_hostname=IMAGE, timeout=10) as smtp:
        smtp.sendmail("agent@sbx.internal", [minted["email"].value], mail)
    host = minted["url"].value.split("/")[2]
    request = (
        f"GET /{SVG}/{TEMPLATE}?next={LINK} HTTP/1.1\r\nHost: {host}\r\n"
        f"User-Agent: {IMAGE} {LINK} {TEMPLATE}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", console.port("http")), timeout=10) as raw:
        raw.sendall(request.encode())
        while raw.recv(65536):
            pass
    # An agent calling a planted MCP server's tool with hostile arguments.
    mcp = ops.mint(MintRequest(kind="credential", sandbox="sbx-hostile", format="mcp"))
    [server] = json.loads(mcp.value)["mcpServers"].values()
    parts = urlsplit(server["url"])
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": SCRIPT, "arguments": {"query": f"{IMAGE} {TEMPLATE} {LINK}"}},
    }
    answered = httpx.post(
        f"http://127.0.0.1:{console.port('http')}{parts.path}",
        json=call,
        headers={
            **server.get("headers", {}),
            "Host": parts.netloc,
            "Accept": "application/json, text/event-stream",
        },
        timeout=10,
    )
    assert answered.status_code == 200, answered.text
    return {kind: canary.value for kind, canary in minted.items()}


def _assert_inert(page: Page, dialogs: list[str]) -> None:
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    assert page.evaluate("window.__ran") == 0
    assert dialogs == []
    assert page.locator("body img, body svg, body script, a[href^='javascript:']").count() == 0


def test_hostile_strings_are_shown_as_text_and_never_run(
    browser: Browser, sqlite_console: Console
) -> None:
    console = sqlite_console
    _, admin = console.token("read", "reader")
    ctx = context(browser)
    page = ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    sign_in(page, console, admin)
    hits = page.locator("#hits tbody tr")
    before = hits.count()
    _trip_hostile(console)
    # Shown live first, built by the page's script from the stream.
    expect(hits.filter(has_text="/mcp")).to_have_count(1, timeout=20_000)
    assert hits.count() >= before + 4
    # dnslib escapes a dot inside a label: the name is shown as the listener wrote it.
    expect(page.locator("#hits")).to_contain_text(SCRIPT.replace(".", "\\."))
    expect(page.locator("#hits")).to_contain_text(f"/{SVG}/{TEMPLATE}")
    _assert_inert(page, dialogs)
    # Then on every page that shows them, rendered by the server.
    for path in ("/ui/", "/ui/sandboxes/sbx-hostile", "/ui/alerts", "/ui/canaries"):
        page.goto(console.url + path)
        _assert_inert(page, dialogs)
    page.goto(console.url + "/ui/sandboxes/sbx-hostile")
    _assert_inert(page, dialogs)
    text = page.locator("table.events").inner_text()
    for literal in (SCRIPT, IMAGE, SVG, LINK, TEMPLATE, "\\x1b[31mred\\x1b[0m", "\\u202egnp.exe"):
        assert literal in text, literal
    # Not evaluated: the DNS name, the subject, the path, the user agent and the tool call
    # each show it.
    assert text.count(TEMPLATE) >= 5
    assert f"MCP tools/call {SCRIPT}" in text
    assert "\x1b" not in text
    assert "\u202e" not in text
    page.locator("a[href^='/ui/incidents/']").first.click()
    _assert_inert(page, dialogs)
    expect(page.locator("table.events")).to_contain_text(SCRIPT)
    assert page.evaluate("window.__violations") == 0
    ctx.close()


def test_every_page_at_desktop_and_phone_width(browser: Browser, sqlite_console: Console) -> None:
    console = sqlite_console
    _, admin = console.token("admin", "alice")
    _trip_hostile(console)
    console.ops.plant(PlantRequest(sandbox="sbx-seeded"))
    time.sleep(3)  # a heartbeat round, so the overview shows the listeners
    pages = {
        "overview": "/ui/",
        "sandboxes": "/ui/sandboxes",
        "sandbox": "/ui/sandboxes/sbx-hostile",
        "alerts": "/ui/alerts",
        "canaries": "/ui/canaries",
        "ledger": "/ui/ledger",
        "tokens": "/ui/tokens",
    }
    for width, options in (("desktop", DESKTOP), ("phone", PHONE)):
        ctx = context(browser, **options)
        page = ctx.new_page()
        page.goto(f"{console.url}/ui/login")
        shoot(page, f"login-{width}")
        sign_in(page, console, admin)
        for name, path in pages.items():
            page.goto(console.url + path)
            shoot(page, f"{name}-{width}")
            # Wide tables scroll inside their frame; the page itself never scrolls sideways.
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (name, width, overflow)
        page.goto(console.url + "/ui/sandboxes/sbx-hostile")
        page.locator("a[href^='/ui/incidents/']").first.click()
        shoot(page, f"incident-{width}")
        ctx.close()
    assert len(list(ARTIFACTS.glob("*-phone.png"))) >= len(pages) + 2
