"""The admin API: auth on every endpoint, what each does, OpenAPI fuzzing, and /metrics."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from oobwatch.api import build_api
from oobwatch.config import Config, load
from oobwatch.operations import LocalOperations
from oobwatch.serve import Node, start
from store import tokens
from store.engine import migrate, open_engine
from support import Receiver, node_config

SCOPES = ("read", "mint", "ack", "admin")

# (method, path, body, scope needed)
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/health", None, "read"),
    ("GET", "/overview", None, "read"),
    ("GET", "/sandboxes", None, "read"),
    ("GET", "/canaries", None, "read"),
    ("POST", "/canaries", {"kind": "dns", "sandbox": "sbx-api"}, "mint"),
    ("POST", "/canaries/{canary}/retire", {}, "mint"),
    ("POST", "/plant", {"sandbox": "sbx-plant"}, "mint"),
    ("GET", "/timeline?sandbox=sbx-api", None, "read"),
    ("GET", "/timeline?format=csv", None, "read"),
    ("GET", "/incidents", None, "read"),
    ("GET", "/incidents/{incident}", None, "read"),
    ("GET", "/alerts?open=true", None, "read"),
    ("POST", "/alerts/{alert}/ack", {"by": "alice"}, "ack"),
    ("POST", "/alerts/{alert}/resolve", {"by": "alice"}, "ack"),
    ("GET", "/ledger/head", None, "read"),
    ("POST", "/ledger/verify", None, "admin"),
    ("GET", "/ledger/checks", None, "read"),
    ("GET", "/ledger/export", None, "read"),
    ("POST", "/ledger/anchor", None, "admin"),
    ("GET", "/tls", None, "read"),
    ("POST", "/tls/renew", None, "admin"),
    ("GET", "/tokens", None, "admin"),
    ("POST", "/tokens", {"name": "made-by-api", "scope": "read"}, "admin"),
    ("POST", "/tokens/{token}/login-link", None, "admin"),
    ("POST", "/tokens/{token}/rotate", None, "admin"),
    ("POST", "/tokens/{token}/revoke", None, "admin"),
    ("GET", "/metrics", None, "read"),
]
# What a granted call answers when not 2xx: this node's certificate is self-signed, not ACME.
GRANTED_STATUS = {"/tls/renew": 422}
GRANTED = {
    "read": {"read", "mint", "ack", "admin"},
    "mint": {"mint", "admin"},
    "ack": {"ack", "admin"},
    "admin": {"admin"},
}


def config_for(tmp_path: Path, receiver: Receiver) -> Config:
    extra = "[heartbeat]\nenabled = false\n[ledger]\nanchor_file = 'anchors.jsonl'"
    return load(node_config(tmp_path, receiver.url(), extra=extra))


@pytest.fixture
async def node(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Node]:
    running = await start(config_for(tmp_path, receiver))
    yield running
    await running.stop()


def bearer(node: Node, scope: str) -> dict[str, str]:
    _, text = tokens.create(node.engine, f"t-{scope}", scope)
    return {"Authorization": f"Bearer {text}"}


async def api(node: Node) -> httpx.AsyncClient:
    assert node.api is not None
    host, port = node.api.addresses[0]
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30)


async def test_every_endpoint_requires_a_token_with_its_scope(
    node: Node, receiver: Receiver
) -> None:
    headers = {scope: bearer(node, scope) for scope in SCOPES}
    async with await api(node) as client:
        canary = (
            await client.post(
                "/canaries", json={"kind": "dns", "sandbox": "sbx-api"}, headers=headers["mint"]
            )
        ).json()
        await dns.asyncquery.udp(
            dns.message.make_query(canary["value"], "A"),
            "127.0.0.1",
            port=node.listeners["dns"].addresses[0][1],
            timeout=5,
        )
        receiver.wait_for(1)
        [alert] = (await client.get("/alerts", headers=headers["read"])).json()
        [incident] = (await client.get("/incidents", headers=headers["read"])).json()
        spare, _ = tokens.create(node.engine, "spare", "read")
        names = {
            "canary": canary["id"],
            "alert": alert["id"],
            "incident": incident["id"],
            "token": spare.id,
        }
        for method, template, body, needed in ENDPOINTS:
            path = template.format(**names)
            assert (await client.request(method, path, json=body)).status_code == 401, path
            bogus = {"Authorization": "Bearer oob_deadbeef_nope"}
            assert (
                await client.request(method, path, json=body, headers=bogus)
            ).status_code == 401, path
            for scope in SCOPES:
                response = await client.request(method, path, json=body, headers=headers[scope])
                if scope in GRANTED[needed] and path in GRANTED_STATUS:
                    assert response.status_code == GRANTED_STATUS[path], (path, scope)
                elif scope in GRANTED[needed]:
                    assert response.status_code < 300, (path, scope, response.text)
                else:
                    assert response.status_code == 403, (path, scope)


async def test_what_the_endpoints_do(node: Node, receiver: Receiver) -> None:
    admin = bearer(node, "admin")
    async with await api(node) as client:
        minted = await client.post(
            "/canaries",
            json={
                "kind": "credential",
                "format": "aws",
                "sandbox": "sbx-z",
                "labels": {"team": "x"},
            },
            headers=admin,
        )
        assert minted.status_code == 201
        canary = minted.json()
        assert canary["path_hint"] == ".aws/credentials"
        assert ".aws/config" in canary["files"]
        bad = await client.post(
            "/canaries", json={"kind": "credential", "sandbox": "sbx-z"}, headers=admin
        )
        assert bad.status_code == 422
        assert [
            c["id"] for c in (await client.get("/canaries?sandbox=sbx-z", headers=admin)).json()
        ] == [canary["id"]]
        retired = (
            await client.post(f"/canaries/{canary['id']}/retire", json={}, headers=admin)
        ).json()
        assert retired["already"] is False
        assert retired["canary"]["retired_at"] is not None
        assert retired["canary"]["state"] == "retired"
        again = (
            await client.post(f"/canaries/{canary['id']}/retire", json={}, headers=admin)
        ).json()
        assert again["already"] is True
        assert again["canary"]["retired_at"] == retired["canary"]["retired_at"]
        assert (
            await client.post("/canaries/cn-none/retire", json={}, headers=admin)
        ).status_code == 404
        bundle = (
            await client.post(
                "/plant", json={"sandbox": "sbx-z", "present": [".netrc"]}, headers=admin
            )
        ).json()
        assert ".netrc" not in bundle["files"]
        assert bundle["skipped"] == [".netrc"]
        assert "project/CONTACTS.md" in bundle["files"]
        assert {c["location"] for c in bundle["canaries"]} >= {".pgpass", "project/CONTACTS.md"}
        events = (await client.get("/timeline?sandbox=sbx-z", headers=admin)).json()
        assert [e["type"] for e in events][:2] == ["canary_minted", "canary_retired"]
        assert [e["type"] for e in events].count("canary_retired") == 1
        csv_text = (await client.get("/timeline?sandbox=sbx-z&format=csv", headers=admin)).text
        assert csv_text.startswith("seq,time,type")
        assert (await client.get("/timeline?since=yesterday", headers=admin)).status_code == 422
        assert (await client.get("/timeline?source=nonsense", headers=admin)).status_code == 422
        head = (await client.get("/ledger/head", headers=admin)).json()
        verified = (await client.post("/ledger/verify", headers=admin)).json()
        assert verified["intact"] is True
        assert verified["head_hash"] == head["hash"]
        assert (await client.get("/incidents/in-99999", headers=admin)).status_code == 404
        spec = (await client.get("/openapi.json")).json()
        assert {
            "/canaries",
            "/plant",
            "/timeline",
            "/incidents",
            "/alerts",
            "/ledger/head",
            "/metrics",
        } <= set(spec["paths"])


async def test_metrics_parse_with_prometheus_client(node: Node) -> None:
    reader = bearer(node, "read")
    async with await api(node) as client:
        canary = (
            await client.post(
                "/canaries", json={"kind": "dns", "sandbox": "m"}, headers=bearer(node, "mint")
            )
        ).json()
        port = node.listeners["dns"].addresses[0][1]
        await dns.asyncquery.udp(
            dns.message.make_query(canary["value"], "A"), "127.0.0.1", port=port, timeout=5
        )
        await dns.asyncquery.udp(
            dns.message.make_query("junk.canary.example.test", "A"),
            "127.0.0.1",
            port=port,
            timeout=5,
        )
        text = (await client.get("/metrics", headers=reader)).text
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        return next(
            s.value
            for s in families[name].samples
            if s.name.endswith("_total") or s.name == name
            if all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("oobwatch_listener_hits", listener="dns") == 1
    assert value("oobwatch_listener_junk", listener="dns") == 1
    assert value("oobwatch_listener_received", listener="dns") == 2
    assert value("oobwatch_ledger_entries") >= 2
    assert "oobwatch_outbox_pending" in families
    assert "oobwatch_alerts_sent" in families
    assert "oobwatch_heartbeat_last_ok_seconds" in families
    # SMTP's STARTTLS serves the node's certificate: its expiry, by source.
    assert value("oobwatch_tls_certificate_expiry_seconds", source="self-signed") > time.time()


@pytest.fixture
def schema_app(tmp_path: Path, receiver: Receiver) -> Iterator[tuple[FastAPI, str]]:
    config = config_for(tmp_path, receiver)
    engine: Engine = open_engine(config.store.url)
    migrate(engine)
    _, text = tokens.create(engine, "fuzz", "admin")
    yield build_api(LocalOperations(config, engine)), text
    engine.dispose()


def test_fuzzing_the_openapi_document_finds_no_server_error(
    schema_app: tuple[FastAPI, str],
) -> None:
    app, text = schema_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    calls: list[str] = []
    for operation in schema.get_all_operations():
        strategy = operation.ok().as_strategy()

        @settings(
            max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {text}"})
            calls.append(f"{case.method} {case.path}")
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    assert failures == []
    documented = sum(len(methods) for methods in app.openapi()["paths"].values())
    assert len(set(calls)) == documented == 28  # every operation was exercised
    assert len(calls) > 100


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def post_streaming(port: int, headers: str, chunks: int) -> tuple[bytes, int]:
    """POST a head declaring 200 MB, read the answer, then keep sending; the answer, bytes sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /canaries HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 1024 * 1024}\r\n{headers}\r\n".encode()
    )
    # The answer comes before any of the body is sent: nothing of it was waited for.
    answer = await asyncio.wait_for(reader.read(65536), 10)
    sent = 0
    chunk = b"[" * (1024 * 1024)
    try:
        for _ in range(chunks):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 5)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass
    writer.close()
    return answer, sent


