"""The alert pipeline against a real local HTTP receiver standing in for every sink, clock controlled."""

import asyncio
import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from alerts import outbox as outbox_module
from alerts import pager as pager_module
from alerts import state as state_module
from alerts.deliveries import LEASE_US, escalation_route
from alerts.outbox import Outbox, Retry
from alerts.pager import Pager
from alerts.policy import DEFAULT_ROUTE, IgnoreRule, Match, Policy, Route, Sink
from alerts.render import for_hit
from alerts.state import AlertState, Timing, list_alerts
from canaries.model import Canary
from listeners.base import hit_event
from listeners.burst import BurstFolder, BurstOptions
from store import ledger
from store.clock import now_us
from store.ledger import Entry, Event
from store.schema import deliveries
from store.writer import LedgerWriter
from support import Receiver, hits, plant_canary, record_burst

MINUTE = 60_000_000
START = 1_800_000_000_000_000
SECRET = "0123456789abcdef-webhook"


@dataclass
class Clock:
    now: int = START

    def __call__(self) -> int:
        return self.now


def build_policy(receiver: Receiver, ignore: list[IgnoreRule] | None = None) -> Policy:
    return Policy(
        {
            DEFAULT_ROUTE: Route(
                DEFAULT_ROUTE, (Sink("apprise:0", "apprise", receiver.url("json", "/default")),)
            ),
            "oncall": Route(
                "oncall",
                (
                    Sink("apprise:0", "apprise", receiver.url("form", "/oncall")),
                    Sink("pagerduty", "pagerduty", receiver.http("/pd"), "routing-key-1"),
                    Sink("webhook:0", "webhook", receiver.http("/wh"), SECRET),
                ),
                Match(sandbox=("prod-*",)),
                escalate_after_us=15 * MINUTE,
                escalate_to="leads",
            ),
            "leads": Route(
                "leads", (Sink("apprise:0", "apprise", receiver.url("json", "/leads")),)
            ),
        },
        ignore or [],
    )


@dataclass
class Pipeline:
    engine: Engine
    state: AlertState
    outbox: Outbox
    clock: Clock

    canaries: dict[str, Canary] = field(default_factory=dict)

    def hit(
        self, sandbox: str = "prod-eu1", count: int = 1, source: str = "198.51.100.7"
    ) -> list[Entry]:
        """Record `count` DNS hits of the sandbox's canary, as the listener would, at the clock's time."""
        if sandbox not in self.canaries:
            self.canaries[sandbox] = plant_canary(self.engine, "dns", sandbox=sandbox)
        evidence = {"qname": "q.example.", "qtype": "A"}
        events = [
            replace(
                hit_event(
                    self.canaries[sandbox],
                    protocol="dns",
                    peer=(source, 4000),
                    node="n",
                    evidence=evidence,
                ),
                time_us=self.clock.now,
            )
            for _ in range(count)
        ]
        with self.engine.begin() as connection:
            return ledger.append(connection, events)

    async def run(self) -> int:
        queued = self.state.dispatch(self.clock.now)
        await self.outbox.work()
        return queued


@pytest.fixture
async def pipeline(engine: Engine, receiver: Receiver) -> Any:
    clock = Clock()
    policy = build_policy(receiver)
    outbox = Outbox(engine, policy, Retry(1_000_000, 8_000_000, 4), "n", clock)
    yield Pipeline(
        engine, AlertState(engine, policy, Timing(10 * MINUTE, 5 * MINUTE), "n"), outbox, clock
    )
    await outbox.close()


async def settle(outbox: Outbox, clock: Clock) -> None:
    """Work the outbox past every backoff until nothing is pending."""
    for _ in range(20):
        clock.now += 10_000_000
        await outbox.work()
    assert outbox.depth() == 0


async def test_a_sink_slower_than_an_attempt_is_retried_never_sent_twice_at_once(
    pipeline: Pipeline, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "ATTEMPT_SECONDS", 0.1)
    receiver.delay = 0.4
    pipeline.hit()
    assert await pipeline.run() == 3
    failed = hits(pipeline.engine, "alert_failed")
    # The HTTP sinks gave no answer in time; apprise's own timeout is its plugin's.
    assert any("no answer within" in entry.evidence["error"] for entry in failed)
    receiver.delay = 0.0
    await settle(pipeline.outbox, pipeline.clock)
    sent = hits(pipeline.engine, "alert_sent")
    deliveries = [entry.evidence["delivery"] for entry in sent]
    assert sorted(deliveries) == sorted(set(deliveries))
    assert len(deliveries) == 3


