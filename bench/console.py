"""Console benchmark: how soon a hit shows, and what its pages cost, beside the CLI and the API.

Runs `oobwatch serve` (SQLite, 127.0.0.1 high ports) and Debian's Chromium
under Playwright. Two tables in one run:

- Live: a real DNS query per round, then the time until the hit is on screen:
  a row in the overview's live table (server-sent events), beside the CLI's
  live view (`oobwatch timeline --follow --format csv`, a poll every 0.5 s)
  and the JSON API polled as fast as it answers (the floor of any view).
- Pages: the sandbox page with `--events` events and the overview, loaded in
  the browser (navigation until `load`) and fetched as HTML, beside
  `GET /timeline?sandbox=` (the JSON API) for the same events.

Usage: python bench/console.py [--rounds N] [--events N]
"""

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import httpx
from playwright.sync_api import Browser, Page, sync_playwright

from canaries.mint import mint
from listeners.base import hit_event
from store import ledger, tokens
from store.engine import open_store

ZONE = "canary.example.test"
SANDBOX = "sbx-bench"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        return int(udp.getsockname()[1])


def prepare(folder: Path, events: int) -> tuple[Path, dict[str, int], str, str]:
    """A store with `events` hits in one sandbox; the config, ports, an admin token, a canary."""
    ports = {name: free_port() for name in ("dns", "smtp", "http", "api")}
    config = folder / "oobwatch.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{folder / "oobwatch.db"}"\n[dns]\nzone = "{ZONE}"\n'
        f"port = {ports['dns']}\n[smtp]\nport = {ports['smtp']}\n[http]\nport = {ports['http']}\n"
        f"[api]\nport = {ports['api']}\n[heartbeat]\nenabled = false\n"
        '[alerts]\nurls = ["json://127.0.0.1:9/hook"]\ndedupe_window = "1d"\n'
    )
    engine = open_store(f"sqlite:///{folder / 'oobwatch.db'}")
    canary = mint(engine, kind="dns", zone=ZONE, sandbox=SANDBOX, node="bench")
    peer = ("198.51.100.7", 5353)
    with engine.begin() as connection:
        ledger.append(
            connection,
            [
                hit_event(canary, protocol="dns", peer=peer, node="bench", evidence={"n": n})
                for n in range(events)
            ],
        )
    _, admin = tokens.create(engine, "bench", "admin")
    engine.dispose()
    return config, ports, admin, canary.value


def query(port: int, name: str) -> None:
    dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5)


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"{statistics.median(ms):8.1f} {p99:8.1f} {ms[-1]:8.1f}"


def timed(rounds: int, action: Callable[[int], None]) -> list[float]:
    """Each round's seconds; rounds start at random moments, as hits do, not in step with a
    view's polling."""
    samples = []
    for n in range(rounds):
        time.sleep(random.uniform(0, 0.5))
        started = time.perf_counter()
        action(n)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        config, ports, admin, value = prepare(folder, args.events)
        oobwatch = [sys.executable, "-m", "oobwatch.cli", "--config", str(config)]
        server = subprocess.Popen([*oobwatch, "serve"], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        for _ in ports:
            server.stdout.readline()
        base = f"http://127.0.0.1:{ports['api']}"
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"})
        try:
            live = run_live(args.rounds, ports, base, admin, value, oobwatch, api)
            pages = run_pages(args.rounds, base, admin, api)
        finally:
            api.close()
            server.terminate()
            server.wait(30)
    print(f"\nhit -> on screen ({args.rounds} DNS queries), ms")
    print(f"{'view':58} {'p50':>8} {'p99':>8} {'max':>8}")
    for name, samples in live.items():
        print(f"{name:58} {summary(samples)}")
    print(f"\npages ({args.events:,} events in the sandbox, {args.rounds} loads each), ms")
    print(f"{'page':58} {'p50':>8} {'p99':>8} {'max':>8}")
    for name, samples in pages.items():
        print(f"{name:58} {summary(samples)}")


def signed_in(browser: Browser, base: str, admin: str) -> Page:
    """A page of `browser` signed in to the console through its form."""
    page = browser.new_page()
    page.goto(f"{base}/ui/login")
    page.fill("input[name=token]", admin)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/ui/")
    return page


def run_live(
    rounds: int,
    ports: dict[str, int],
    base: str,
    admin: str,
    value: str,
    oobwatch: list[str],
    api: httpx.Client,
) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = signed_in(browser, base, admin)
        rows = page.locator("#hits tbody tr")

        def on_screen(n: int) -> None:
            name = f"browser-{n}.{value}"
            query(ports["dns"], name)
            rows.filter(has_text=name).wait_for(timeout=10_000)

        found["console: live row in Chromium (server-sent events)"] = timed(rounds, on_screen)
        browser.close()
    follow = subprocess.Popen(
        [*oobwatch, "timeline", "--follow", "--format", "csv", "--sandbox", SANDBOX],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert follow.stdout is not None
    time.sleep(2)  # its first page of the timeline is out

    def printed(n: int) -> None:
        name = f"cli-{n}.{value}"
        query(ports["dns"], name)
        assert follow.stdout is not None
        while name not in follow.stdout.readline():
            pass

    found["CLI: timeline --follow (polls every 0.5 s)"] = timed(rounds, printed)
    follow.terminate()
    follow.wait(10)
    head = api.get("/ledger/head").json()["seq"]

    def polled(n: int) -> None:
        nonlocal head
        name = f"api-{n}.{value}"
        query(ports["dns"], name)
        while True:
            fresh = api.get("/timeline", params={"after": head, "types": "hit"}).json()
            if any(name in str(event.get("qname")) for event in fresh):
                head = max(event["seq"] for event in fresh)
                return

    found["JSON API polled back to back (floor)"] = timed(rounds, polled)
    return found


def run_pages(rounds: int, base: str, admin: str, api: httpx.Client) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = signed_in(browser, base, admin)
        for name, path in (("sandbox page", f"/ui/sandboxes/{SANDBOX}"), ("overview", "/ui/")):
            found[f"console: {name} in Chromium (until load)"] = timed(
                rounds, lambda _n, path=path: page.goto(base + path) and None
            )
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        browser.close()
    with httpx.Client(base_url=base, cookies=cookies) as signed:
        for name, path in (("sandbox page", f"/ui/sandboxes/{SANDBOX}"), ("overview", "/ui/")):
            found[f"console: {name} as HTML (httpx)"] = timed(
                rounds, lambda _n, path=path: signed.get(path).raise_for_status() and None
            )
    found["API: GET /timeline?sandbox= as JSON (httpx)"] = timed(
        rounds,
        lambda _n: api.get("/timeline", params={"sandbox": SANDBOX}).raise_for_status() and None,
    )
    size = len(httpx.get(f"{base}/ui/sandboxes/{SANDBOX}", cookies=cookies).text)
    print(f"the sandbox page is {size / 1024:,.0f} KiB of HTML")
    return found


if __name__ == "__main__":
    main()