async def test_no_body_is_read_before_the_token_is_checked(node: Node) -> None:
    """On main a 200 MB unauthenticated POST grew the node by 360 MB before its 401."""
    assert node.api is not None
    port = node.api.addresses[0][1]
    before = rss_bytes()
    answer, sent = await post_streaming(port, "", chunks=200)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in answer.lower()
    # What the kernel buffers took before the server closed, far from the 200 MB offered.
    assert sent < 64 * 1024 * 1024
    assert rss_bytes() - before < 50 * 1024 * 1024
    admin = bearer(node, "admin")["Authorization"]
    # Authenticated, but declaring more than the cap: refused before reading.
    answer, _ = await post_streaming(port, f"Authorization: {admin}\r\n", chunks=1)
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_a_stalled_body_is_cut_off(tmp_path: Path, receiver: Receiver) -> None:
    config = config_for(tmp_path, receiver)
    config = config.model_copy(update={"api": config.api.model_copy(update={"timeout": 0.5})})
    running = await start(config)
    try:
        assert running.api is not None
        port = running.api.addresses[0][1]
        admin = bearer(running, "admin")["Authorization"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /canaries HTTP/1.1\r\nHost: x\r\nAuthorization: {admin}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"kind"'.encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        async with await api(running) as client:
            fine = await client.post(
                "/canaries",
                json={"kind": "dns", "sandbox": "sbx-after"},
                headers={"Authorization": admin},
            )
            assert fine.status_code == 201
            huge = await client.get(
                "/health", headers={"X-Big": "a" * 20_000, "Authorization": admin}
            )
            assert huge.status_code == 431
            text = (await client.get("/metrics", headers={"Authorization": admin})).text
    finally:
        await running.stop()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert "oobwatch_connections_open" in families
    evicted = {
        (sample.labels["listener"], sample.labels["reason"])
        for sample in families["oobwatch_connections_evicted"].samples
    }
    assert ("api", "source") in evicted
    assert ("dns", "fair") in evicted
    # The messages SMTP is receiving are bounded, and accounted, the same way.
    assert ("smtp-messages", "oldest") in evicted
    assert "oobwatch_connections_refused" in families
    assert "oobwatch_token_store_lookups" in families


async def test_metrics_show_how_bursts_fold_and_the_ledger_grows(
    tmp_path: Path, receiver: Receiver
) -> None:
    extra = "[heartbeat]\nenabled = false\n[bursts]\nthreshold = 5\ninterval = 0.01"
    running = await start(load(node_config(tmp_path, receiver.url(), extra=extra)))
    try:
        async with await api(running) as client:
            mint_with = bearer(running, "mint")
            canary = (
                await client.post(
                    "/canaries", json={"kind": "dns", "sandbox": "b"}, headers=mint_with
                )
            ).json()
            port = running.listeners["dns"].addresses[0][1]
            for number in range(30):
                query = dns.message.make_query(f"{number}.{canary['value']}", "A")
                await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)
            text = (await client.get("/metrics", headers=bearer(running, "read"))).text
    finally:
        await running.stop()
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("listener") in (None, "dns")
    }
    assert samples["oobwatch_burst_folded_hits_total"] == 25
    assert 1 <= samples["oobwatch_burst_aggregates_total"] <= 25
    assert samples["oobwatch_burst_canaries"] == 1
    assert samples["oobwatch_listener_hits_total"] == 30
    assert (
        samples["oobwatch_ledger_rows_appended_total"]
        >= 5 + samples["oobwatch_burst_aggregates_total"]
    )
    assert "oobwatch_ledger_rows_per_second" in samples
    # The store never went away: nothing spooled.
    assert samples["oobwatch_spool_events"] == samples["oobwatch_spooled_events_total"] == 0
    assert samples["oobwatch_spool_full"] == 0


async def test_the_probes_need_no_token_and_say_only_the_verdict(node: Node) -> None:
    async with await api(node) as client:
        live = await client.get("/healthz")
        ready = await client.get("/readyz")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        # Nothing of the node in them: no name, version, zone or counts.
        for response in (live, ready):
            assert node.config.node.name not in response.text
            assert node.config.dns.zone not in response.text
        # A node whose hits would go unrecorded is not ready.
        node.writer.spool_full = True
        not_ready = await client.get("/readyz")
        assert (not_ready.status_code, not_ready.json()) == (503, {"status": "not ready"})
        node.writer.spool_full = False
