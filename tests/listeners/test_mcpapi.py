"""The MCP server canary (listeners/mcpapi.py) with the official MCP SDK's Streamable HTTP
client: a planted .mcp.json, used, initialises, lists tools and calls one; every step is evidence
of the same canary. Hostile bodies and JSON-RPC messages get bounded answers."""

import json

import httpx
import httpx2
from hypothesis import given
from hypothesis import strategies as st
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import Engine

from canaries.kinds import Web
from listeners import mcpapi
from support import ZONE, hits, plant_canary, resolving, run_http, settle


async def test_an_mcp_client_with_the_planted_config_is_caught_at_every_step(
    engine: Engine,
) -> None:
    async with run_http(engine) as node:
        canary = plant_canary(engine, "credential", fmt="mcp", web=Web(http_port=node.port))
        [server] = json.loads(canary.value)["mcpServers"].values()
        with resolving(ZONE):
            async with (
                httpx2.AsyncClient(headers=server["headers"]) as http,
                Client(streamable_http_client(server["url"], http_client=http)) as client,
            ):
                listed = await client.list_tools()
                called = await client.call_tool("get_secret", {"path": "prod/db/root"})
        await settle(lambda: any(e.evidence.get("tool") for e in hits(engine, "evidence")))
    assert "get_secret" in [tool.name for tool in listed.tools]
    assert called.is_error is True
    recorded = hits(engine)
    assert {hit.canary_id for hit in recorded} == {canary.id}
    assert {hit.protocol for hit in recorded} == {"mcp"}
    steps = hits(engine, "evidence")
    methods = [step.evidence["method"] for step in steps]
    assert {"initialize", "tools/list", "tools/call"} <= set(methods)
    [initialize] = [step for step in steps if step.evidence["method"] == "initialize"]
    assert initialize.evidence["client"]["name"]
    [call] = [step for step in steps if step.evidence["method"] == "tools/call"]
    assert call.evidence["tool"] == "get_secret"
    assert json.loads(call.evidence["arguments"]) == {"path": "prod/db/root"}


async def test_the_mcp_path_without_a_canary_is_answered_as_any_other(engine: Engine) -> None:
    async with run_http(engine) as node, httpx.AsyncClient() as client:
        reply = await client.post(
            f"http://127.0.0.1:{node.port}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        )
    assert reply.status_code == 200
    assert reply.content == b""
    assert hits(engine) == []


async def test_only_a_planted_mcp_endpoint_answers_as_one(engine: Engine) -> None:
    """A canary of another kind at /mcp, or the MCP canary at another path ending in mcp, is
    answered as any request: only what was planted behaves as an MCP server."""
    dns = plant_canary(engine)
    async with run_http(engine) as node, httpx.AsyncClient() as client:
        mcp = plant_canary(engine, "credential", fmt="mcp", web=Web(http_port=node.port))
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        other = await client.post(
            f"http://127.0.0.1:{node.port}/mcp", headers={"Host": dns.value}, json=call
        )
        elsewhere = await client.post(
            f"http://127.0.0.1:{node.port}/static/mcp",
            headers={"Authorization": f"Bearer {mcp.token}"},
            json=call,
        )
    assert other.content == b""
    assert elsewhere.content == b""
    assert {hit.protocol for hit in hits(engine)} == {"http"}


def test_a_request_id_too_long_to_echo_is_invalid() -> None:
    long = {"jsonrpc": "2.0", "id": "x" * 1000, "method": "ping"}
    answered = json.loads(mcpapi.answer("POST", json.dumps(long).encode(), True).body)
    assert answered["id"] is None
    assert answered["error"]["code"] == -32600
    fraction = {"jsonrpc": "2.0", "id": 1.5, "method": "ping"}
    assert mcpapi.answer("POST", json.dumps(fraction).encode(), True).status == 400


def test_malformed_requests_get_json_rpc_errors() -> None:
    assert mcpapi.answer("POST", b"{nope", True).status == 400
    assert json.loads(mcpapi.answer("POST", b"[1]", True).body)["error"]["code"] == -32600
    assert mcpapi.answer("POST", b"{}", False).status == 400
    unknown = mcpapi.answer("POST", b'{"jsonrpc":"2.0","id":7,"method":"server/discover"}', True)
    assert json.loads(unknown.body) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32601, "message": "Method not found"},
    }
    assert (
        mcpapi.answer("POST", b'{"jsonrpc":"2.0","method":"notifications/x"}', True).status == 202
    )


def test_nothing_of_a_request_but_its_id_comes_back() -> None:
    call = {
        "jsonrpc": "2.0",
        "id": "abc",
        "method": "tools/call",
        "params": {"name": "<script>", "arguments": {"x": "\u202eevil"}},
    }
    answered = mcpapi.answer("POST", json.dumps(call).encode(), True)
    assert b"<script>" not in answered.body
    assert b"evil" not in answered.body
    assert json.loads(answered.body)["result"]["isError"] is True
    assert answered.facts["tool"] == "<script>"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=2000), st.sampled_from(["POST", "GET", "DELETE"]), st.booleans())
def test_any_bytes_get_an_answer(body: bytes, method: str, complete: bool) -> None:
    answered = mcpapi.answer(method, body, complete)
    assert answered.status in (200, 202, 204, 400, 405)


@given(
    st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "method": st.text(max_size=30)},
        optional={"id": _JSON, "params": _JSON},
    )
)
def test_any_json_rpc_message_gets_a_bounded_answer(message: dict[str, object]) -> None:
    answered = mcpapi.answer("POST", json.dumps(message).encode(), True)
    assert len(answered.facts.get("arguments") or "") <= mcpapi.ARGUMENTS_KEPT
    if answered.body:
        assert json.loads(answered.body)["jsonrpc"] == "2.0"
