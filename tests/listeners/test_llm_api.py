"""LLM-provider canaries with the official SDKs: the planted key and base URL, used, name the
canary, the endpoint and the model; the SDK raises its own authentication error."""

import asyncio
import io
import json

import anthropic
import httpx
import openai
import pytest
from dotenv import dotenv_values
from sqlalchemy import Engine

from canaries.kinds import Web
from support import ZONE, hits, plant_canary, resolving, run_http, run_tls, settle, trusting

PROMPT = "Summarise the attached /etc/shadow and mail it to ops"


def openai_client(planted: str, **extra: object) -> openai.OpenAI:
    """The client an agent builds from the planted dotenv file (the SDK reads these variables)."""
    env = dotenv_values(stream=io.StringIO(planted))
    return openai.OpenAI(
        api_key=env["OPENAI_API_KEY"],
        base_url=env["OPENAI_BASE_URL"],
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("fmt", ["openai", "env"])
async def test_the_openai_sdk_with_the_planted_key(engine: Engine, fmt: str) -> None:
    async with run_http(engine) as node:
        canary = plant_canary(engine, "credential", fmt=fmt, web=Web(http_port=node.port))

        def use() -> tuple[str, str]:
            with resolving(ZONE), openai_client(canary.value) as client:
                with pytest.raises(openai.AuthenticationError) as listed:
                    client.models.list()
                with pytest.raises(openai.AuthenticationError) as chatted:
                    client.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": PROMPT}]
                    )
            assert chatted.value.request_id is not None
            return str(listed.value.code), str(chatted.value.code)

        assert await asyncio.to_thread(use) == ("invalid_api_key", "invalid_api_key")
        await settle(lambda: len(hits(engine, "evidence")) == 1)
    recorded = hits(engine)
    assert {hit.canary_id for hit in recorded} == {canary.id}
    assert [hit.evidence["endpoint"] for hit in recorded] == ["/v1/models", "/v1/chat/completions"]
    assert all("header:authorization" in hit.evidence["found_in"] for hit in recorded)
    assert all(hit.evidence["provider"] == "openai" for hit in recorded)
    [asked] = hits(engine, "evidence")
    assert asked.evidence["hit_seq"] == recorded[1].seq
    assert asked.evidence["model"] == "gpt-4o"
    assert asked.evidence["endpoint"] == "/v1/chat/completions"
    assert asked.evidence["prompt"] == PROMPT


async def test_the_anthropic_sdk_with_the_planted_settings(engine: Engine) -> None:
    async with run_http(engine) as node:
        canary = plant_canary(engine, "credential", fmt="anthropic", web=Web(http_port=node.port))
        env = json.loads(canary.value)["env"]

        def use() -> str:
            with (
                resolving(ZONE),
                anthropic.Anthropic(
                    api_key=env["ANTHROPIC_API_KEY"], base_url=env["ANTHROPIC_BASE_URL"]
                ) as client,
                pytest.raises(anthropic.AuthenticationError) as refused,
            ):
                client.messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=256,
                    messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                )
            return str(refused.value.body)

        assert "authentication_error" in await asyncio.to_thread(use)
        await settle(lambda: len(hits(engine, "evidence")) == 1)
    [hit] = hits(engine)
    assert hit.canary_id == canary.id
    assert hit.evidence["provider"] == "anthropic"
    assert hit.evidence["endpoint"] == "/v1/messages"
    # This SDK sends the key as a bearer token (older ones, as x-api-key: both are scanned).
    assert "header:authorization" in hit.evidence["found_in"]
    [asked] = hits(engine, "evidence")
    assert asked.evidence["model"] == "claude-sonnet-4-5"
    assert asked.evidence["prompt"] == PROMPT


async def test_over_https_the_sdk_verifies_the_certificate_and_is_caught(engine: Engine) -> None:
    async with run_tls(engine) as node:
        web = Web(https_port=node.port, ca_pem="unused")
        canary = plant_canary(engine, "credential", fmt="openai", web=web)

        def use() -> None:
            with (
                resolving(ZONE),
                httpx.Client(verify=trusting()) as http,
                openai_client(canary.value, http_client=http) as client,
                pytest.raises(openai.AuthenticationError),
            ):
                client.responses.create(model="gpt-4.1", input=PROMPT)

        await asyncio.to_thread(use)
        await settle(lambda: len(hits(engine, "evidence")) >= 2)
    recorded = hits(engine)
    assert [hit.protocol for hit in recorded] == ["tls", "https"]
    assert recorded[1].evidence["endpoint"] == "/v1/responses"
    asked = [e for e in hits(engine, "evidence") if e.protocol == "https"]
    assert asked[0].evidence["model"] == "gpt-4.1"
    assert asked[0].evidence["prompt"] == PROMPT


async def test_a_request_to_an_llm_path_without_a_canary_is_answered_as_any_other(
    engine: Engine,
) -> None:
    async with run_http(engine) as node, httpx.AsyncClient() as client:
        reply = await client.post(
            f"http://127.0.0.1:{node.port}/v1/chat/completions",
            headers={"Authorization": "Bearer sk-not-a-canary"},
            json={"model": "gpt-4o", "messages": []},
        )
    assert reply.status_code == 200
    assert hits(engine) == []
