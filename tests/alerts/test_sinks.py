"""Apprise sinks: each page arrives at a real local receiver in the format its URL asks for."""

from urllib.parse import parse_qs

import pytest
from sqlalchemy import Engine

from alerts.deliveries import delivery_payload, enqueue
from alerts.outbox import Outbox, Retry
from alerts.policy import DEFAULT_ROUTE, Policy, Route, Sink
from alerts.render import Format, Line, Message, render
from support import Receiver

MESSAGE = Message(
    "oobwatch: DNS canary hit, sandbox prod-1",
    "DNS lookup of canary cn-1 (sandbox prod-1) from 198.51.100.7",
    [Line("labels", '{"team": "red_team"}'), Line("qname", "<b>x</b>.evil.example", True)],
)


@pytest.mark.parametrize(
    ("scheme", "query", "fmt"),
    [
        ("json", "", "text"),
        ("json", "?format=markdown", "markdown"),
        ("form", "?format=html", "html"),
    ],
)
async def test_a_page_is_rendered_in_the_format_its_route_url_asks_for(
    sqlite_engine: Engine, receiver: Receiver, scheme: str, query: str, fmt: Format
) -> None:
    route = Route(DEFAULT_ROUTE, (Sink("apprise:0", "apprise", receiver.url(scheme) + query),))
    outbox = Outbox(sqlite_engine, Policy({DEFAULT_ROUTE: route}), Retry(1, 1, 1), "n", lambda: 0)
    with sqlite_engine.begin() as connection:
        payload = delivery_payload("page", node="n", dedup_key="al-1", message=MESSAGE)
        enqueue(connection, route, payload, 0)
    assert await outbox.work() == 1
    await outbox.close()
    [page] = receiver.wait_for(1)
    if scheme == "json":
        fields = page.json()
    else:
        fields = {key: value for key, [value] in parse_qs(page.body.decode()).items()}
    assert (fields["title"], fields["message"]) == render(MESSAGE, fmt)
