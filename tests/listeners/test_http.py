"""The HTTP listener over real sockets, driven by httpx."""

import base64

import httpx
import pytest
from sqlalchemy import Engine

from support import ZONE, hits, plant_canary, run_http


async def request(
    port: int, method: str = "GET", path: str = "/", **kwargs: object
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("where", "shape"),
    [
        ("host", lambda t: {"headers": {"Host": f"{t}.{ZONE}"}}),
        ("path", lambda t: {"path": f"/download/{t}/report.pdf"}),
        ("query", lambda t: {"path": "/track", "params": {"id": t}}),
        ("header:authorization", lambda t: {"headers": {"Authorization": f"Bearer {t}"}}),
        ("header:authorization", lambda t: {"auth": ("deploy", t)}),
        ("header:authorization", lambda t: {"auth": (t, "x")}),
        ("header:cookie", lambda t: {"headers": {"Cookie": f"session={t}; theme=dark"}}),
        ("header:x-api-key", lambda t: {"headers": {"X-Api-Key": t}}),
        ("body", lambda t: {"method": "POST", "content": f'{{"key": "{t}"}}'}),
    ],
)
async def test_each_place_fires(sqlite_engine: Engine, where: str, shape: object) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        response = await request(node.port, **shape(canary.token))  # type: ignore[operator]
        assert response.status_code == 200
        assert response.content == b""
    [hit] = hits(sqlite_engine)
    assert hit.canary_id == canary.id
    assert hit.protocol == "http"
    assert where in hit.evidence["found_in"]
    assert hit.source == "127.0.0.1"
    assert isinstance(hit.source_port, int)
    assert hit.source_port > 0
    assert hit.evidence["method"] in ("GET", "POST")


async def test_unknown_tokens_and_junk_do_not_fire(sqlite_engine: Engine) -> None:
    plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        for path in ("/", "/wp-login.php", "/" + "a" * 26, "/.env"):
            assert (await request(node.port, path=path)).status_code == 200
        await request(node.port, headers={"Host": f"{'b' * 26}.{ZONE}"})
        assert node.context.counters.junk == 5
        assert node.context.counters.hits == 0
    assert hits(sqlite_engine) == []


async def test_a_hit_is_committed_before_the_response(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        for count in range(1, 6):
            await request(node.port, path=f"/{canary.token}")
            assert len(hits(sqlite_engine)) == count


async def test_evidence_is_bounded_and_the_source_cannot_be_spoofed(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        headers = {f"X-H{i}": "v" * 2000 for i in range(60)}
        headers |= {
            "X-Forwarded-For": "203.0.113.66",
            "User-Agent": "curl/8 <script>",
            "Host": f"{canary.token}.{ZONE}",
        }
        response = await request(node.port, "POST", "/up", headers=headers, content=b"x" * 5000)
        # 120 KB of headers is more than any client sends: refused, but the hit is kept.
        assert response.status_code == 431
    [hit] = hits(sqlite_engine)
    assert hit.source == "127.0.0.1"
    assert isinstance(hit.source_port, int)
    assert hit.source_port > 0
    evidence = hit.evidence
    assert len(evidence["headers"]) == 50
    assert all(len(value) <= 512 for _, value in evidence["headers"])
    assert evidence["user_agent"] == "curl/8 <script>"
    # The head's hit was recorded before the body was read; the body's evidence follows it.
    [body] = hits(sqlite_engine, "evidence")
    assert body.evidence["hit_seq"] == hit.seq
    assert body.evidence["body_size"] == 5000
    assert len(body.evidence["body_sha256"]) == 64


@pytest.mark.parametrize(
    ("mode", "status", "content_type"),
    [("empty", 200, "text/plain"), ("404", 404, "text/plain"), ("pixel", 200, "image/gif")],
)
async def test_answers_never_reflect_the_request(
    sqlite_engine: Engine, mode: str, status: int, content_type: str
) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine, response=mode) as node:
        responses = [
            await request(
                node.port, path=f"/{canary.token}/<img src=x>", headers={"X-Echo": "<b>me</b>"}
            ),
            await request(node.port, path="/<script>alert(1)</script>"),
        ]
    for response in responses:
        assert response.status_code == status
        assert response.headers["content-type"] == content_type
        assert b"<" not in response.content or mode == "pixel"
        assert b"script" not in response.content
        assert "server" not in response.headers


async def test_oversize_bodies_get_413_and_a_hit_in_the_headers_still_records(
    sqlite_engine: Engine,
) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine, max_body_bytes=4096) as node:
        response = await request(node.port, "POST", f"/{canary.token}", content=b"y" * 100_000)
        assert response.status_code == 413
    [hit] = hits(sqlite_engine)
    [body] = hits(sqlite_engine, "evidence")
    assert body.evidence["hit_seq"] == hit.seq
    assert body.evidence["body_complete"] is False
    assert body.evidence["body_ended"] == "too_large"


async def test_credential_hosts_challenge_for_the_secret(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "credential", fmt="docker-config")
    host = f"registry.{canary.token}.{ZONE}"
    async with run_http(sqlite_engine) as node:
        challenged = await request(node.port, path="/v2/", headers={"Host": host})
        assert challenged.status_code == 401
        assert challenged.headers["www-authenticate"] == 'Basic realm="restricted"'
        basic = base64.b64encode(f"ci-bot:{canary.token}".encode()).decode()
        answered = await request(
            node.port, path="/v2/", headers={"Host": host, "Authorization": f"Basic {basic}"}
        )
        assert answered.status_code == 200
    first, second = hits(sqlite_engine)
    assert first.evidence["found_in"] == ["host"]
    assert second.evidence["found_in"] == ["host", "header:authorization"]
