"""Where pages go: any apprise URL, PagerDuty Events v2, and signed webhooks.

Each sink sends one delivery and raises DeliveryFailed when it was not
accepted; the sender records the outcome and retries. PagerDuty is spoken
natively because apprise's plugin sends no dedup_key, so it could neither
fold repeats into one incident nor acknowledge or resolve it.
"""

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import apprise
import httpx

from alerts.policy import Sink
from alerts.render import Format, Message, render

TIMEOUT_SECONDS = 10.0
SIGNATURE_HEADER = "X-Oobwatch-Signature"
TIMESTAMP_HEADER = "X-Oobwatch-Timestamp"
DELIVERY_HEADER = "X-Oobwatch-Delivery"

_PAGERDUTY_ACTIONS = {"ack": "acknowledge", "resolve": "resolve", "recovery": "resolve"}
_FORMATS: dict[apprise.NotifyFormat, Format] = {
    apprise.NotifyFormat.TEXT: "text",
    apprise.NotifyFormat.MARKDOWN: "markdown",
    apprise.NotifyFormat.HTML: "html",
}


class DeliveryFailed(Exception):
    """The sink did not accept the delivery; the message says why."""


class Sender(Protocol):
    async def send(self, delivery_id: int, payload: dict[str, Any]) -> None: ...


def check_url(url: str) -> str | None:
    """None if apprise can send to `url`, otherwise why not."""
    # apprise logs its own error for a URL it cannot parse; the caller reports this one.
    chatter = logging.getLogger("apprise")
    chatter.disabled = True
    try:
        recognised = apprise.Apprise.instantiate(url) is not None
    finally:
        chatter.disabled = False
    return None if recognised else "apprise does not recognise this notification URL"


def mask(url: str) -> str:
    """A URL safe to log and record: scheme and host only, no tokens or passwords."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}/..."


# apprise sends block a thread each: on threads of their own, a hung service cannot
# hold up the store work (claims, records, dispatch) in the shared pool.
_SENDING = ThreadPoolExecutor(max_workers=16, thread_name_prefix="apprise")


class AppriseSink:
    """Any apprise URL, rendered in the format that service displays."""

    def __init__(self, url: str) -> None:
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None:
            raise ValueError(f"apprise does not recognise {mask(url)}")
        # The format this URL sends: its `?format=` if it has one, else what its service displays.
        self._format: Format = _FORMATS[plugin.resolve_format()]
        # The service's own plugin, called directly: apprise.Apprise.notify would start a
        # thread pool for every page, a few milliseconds each under load.
        self._plugin = plugin
        self._url = url

    async def send(self, delivery_id: int, payload: dict[str, Any]) -> None:
        title, body = render(Message.from_json(payload["message"]), self._format)
        accepted = await asyncio.get_running_loop().run_in_executor(
            _SENDING,
            functools.partial(
                self._plugin.notify, body=body, title=title, body_format=self._format
            ),
        )
        # apprise returns a result object whose `== False` is False even on failure.
        if not bool(accepted):
            raise DeliveryFailed(f"{mask(self._url)} did not accept the notification")


class PagerDutySink:
    """PagerDuty Events API v2: trigger, acknowledge and resolve, keyed by the alert."""

    def __init__(self, client: httpx.AsyncClient, url: str, routing_key: str) -> None:
        self._client = client
        self._url = url
        self._routing_key = routing_key

    async def send(self, delivery_id: int, payload: dict[str, Any]) -> None:
        action = _PAGERDUTY_ACTIONS.get(payload["purpose"], "trigger")
        event: dict[str, Any] = {
            "routing_key": self._routing_key,
            "event_action": action,
            "dedup_key": payload["dedup_key"],
        }
        if action == "trigger":
            message = Message.from_json(payload["message"])
            title, body = render(message, "text")
            event["payload"] = {
                "summary": message.headline[:1024],
                "source": payload.get("node", "oobwatch"),
                "severity": _pagerduty_severity(payload.get("severity")),
                "component": payload.get("sandbox") or "oobwatch",
                "group": payload.get("route"),
                "class": payload["purpose"],
                "custom_details": {"title": title, "details": body},
            }
        await _post(self._client, self._url, json.dumps(event).encode(), {})


class WebhookSink:
    """A JSON POST signed with HMAC-SHA256 over `<timestamp>.<body>`."""

    def __init__(self, client: httpx.AsyncClient, url: str, secret: str) -> None:
        self._client = client
        self._url = url
        self._secret = secret.encode()

    async def send(self, delivery_id: int, payload: dict[str, Any]) -> None:
        body = json.dumps({"delivery": delivery_id, **payload}, sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: "sha256=" + sign(self._secret, timestamp, body),
            DELIVERY_HEADER: str(delivery_id),
        }
        await _post(self._client, self._url, body, headers)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def build(sink: Sink, client: httpx.AsyncClient) -> Sender:
    if sink.kind == "pagerduty":
        return PagerDutySink(client, sink.url, sink.secret)
    if sink.kind == "webhook":
        return WebhookSink(client, sink.url, sink.secret)
    return AppriseSink(sink.url)


def _pagerduty_severity(severity: Any) -> str:
    return {"critical": "critical", "high": "error", "medium": "warning", "low": "info"}.get(
        str(severity), "error"
    )


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> None:
    try:
        response = await client.post(
            url,
            content=body,
            headers={"Content-Type": "application/json", **headers},
            timeout=TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as error:
        raise DeliveryFailed(f"{mask(url)}: {type(error).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(f"{mask(url)} answered {response.status_code}")
