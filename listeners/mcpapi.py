"""The MCP server canary: a planted `.mcp.json` URL answers as a real MCP server would.

Streamable HTTP, JSON-RPC 2.0, the handshake era of the protocol: `initialize`
(any version the client asks among the handshake ones), `notifications/*`
(202), `tools/list` (a few plausible internal tools), `tools/call` (a plausible
error, never data), `resources/list`, `prompts/list`, `ping`; anything else,
including the newer `server/discover` probe, is "method not found", which
makes clients fall back to `initialize`. Every request's method, the tool
called and its arguments (as JSON, cut to size), and the client's name and
version are evidence. Bodies are parsed only when whole and within
MAX_BODY_BYTES; nothing of a request is put into an answer but its id.
"""

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 64 * 1024
# The one value of a request an answer repeats: bounded.
MAX_ID_CHARS = 128
ARGUMENTS_KEPT = 1024
VALUE_KEPT = 128
# Versions of the handshake era, newest first: what `initialize` may agree on.
VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
_SERVER = {"name": "internal-tools", "version": "1.4.2"}
_TOOLS = [
    {
        "name": "query_warehouse",
        "description": "Run a read-only SQL query against the analytics warehouse.",
        "inputSchema": {
            "type": "object",
            "properties": {"sql": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["sql"],
        },
    },
    {
        "name": "get_secret",
        "description": "Fetch a secret from the platform vault by path.",
        "inputSchema": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    },
    {
        "name": "deploy_service",
        "description": "Deploy a service version to an environment.",
        "inputSchema": {
            "type": "object",
            "properties": {"service": {"type": "string"}, "env": {"type": "string"}},
            "required": ["service", "env"],
        },
    },
]
_METHOD_NOT_FOUND, _INVALID_REQUEST, _PARSE_ERROR = -32601, -32600, -32700


def is_endpoint(raw_path: str, method: str) -> bool:
    """Whether a request is for the MCP endpoint the planted configs name (`/mcp`)."""
    return method in ("POST", "GET", "DELETE") and raw_path in ("/mcp", "/mcp/")


@dataclass(frozen=True, slots=True)
class Answer:
    """The HTTP answer to one MCP request (always JSON), and what the request was, as evidence."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)


def answer(method: str, body: bytes, complete: bool) -> Answer:
    """The answer to an MCP request: its HTTP `method`, the body (whole when `complete`)."""
    if method == "DELETE":
        return Answer(204, facts={"method": "session/delete"})
    if method == "GET":
        # No stream of server-initiated messages: the spec's answer is 405.
        return Answer(405, headers=((b"allow", b"POST, DELETE"),), facts={"method": "stream/open"})
    if not complete or len(body) > MAX_BODY_BYTES:
        return _error(None, _INVALID_REQUEST, "Request too large", {"method": None})
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return _error(None, _PARSE_ERROR, "Parse error", {"method": None})
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return _error(None, _INVALID_REQUEST, "Invalid Request", {"method": None})
    return _dispatch(message)


def _dispatch(message: dict[str, Any]) -> Answer:
    name: str = message["method"]
    if "id" not in message:
        # A notification (initialized, cancelled, ...): accepted, never answered.
        return Answer(202, facts={"method": name[:VALUE_KEPT]})
    ident = message["id"]
    if not _valid_id(ident):
        return _error(None, _INVALID_REQUEST, "Invalid Request", {"method": name[:VALUE_KEPT]})
    given = message.get("params")
    params: dict[str, Any] = given if isinstance(given, dict) else {}
    facts: dict[str, Any] = {"method": name[:VALUE_KEPT]}
    if name == "initialize":
        info = params.get("clientInfo")
        client: dict[str, Any] = info if isinstance(info, dict) else {}
        facts["client"] = {
            "name": str(client.get("name", ""))[:VALUE_KEPT],
            "version": str(client.get("version", ""))[:VALUE_KEPT],
        }
        asked = params.get("protocolVersion")
        version = asked if asked in VERSIONS else VERSIONS[0]
        facts["protocol_version"] = version
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}, "resources": {}, "prompts": {}},
            "serverInfo": _SERVER,
        }
        # A new session for every initialize, as a real server hands out.
        headers = ((b"mcp-session-id", secrets.token_hex(16).encode()),)
        return _result(ident, result, facts, headers)
    if name == "ping":
        return _result(ident, {}, facts)
    if name == "tools/list":
        return _result(ident, {"tools": _TOOLS}, facts)
    if name == "resources/list":
        return _result(ident, {"resources": []}, facts)
    if name == "prompts/list":
        return _result(ident, {"prompts": []}, facts)
    if name == "tools/call":
        tool = params.get("name")
        facts["tool"] = str(tool)[:VALUE_KEPT] if tool is not None else None
        arguments = params.get("arguments")
        facts["arguments"] = json.dumps(arguments, ensure_ascii=True)[:ARGUMENTS_KEPT]
        refused = {
            "content": [
                {
                    "type": "text",
                    "text": "permission denied: this token is not authorised for that tool",
                }
            ],
            "isError": True,
        }
        return _result(ident, refused, facts)
    return _error(ident, _METHOD_NOT_FOUND, "Method not found", facts)


def _valid_id(ident: Any) -> bool:
    """A request id as JSON-RPC allows it (a string or an integer), short enough to echo."""
    if isinstance(ident, bool):
        return False
    if isinstance(ident, int):
        return abs(ident) < 2**63
    return isinstance(ident, str) and len(ident) <= MAX_ID_CHARS


def _result(
    ident: str | int,
    result: dict[str, Any],
    facts: dict[str, Any],
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> Answer:
    body = json.dumps({"jsonrpc": "2.0", "id": ident, "result": result}).encode()
    return Answer(200, body, headers, facts)


def _error(ident: str | int | None, code: int, text: str, facts: dict[str, Any]) -> Answer:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": text}}
    ).encode()
    status = 200 if ident is not None else 400
    return Answer(status, body, (), facts)
