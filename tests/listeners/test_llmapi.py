"""What an LLM request asked for, from untrusted bodies: the shapes the SDKs send, and anything."""

import json

from hypothesis import given
from hypothesis import strategies as st

from listeners import llmapi


def test_each_provider_is_told_by_its_paths_and_headers() -> None:
    assert llmapi.provider("/v1/chat/completions", []) == "openai"
    assert llmapi.provider("/v1/models/gpt-4o", []) == "openai"
    assert llmapi.provider("/v1/messages", []) == "anthropic"
    assert llmapi.provider("/v1/models", [("anthropic-version", "2023-06-01")]) == "anthropic"
    assert llmapi.provider("/login", []) is None


def test_chat_messages_and_responses_shapes() -> None:
    chat = json.dumps(
        {"messages": [{"role": "user", "content": "hello"}], "model": "gpt-4o"}
    ).encode()
    assert llmapi.request_facts("openai", "/v1/chat/completions", chat, True) == {
        "provider": "openai",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o",
        "prompt": "hello",
        "stream": False,
    }
    parts = json.dumps(
        {"model": "claude", "messages": [{"content": [{"type": "text", "text": "a"}, {}]}]}
    ).encode()
    assert llmapi.request_facts("anthropic", "/v1/messages", parts, True)["prompt"] == "a"
    responses = json.dumps({"model": "gpt-4.1", "input": "do it", "stream": True}).encode()
    facts = llmapi.request_facts("openai", "/v1/responses", responses, True)
    assert (facts["prompt"], facts["stream"]) == ("do it", True)


def test_a_cut_body_still_gives_its_model() -> None:
    body = b'{"model": "gpt-4o", "messages": [{"content": "' + b"x" * 100
    assert llmapi.request_facts("openai", "/v1/chat/completions", body, False)["model"] == "gpt-4o"


def test_the_refusals_are_the_providers_own_and_carry_nothing_of_the_request() -> None:
    body, headers = llmapi.refusal("openai")
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert dict(headers)[b"x-request-id"].startswith(b"req_")
    body, headers = llmapi.refusal("anthropic")
    refused = json.loads(body)
    assert refused["error"]["type"] == "authentication_error"
    assert dict(headers)[b"request-id"].decode() == refused["request_id"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=2000), st.booleans())
def test_any_bytes_give_bounded_facts(body: bytes, complete: bool) -> None:
    facts = llmapi.request_facts("openai", "/v1/chat/completions", body, complete)
    assert facts["model"] is None or len(facts["model"]) <= llmapi.MODEL_KEPT
    assert len(facts.get("prompt", "")) <= llmapi.PROMPT_KEPT


@given(st.dictionaries(st.sampled_from(["model", "messages", "input", "prompt", "stream"]), _JSON))
def test_any_json_request_gives_bounded_facts(request: dict[str, object]) -> None:
    facts = llmapi.request_facts("anthropic", "/v1/messages", json.dumps(request).encode(), True)
    assert facts["model"] is None or isinstance(facts["model"], str)
    assert isinstance(facts["prompt"], str)
    assert len(facts["prompt"]) <= llmapi.PROMPT_KEPT


def test_a_deeply_nested_body_is_not_a_crash() -> None:
    body = b"[" * 30_000 + b"]" * 30_000  # within the bound: parsed, too deep for json
    assert llmapi.request_facts("openai", "/v1/responses", body, True)["model"] is None
