"""The LLM provider APIs a planted key is tried against: which endpoint and model, what prompt.

A request carrying a canary to one of these paths is answered as the provider
answers a bad key, with its own 401 error body, so the official SDKs raise
their own authentication error. What the request asked for is evidence: the
endpoint, the model, and the start of the prompt (it tells responders what
the agent wanted). Everything read here is untrusted: the body is parsed only
when whole and within MAX_BODY_KEPT, values are cut to size, and nothing of
the request is ever put into the answer.
"""

import json
import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal

Provider = Literal["openai", "anthropic"]
# The credential formats that plant a provider key: only their holders get its answers.
FORMATS = ("openai", "anthropic", "env")

# Paths the official SDKs call, by provider (the base URL is what the planted file names).
_OPENAI = (
    "/v1/models",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/embeddings",
)
_ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens", "/v1/complete")
MAX_BODY_KEPT = 64 * 1024
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz123456789"
PROMPT_KEPT = 1024
MODEL_KEPT = 100
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')


def provider(path: str, headers: Sequence[tuple[str, str]]) -> Provider | None:
    """The provider whose API `path` (without its query) is, if any."""
    path = path.rstrip("/") or "/"
    names = {name.lower() for name, _ in headers}
    if path in _ANTHROPIC or (path.startswith("/v1/") and "anthropic-version" in names):
        return "anthropic"
    if path in _OPENAI or path.startswith("/v1/models/"):
        return "openai"
    return None


def request_facts(kind: Provider, path: str, body: bytes, complete: bool) -> dict[str, Any]:
    """The endpoint, model and start of the prompt of a request whose body began with `body`."""
    facts: dict[str, Any] = {"provider": kind, "endpoint": path[:MODEL_KEPT]}
    parsed = _json(body) if complete else None
    if isinstance(parsed, dict):
        model = parsed.get("model")
        facts["model"] = model[:MODEL_KEPT] if isinstance(model, str) else None
        facts["prompt"] = _prompt(parsed)[:PROMPT_KEPT]
        facts["stream"] = parsed.get("stream") is True
    else:
        found = _MODEL.search(body)
        facts["model"] = found.group(1).decode("utf-8", "replace") if found else None
    return facts


def _json(body: bytes) -> Any:
    if not body or len(body) > MAX_BODY_KEPT:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _prompt(request: dict[str, Any]) -> str:
    """The text of the last message the request sends (chat, messages or responses shape)."""
    messages = request.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return _text(messages[-1].get("content"))
    return _text(request.get("input") or request.get("prompt"))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [_text(part.get("text")) for part in content if isinstance(part, dict)]
        return "\n".join(part for part in parts if part)
    return ""


def refusal(kind: Provider) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    """The provider's answer to a bad key: the body of its 401 and its request-id header,
    nothing of the request in either."""
    if kind == "anthropic":
        request_id = "req_011C" + "".join(secrets.choice(_ID_CHARS) for _ in range(20))
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            "request_id": request_id,
        }
        return json.dumps(body).encode(), ((b"request-id", request_id.encode()),)
    body = {
        "error": {
            "message": "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    request_id = f"req_{secrets.token_hex(16)}"
    return json.dumps(body).encode(), ((b"x-request-id", request_id.encode()),)