def verify_signature(headers: dict[str, str], body: bytes) -> bool:
    expected = hmac.new(
        SECRET.encode(), headers["X-Oobwatch-Timestamp"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(headers["X-Oobwatch-Signature"], f"sha256={expected}")


async def test_a_hit_pages_every_sink_of_every_matching_route(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    [hit] = pipeline.hit()
    assert await pipeline.run() == 3
    [alert] = list_alerts(pipeline.engine)
    by_path = {request.path: request for request in receiver.requests}
    assert set(by_path) == {"/oncall", "/pd", "/wh"}
    assert b"DNS+lookup+of+canary" in by_path["/oncall"].body  # apprise form:// is urlencoded
    pd = by_path["/pd"].json()
    assert pd["event_action"] == "trigger"
    assert pd["dedup_key"] == alert["id"]
    assert pd["routing_key"] == "routing-key-1"
    assert pd["payload"]["summary"].startswith(
        f"DNS lookup of canary {hit.canary_id} (sandbox prod-eu1"
    )
    webhook = by_path["/wh"]
    assert verify_signature(webhook.headers, webhook.body)
    assert not verify_signature({**webhook.headers, "X-Oobwatch-Timestamp": "1"}, webhook.body)
    body = webhook.json()
    assert body["purpose"] == "page"
    assert body["alert_id"] == alert["id"]
    sent = hits(pipeline.engine, "alert_sent")
    assert sorted(e.evidence["target"] for e in sent) == ["apprise:0", "pagerduty", "webhook:0"]
    assert {e.canary_id for e in sent} == {hit.canary_id}


async def test_unmatched_hits_go_to_the_default_route(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    pipeline.hit(sandbox="staging-3")
    assert await pipeline.run() == 1
    assert [request.path for request in receiver.requests] == ["/default"]


async def test_fifty_hits_one_page_then_digests_that_account_for_all(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    pipeline.hit(count=1)
    pipeline.hit(count=19, source="203.0.113.5")
    await pipeline.run()
    assert len(receiver.wait_for(1, path="/oncall")) == 1
    pipeline.clock.now += 5 * MINUTE
    pipeline.state.digests(pipeline.clock.now)
    pipeline.hit(count=30)
    await pipeline.run()
    pipeline.clock.now += 5 * MINUTE
    pipeline.state.digests(pipeline.clock.now)
    await pipeline.run()
    pages = [r.json() for r in receiver.requests if r.path == "/wh"]
    assert [page["purpose"] for page in pages] == ["page", "digest", "digest"]
    assert 1 + sum(page["new_hits"] for page in pages[1:]) == 50
    assert pages[-1]["total_hits"] == 50
    assert pages[-1]["message"]["title"].startswith("oobwatch: 30 more hits")
    [alert] = list_alerts(pipeline.engine)
    assert alert["hit_count"] == 50
    assert json.loads(alert["sources"]) == ["198.51.100.7", "203.0.113.5"]
    assert len(hits(pipeline.engine)) == 50  # every hit stays in the ledger


async def test_a_hit_after_the_window_opens_a_new_alert(pipeline: Pipeline) -> None:
    pipeline.hit()
    await pipeline.run()
    pipeline.clock.now += 11 * MINUTE
    pipeline.hit()
    await pipeline.run()
    assert len(list_alerts(pipeline.engine)) == 2


async def test_a_failing_sink_is_retried_until_it_accepts_and_pages_once(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    receiver.failing["/default"] = 3
    pipeline.hit(sandbox="dev-1")
    await pipeline.run()
    for _ in range(10):
        pipeline.clock.now += 10_000_000  # past any backoff
        await pipeline.outbox.work()
    assert len([r for r in receiver.attempts if r.path == "/default"]) == 4
    assert len(receiver.wait_for(1, path="/default")) == 1
    failures = hits(pipeline.engine, "alert_failed")
    assert [f.evidence["attempt"] for f in failures] == [1, 2, 3]
    assert not any(f.evidence["final"] for f in failures)
    [sent] = hits(pipeline.engine, "alert_sent")
    assert sent.evidence["attempt"] == 4


async def test_backoff_waits_before_retrying(pipeline: Pipeline, receiver: Receiver) -> None:
    receiver.failing["/default"] = 1
    pipeline.hit(sandbox="dev-1")
    await pipeline.run()
    await pipeline.outbox.work()  # same instant: nothing is due yet
    assert len(receiver.attempts) == 1
    pipeline.clock.now += 1_000_000
    await pipeline.outbox.work()
    assert len(receiver.requests) == 1


async def test_a_delivery_failing_past_its_limit_is_recorded_and_escalated(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    receiver.failing["/oncall"] = 100
    pipeline.hit()
    await pipeline.run()
    for _ in range(6):
        pipeline.clock.now += 10_000_000
        await pipeline.outbox.work()
    failures = [f for f in hits(pipeline.engine, "alert_failed") if f.evidence["route"] == "oncall"]
    assert len(failures) == 4
    assert failures[-1].evidence["final"] is True
    [escalated] = receiver.wait_for(1, path="/leads")
    assert b"DNS lookup" in escalated.body


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        ("oncall", "leads"),
        ("leads", DEFAULT_ROUTE),
        (DEFAULT_ROUTE, None),
        ("itself", DEFAULT_ROUTE),
        ("to-empty", DEFAULT_ROUTE),
    ],
)
def test_a_failed_delivery_escalates_only_to_another_route_with_sinks(
    receiver: Receiver, failed: str, expected: str | None
) -> None:
    policy = build_policy(receiver)
    sinks = policy.routes["leads"].sinks
    routes = {
        **policy.routes,
        "itself": Route("itself", sinks, escalate_to="itself"),
        "to-empty": Route("to-empty", sinks, escalate_to="empty"),
        "empty": Route("empty", ()),
    }
    target = escalation_route(Policy(routes), failed)
    assert (None if target is None else target.name) == expected
    no_default = Policy({**routes, DEFAULT_ROUTE: Route(DEFAULT_ROUTE, ())})
    assert escalation_route(no_default, "leads") is None


async def test_an_escalated_copy_that_fails_too_is_dead_lettered_not_passed_on(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    receiver.failing.update({"/oncall": 100, "/leads": 100})
    pipeline.hit()
    await pipeline.run()
    await settle(pipeline.outbox, pipeline.clock)
    finals = [f.evidence for f in hits(pipeline.engine, "alert_failed") if f.evidence["final"]]
    assert [(f["route"], f["escalated_to"]) for f in finals] == [
        ("oncall", "leads"),
        ("leads", None),
    ]
    assert pipeline.outbox.dead() == 1
    [alert] = list_alerts(pipeline.engine)
    assert alert["undelivered"] == 1
    # The default route (the notice route here) gets the notice, never the page itself.
    [notice] = receiver.wait_for(1, path="/default")
    assert notice.json()["title"] == "oobwatch: escalation NOT DELIVERED via leads/apprise:0"
    assert f"alert {alert['id']} via leads/apprise:0 after 4 attempts" in notice.json()["message"]
    assert "escalated from: oncall/apprise:0" in notice.json()["message"]


async def test_a_page_the_default_route_cannot_deliver_is_noticed_on_the_notice_route(
    engine: Engine, receiver: Receiver
) -> None:
    clock = Clock()
    policy = build_policy(receiver)
    outbox = Outbox(engine, policy, Retry(1_000_000, 8_000_000, 4), "n", clock, "oncall")
    pipeline = Pipeline(
        engine, AlertState(engine, policy, Timing(10 * MINUTE, 5 * MINUTE), "n"), outbox, clock
    )
    receiver.failing["/default"] = 100
    pipeline.hit(sandbox="dev-1")
    await pipeline.run()
    await settle(outbox, clock)
    await outbox.close()
    [final] = [f.evidence for f in hits(engine, "alert_failed") if f.evidence["final"]]
    assert final["escalated_to"] is None
    [alert] = list_alerts(engine)
    assert alert["undelivered"] == 1
    [webhook] = receiver.wait_for(1, path="/wh")
    notice = webhook.json()
    assert notice["purpose"] == "undelivered"
    assert notice["alert_id"] is None  # a notice about oobwatch, not a page of the alert
    assert notice["undelivered"] == {
        "delivery": final["delivery"],
        "alert_id": alert["id"],
        "purpose": "page",
        "route": DEFAULT_ROUTE,
        "sink": "apprise:0",
        "attempts": 4,
        "error": final["error"],
    }
    [pd] = receiver.wait_for(1, path="/pd")
    assert pd.json()["event_action"] == "trigger"
    assert pd.json()["dedup_key"] == f"undelivered-{final['delivery']}"
    assert pd.json()["payload"]["severity"] == "critical"
    assert len(receiver.wait_for(1, path="/oncall")) == 1


async def test_a_notice_that_cannot_be_delivered_is_not_noticed_again(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    receiver.failing["/default"] = 100
    pipeline.hit(sandbox="dev-1")
    await pipeline.run()
    await settle(pipeline.outbox, pipeline.clock)
    finals = [f.evidence for f in hits(pipeline.engine, "alert_failed") if f.evidence["final"]]
    assert [f["purpose"] for f in finals] == ["page", "undelivered"]
    assert pipeline.outbox.dead() == 2
    assert len([r for r in receiver.attempts if r.path == "/default"]) == 8
    [alert] = list_alerts(pipeline.engine)
    assert alert["undelivered"] == 1


async def test_unacknowledged_alerts_escalate_and_acknowledged_ones_do_not(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    pipeline.hit(sandbox="prod-a")
    pipeline.hit(sandbox="prod-b")
    await pipeline.run()
    first, second = list_alerts(pipeline.engine)
    pipeline.state.acknowledge(second["id"], "alice", pipeline.clock.now + MINUTE)
    pipeline.clock.now += 14 * MINUTE
    assert pipeline.state.escalations(pipeline.clock.now) == 0
    pipeline.clock.now += 2 * MINUTE
    assert pipeline.state.escalations(pipeline.clock.now) == 1
    assert pipeline.state.escalations(pipeline.clock.now) == 0  # once only
    await pipeline.outbox.work()
    [escalation] = receiver.wait_for(1, path="/leads")
    assert first["id"] in escalation.json()["message"]
    pd = [r.json() for r in receiver.requests if r.path == "/pd"]
    assert [(event["event_action"], event["dedup_key"]) for event in pd[2:]] == [
        ("acknowledge", second["id"])
    ]
    pipeline.state.resolve(second["id"], "alice", pipeline.clock.now)
    await pipeline.outbox.work()
    assert receiver.wait_for(4, path="/pd")[-1].json() == {
        "routing_key": "routing-key-1",
        "event_action": "resolve",
        "dedup_key": second["id"],
    }
    types = [e.type for e in hits(pipeline.engine, "alert_acked")] + [
        e.type for e in hits(pipeline.engine, "alert_resolved")
    ]
    assert types == ["alert_acked", "alert_resolved"]
    row, already = pipeline.state.acknowledge(second["id"], "bob", pipeline.clock.now)
    assert already
    assert row["status"] == "resolved"
    assert row["acked_by"] == "alice"
    assert len(hits(pipeline.engine, "alert_acked")) == 1
    with pytest.raises(LookupError):
        pipeline.state.resolve("al-nope", "bob", pipeline.clock.now)


async def test_ignore_rules_suppress_until_they_expire(engine: Engine, receiver: Receiver) -> None:
    import ipaddress

    clock = Clock()
    rule = IgnoreRule(
        "mail link scanner", cidr=ipaddress.ip_network("192.0.2.0/24"), expires_us=START + MINUTE
    )
    policy = build_policy(receiver, [rule])
    outbox = Outbox(engine, policy, Retry(1_000_000, 8_000_000, 4), "n", clock)
    pipeline = Pipeline(
        engine, AlertState(engine, policy, Timing(10 * MINUTE, 5 * MINUTE), "n"), outbox, clock
    )
    [suppressed_hit] = pipeline.hit(sandbox="dev-1", source="192.0.2.9")
    assert await pipeline.run() == 0
    [suppressed] = hits(engine, "suppressed")
    assert suppressed.evidence["hit_seq"] == suppressed_hit.seq
    assert suppressed.evidence["reason"] == "mail link scanner"
    clock.now += 2 * MINUTE
    pipeline.hit(sandbox="dev-1", source="192.0.2.9")
    assert await pipeline.run() == 1
    assert len(receiver.requests) == 1
    await outbox.close()


async def test_dispatch_is_exactly_once_across_dispatchers(
    pipeline: Pipeline, engine: Engine, receiver: Receiver
) -> None:
    pipeline.hit(sandbox="dev-1", count=3)
    other = AlertState(
        engine, build_policy(receiver), Timing(10 * MINUTE, 5 * MINUTE), "other-node"
    )
    assert pipeline.state.dispatch(pipeline.clock.now) == 1
    assert other.dispatch(pipeline.clock.now) == 0
    assert len(list_alerts(engine)) == 1


async def test_a_dispatcher_that_loses_the_cursor_to_another_reads_on(
    pipeline: Pipeline, engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another node dispatches the hits this one read before it took the lock: the batch
    is theirs, and this dispatch goes on to the hits after them (a first hit among them
    must not wait for the next tick)."""
    other = AlertState(
        engine, build_policy(receiver), Timing(10 * MINUTE, 5 * MINUTE), "other-node"
    )
    pipeline.hit(sandbox="dev-1", count=3)
    [first] = pipeline.hit(sandbox="dev-2")
    real_lock = state_module._lock
    raced: list[int] = []

    def lock_after_the_other_node(connection: Any) -> int:
        if not raced:
            raced.append(0)  # the other node's own dispatch takes the lock as it is
            raced[0] = other.dispatch(pipeline.clock.now, batches=1, batch=3)
        return real_lock(connection)

    monkeypatch.setattr(state_module, "_lock", lock_after_the_other_node)
    assert pipeline.state.dispatch(pipeline.clock.now, batches=1) == 1
    assert raced == [1]
    assert pipeline.state.last_dispatched == 1
    opened = {alert["first_hit_seq"]: alert["sandbox"] for alert in list_alerts(engine)}
    assert opened[first.seq] == "dev-2"


async def test_a_resolve_during_a_dispatch_is_not_undone_by_its_hints(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolve from another thread (the API's) that comes while a dispatch folds into
    the alert: after both, the canary's next hit may open an alert, so it pages at once."""
    pipeline.hit()
    await pipeline.run()
    [alert] = list_alerts(pipeline.engine)
    pipeline.hit()
    remember = AlertState._remember_windows
    resolving: list[threading.Thread] = []

    def resolve_meanwhile(state: AlertState, folds: Any) -> None:
        resolver = threading.Thread(
            target=state.resolve, args=(alert["id"], "alice", pipeline.clock.now)
        )
        resolver.start()
        resolving.append(resolver)
        resolver.join(0.3)  # it waits for the dispatch's lock, if the dispatch holds it
        remember(state, folds)

    monkeypatch.setattr(AlertState, "_remember_windows", resolve_meanwhile)
    pipeline.state.dispatch(pipeline.clock.now)
    resolving[0].join(10)
    assert list_alerts(pipeline.engine)[0]["status"] == "resolved"
    [after] = pipeline.hit()
    assert pipeline.state.may_open(after)


async def test_a_first_page_is_handed_to_its_own_sender_leased_and_no_other_takes_it(
    pipeline: Pipeline, engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline.hit()
    owner = pipeline.outbox.owner
    assert pipeline.state.dispatch(pipeline.clock.now, lease=pipeline.outbox.lease()) == 3
    leased = pipeline.state.leased
    assert [row["lease_owner"] for row in leased] == [owner] * 3
    with engine.connect() as connection:
        stored = connection.execute(select(deliveries.c.lease_owner)).scalars().all()
    assert stored == [owner] * 3
    other = Outbox(engine, build_policy(receiver), Retry(1_000_000, 8_000_000, 4), "m", Clock())
    try:
        assert await other.work() == 0  # leased: another node's sender does not take them
    finally:
        await other.close()
    claims: list[int] = []
    claim = pipeline.outbox._claim

    def slow_claim(now: int, room: int, sending: Any, stale: Any) -> Any:
        time.sleep(0.5)  # a store that takes its time
        claims.append(len(receiver.requests))
        return claim(now, room, sending, stale)

    monkeypatch.setattr(pipeline.outbox, "_claim", slow_claim)
    pipeline.outbox._claimed_at -= 5  # claims are overdue, as after any quiet second
    pipeline.outbox.hand(leased)
    assert await pipeline.outbox.work() == 3
    # The pages did not wait for the claim: they were out while it was still running.
    assert claims
    assert claims[0] == 3
    assert len(hits(engine, "alert_sent")) == 3
    assert pipeline.outbox.depth() == 0


async def test_a_page_handed_while_outcomes_are_written_does_not_wait_for_the_write(
    pipeline: Pipeline, engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline.hit()
    pipeline.state.dispatch(pipeline.clock.now, lease=pipeline.outbox.lease())
    pipeline.outbox.hand(pipeline.state.leased)
    written: list[int] = []
    record = pipeline.outbox._record

    def slow_record(outcomes: Any, now: int) -> None:
        time.sleep(0.5)  # a store busy with the listeners' commits
        written.append(len(receiver.requests))
        record(outcomes, now)

    monkeypatch.setattr(pipeline.outbox, "_record", slow_record)
    working = asyncio.create_task(pipeline.outbox.work())
    for _ in range(200):
        if len(receiver.requests) == 3:
            break
        await asyncio.sleep(0.01)
    pipeline.hit(sandbox="dev-1")
    pipeline.state.dispatch(pipeline.clock.now, lease=pipeline.outbox.lease())
    pipeline.outbox.hand(pipeline.state.leased)
    assert await working == 4
    # The second alert's page was out before the first alert's outcomes were written.
    assert written[0] == 4
    assert len(hits(engine, "alert_sent")) == 4
    assert pipeline.outbox.depth() == 0


async def test_a_handed_page_whose_lease_ran_short_is_not_sent_on_it(
    pipeline: Pipeline, engine: Engine, receiver: Receiver
) -> None:
    """Handed rows wait while the sender is busy: one whose lease another sender has since
    taken over is left to that sender, and sent once."""
    pipeline.hit()
    pipeline.state.dispatch(pipeline.clock.now, lease=pipeline.outbox.lease())
    pipeline.outbox.hand(pipeline.state.leased)
    later = Clock()
    later.now = pipeline.clock.now + 31_000_000
    other = Outbox(engine, build_policy(receiver), Retry(1_000_000, 8_000_000, 4), "m", later)
    try:
        assert await other.work() == 3
    finally:
        await other.close()
    pipeline.clock.now = later.now
    assert await pipeline.outbox.work() == 0
    assert len(receiver.requests) == 3
    assert len(hits(engine, "alert_sent")) == 3


async def test_a_handed_page_with_less_than_an_attempt_of_lease_left_is_claimed_anew(
    pipeline: Pipeline, engine: Engine, receiver: Receiver
) -> None:
    pipeline.hit()
    pipeline.state.dispatch(pipeline.clock.now, lease=pipeline.outbox.lease())
    pipeline.outbox.hand(pipeline.state.leased)
    pipeline.clock.now += 6_000_000  # 24 s of its 30 s lease left: less than an attempt needs
    assert await pipeline.outbox.work() == 3
    assert len(receiver.requests) == 3
    with engine.connect() as connection:
        leases = connection.execute(select(deliveries.c.lease_until_us)).scalars().all()
    # Given back and claimed again: sent on a lease of its own, not on the one it was handed.
    assert leases == [pipeline.clock.now + LEASE_US] * 3


async def test_a_dispatch_leases_no_more_first_pages_than_its_sender_can_start(
    pipeline: Pipeline, engine: Engine
) -> None:
    """A hundred canaries at once, one sink each: as many leased as the sender can start."""
    for sandbox in range(100):
        pipeline.hit(sandbox=f"sbx-{sandbox}")
    lease = pipeline.outbox.lease()
    assert lease is not None
    assert pipeline.state.dispatch(pipeline.clock.now, lease=lease) == 100
    assert len(pipeline.state.leased) == lease.room
    with engine.connect() as connection:
        owners = connection.execute(select(deliveries.c.lease_owner)).scalars().all()
    assert owners.count(None) == 100 - lease.room
    pipeline.outbox.hand(pipeline.state.leased)
    assert pipeline.outbox.lease() is None
    await settle(pipeline.outbox, pipeline.clock)
    assert len(hits(engine, "alert_sent")) == 100


async def test_a_restarted_node_takes_back_the_leases_it_died_holding(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    for sandbox in ("dev-1", "dev-2", "dev-3"):
        pipeline.hit(sandbox=sandbox)
    pipeline.state.dispatch(pipeline.clock.now)
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    leased_until = pipeline.clock.now + 60_000_000
    owners = {
        1: f"n:{dead.pid}:0a1b2c3d",  # a process of node "n" that died mid-send
        2: f"n:{os.getppid()}:0a1b2c3d",  # one that lives
        # This pid before a restart: in a container the node is PID 1 every time.
        3: f"n:{os.getpid()}:0a1b2c3d",
    }
    with pipeline.engine.begin() as connection:
        for delivery, owner in owners.items():
            connection.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery)
                .values(lease_until_us=leased_until, lease_owner=owner)
            )
    assert await pipeline.outbox.work() == 0
    assert pipeline.outbox.release_own_leases() == 2
    assert await pipeline.outbox.work() == 2
    assert len(receiver.requests) == 2


async def test_a_burst_pages_once_and_its_digest_counts_every_hit(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    canary = plant_canary(pipeline.engine, "dns", sandbox="prod-eu1")
    await record_burst(pipeline.engine, canary, 5_000)
    pipeline.clock.now = now_us()
    await pipeline.run()
    assert [r.json()["purpose"] for r in receiver.wait_for(1, path="/wh")] == ["page"]
    pipeline.clock.now += 5 * MINUTE
    pipeline.state.digests(pipeline.clock.now)
    await pipeline.run()
    pages = [r.json() for r in receiver.requests if r.path == "/wh"]
    assert [page["purpose"] for page in pages] == ["page", "digest"]
    assert pages[1]["new_hits"] == 4_999
    assert pages[1]["total_hits"] == 5_000
    [burst] = [value for label, value, _ in pages[1]["message"]["lines"] if label == "burst"]
    assert burst.startswith(f"5,000 lookups of canary {canary.id} from 3 sources in ")
    [alert] = list_alerts(pipeline.engine)
    assert alert["hit_count"] == 5_000
    assert json.loads(alert["sources"]) == ["198.51.100.1", "198.51.100.2", "198.51.100.3"]


async def test_an_alert_a_burst_opens_says_it_is_a_burst(engine: Engine) -> None:
    canary = plant_canary(engine, "dns", sandbox="prod-eu1")
    await record_burst(engine, canary, 1_200, sources=2)
    aggregate = hits(engine)[-1]
    message = for_hit(aggregate, "al-1")
    assert message.headline.startswith(
        f"Burst: 1,200 lookups of canary {canary.id} from 2 sources in "
    )
    assert message.headline.endswith(
        "; 4.8 KB of data, first 4.8 KB kept (sandbox prod-eu1, planted at /etc/hosts)"
    )
    [data] = [line for line in message.lines if line.label == "data"]
    assert data.untrusted
    assert data.value.startswith('["d1", "d2", ')


async def test_an_ignored_client_cannot_carry_a_burst_from_elsewhere_into_silence(
    engine: Engine,
) -> None:
    """The first folded hit is an ignored monitor's; the rest of the burst is not."""
    rule = IgnoreRule("uptime monitor", user_agent=re.compile("UptimeBot"))
    policy = Policy({DEFAULT_ROUTE: Route(DEFAULT_ROUTE, ())}, [rule])
    state = AlertState(engine, policy, Timing(10 * MINUTE, 5 * MINUTE), "n")
    canary = plant_canary(engine, "url", sandbox="prod-eu1")
    writer = LedgerWriter(engine)
    writer.start()
    folder = BurstFolder(writer, BurstOptions(threshold=1, interval=5))

    def hit(source: str, agent: str) -> Event:
        evidence = {"method": "GET", "target": "/", "user_agent": agent}
        return hit_event(canary, protocol="http", peer=(source, 1), node="n", evidence=evidence)

    monitor_only = [hit("127.0.0.1", "UptimeBot/1.0") for _ in range(5)]
    mixed = [hit("127.0.0.1", "UptimeBot/1.0"), *(hit("127.0.0.3", "exfil/1") for _ in range(20))]
    for events in ([hit("127.0.0.1", "UptimeBot/1.0")], monitor_only, mixed):
        await asyncio.gather(*(folder.append(event) for event in events), asyncio.sleep(0))
        folder.close()
    await writer.stop()
    state.dispatch(now_us())
    suppressed = {entry.evidence["hit_seq"] for entry in hits(engine, "suppressed")}
    rows = hits(engine)
    assert [row.hits for row in rows] == [1, 5, 21]
    # The single monitor hit and the aggregate of monitor hits only are silenced; the mixed one pages.
    assert suppressed == {rows[0].seq, rows[1].seq}
    [alert] = list_alerts(engine)
    assert alert["hit_count"] == 21


async def test_only_a_hit_that_may_open_an_alert_is_dispatched_at_once(
    pipeline: Pipeline,
) -> None:
    [first] = pipeline.hit()
    assert pipeline.state.may_open(first)  # no alert seen open: dispatch now, it pages
    await pipeline.run()
    [folded] = pipeline.hit()
    assert not pipeline.state.may_open(folded)  # folds into the open alert: may wait
    [other] = pipeline.hit(sandbox="prod-us2")
    assert pipeline.state.may_open(other)
    pipeline.clock.now += 11 * MINUTE
    [late] = pipeline.hit()
    assert pipeline.state.may_open(late)  # past the window: a new alert
    await pipeline.run()
    [alert] = [a for a in list_alerts(pipeline.engine) if a["first_hit_seq"] == late.seq]
    [after] = pipeline.hit()
    assert not pipeline.state.may_open(after)
    pipeline.state.resolve(alert["id"], "alice", pipeline.clock.now)
    assert pipeline.state.may_open(after)  # resolved here: its next hit opens one


async def test_folds_are_dispatched_in_chunks_and_a_hit_that_may_page_ends_them(
    engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hits that only fold wait for the fold delay, then go FOLD_CHUNK at a time, so that
    appends queued meanwhile are not held behind one long dispatch; a hit that may open
    an alert commits between two chunks and the next dispatch takes a whole batch."""
    monkeypatch.setattr(pager_module, "FOLD_DELAY_SECONDS", 0.3)
    policy = build_policy(receiver)
    outbox = Outbox(engine, policy, Retry(1_000_000, 8_000_000, 4), "n", now_us)
    state = AlertState(engine, policy, Timing(10 * MINUTE, 5 * MINUTE), "n")
    writer = LedgerWriter(engine)
    writer.start()
    canaries = [plant_canary(engine, "dns", sandbox=name) for name in ("prod-eu1", "prod-us2")]
    taken: list[int] = []
    interposed: list[Event] = []

    def hit(canary: Canary) -> Event:
        evidence = {"qname": "q.example.", "qtype": "A"}
        return hit_event(
            canary, protocol="dns", peer=("198.51.100.7", 1), node="n", evidence=evidence
        )

    async def store_work(work: Any) -> Any:
        done = await writer.call(work)
        taken.append(state.last_dispatched)
        if interposed:
            await writer.append(interposed.pop())
        return done

    pager = Pager(state, outbox, now_us, store_work)
    writer.subscribe(pager.committed)
    pager.start()
    try:
        await writer.append(hit(canaries[0]))
        await asyncio.to_thread(receiver.wait_for, 3)
        assert 1 in taken  # the first hit opens the alert at once
        await asyncio.sleep(0.1)  # and any dispatch its commit asked for is over
        for interpose in ([], [hit(canaries[1])]):
            taken.clear()
            interposed[:] = interpose
            await writer.append(*(hit(canaries[0]) for _ in range(35)))
            await asyncio.sleep(0.15)
            assert not any(taken)  # they wait for the fold delay
            for _ in range(200):
                if sum(taken) == 35 + len(interpose):
                    break
                await asyncio.sleep(0.01)
            assert [n for n in taken if n] == ([10, 26] if interpose else [10, 10, 10, 5])
        opened = {alert["canary_id"]: alert["hit_count"] for alert in list_alerts(engine)}
        assert opened == {canaries[0].id: 71, canaries[1].id: 1}
        await asyncio.to_thread(receiver.wait_for, 6)
    finally:
        await pager.stop()
        await writer.stop()


def test_an_aggregate_is_told_from_a_single_hit_without_parsing() -> None:
    single = Entry(1, START, "hit", "c", "s", "dns", "198.51.100.7", "n", '{"qname":"x"}', "", "")
    assert not single.aggregate
    assert single.hits == 1
    burst = replace(single, data='{"burst":{"count":7}}')
    assert burst.aggregate
    assert burst.hits == 7
    sandbox_text = replace(single, data='{"qname":"\\"burst\\":{"}')
    assert not sandbox_text.aggregate
    assert sandbox_text.hits == 1
