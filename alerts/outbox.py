"""The outbox: deliveries are written here in the transaction that decides them, then sent.

`alerts.deliveries.enqueue` writes one pending delivery per sink of a
route, inside the caller's transaction; the `Outbox` sender works them until
each is sent or given up.

Deliveries are claimed with a lease, so a second node (or a restarted one)
never sends a delivery another is sending. A first page comes leased
already, handed over by the dispatcher that wrote it (`hand`). Each attempt is a ledger event.
A failed attempt is retried with exponential backoff and full jitter; one
that fails `max_attempts` times is given up. It is escalated once, to
another route (`failed`); with no other route to take it, or when the
escalated copy fails too, it is dead-lettered (`dead`) and the notice route
is told. Each sink is called on its own, so one failing never holds up the others.

Delivery is at least once: a crash between a sink accepting a delivery and
its row being marked sent sends it again after restart. PagerDuty folds
such repeats by dedup_key; webhook receivers get the delivery id to do the same.
"""

import asyncio
import collections
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, RowMapping, bindparam, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from alerts import notices, sinks
from alerts.deliveries import LEASE_US, Lease, enqueue, escalation_route
from alerts.policy import DEFAULT_ROUTE, Policy
from alerts.sinks import DeliveryFailed, Sender
from store import ledger
from store.ledger import Event
from store.schema import deliveries

log = logging.getLogger(__name__)

ATTEMPT_SECONDS = 20.0
# A handed delivery is sent on the lease it was written with only if an attempt, and the
# record of it, fit in what is left; else it goes back to the store and is claimed anew.
SAFE_LEASE_US = int(ATTEMPT_SECONDS * 1_000_000) + 5_000_000
# While handed pages keep coming, the store is still looked at this often for due retries.
CLAIM_EVERY_SECONDS = 1.0
BATCH = 50
# Deliveries being sent at once by one node.
IN_FLIGHT = 64

# Built once: every page runs them.
_DUE_NOW = (
    deliveries.c.status == "pending",
    deliveries.c.next_attempt_us <= bindparam("now"),
    deliveries.c.lease_until_us <= bindparam("now"),
)
_DUE = select(deliveries).where(*_DUE_NOW).order_by(deliveries.c.id).limit(BATCH)
# Only while this process still holds the lease it sent under.
_ONE = update(deliveries).where(
    deliveries.c.id == bindparam("delivery"),
    deliveries.c.status == "pending",
    deliveries.c.lease_owner == bindparam("owner"),
)
_SENT = _ONE.values(status="sent", sent_us=bindparam("at"), attempts=bindparam("attempt"))
_GIVE_BACK = _ONE.where(deliveries.c.lease_until_us == bindparam("until")).values(
    lease_until_us=0, lease_owner=None
)
_RETRY = _ONE.values(
    attempts=bindparam("attempt"),
    last_error=bindparam("error"),
    next_attempt_us=bindparam("next"),
    lease_until_us=0,
)
_TAKE = (
    update(deliveries)
    .where(deliveries.c.id == bindparam("delivery"), *_DUE_NOW)
    .values(lease_until_us=bindparam("until"), lease_owner=bindparam("owner"))
)


@dataclass(frozen=True, slots=True)
class Retry:
    """How failed deliveries are retried."""

    base_us: int
    max_us: int
    max_attempts: int

    def delay_us(self, attempts: int) -> int:
        ceiling = min(self.max_us, self.base_us * 2 ** (attempts - 1))
        # Full jitter: retries from many alerts do not arrive at a recovering sink together.
        return random.randint(ceiling // 2, ceiling)  # noqa: S311 - spreading load, not secrecy


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery: RowMapping
    error: str | None


def _running(owner: str, own: str) -> bool:
    """Whether the process named in a lease owner `node:pid:incarnation` still runs on this
    host; `own` is this process's owner. This pid under another incarnation is a restart
    (in a container, the node is PID 1 every time)."""
    if owner == own:
        return True
    try:
        pid = int(owner.rsplit(":", 2)[1])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Outbox:
    """Sends due deliveries through their sinks and records every attempt."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        retry: Retry,
        node: str,
        clock: Callable[[], int],
        notice_route: str | None = None,
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._retry = retry
        self._node = node
        self._clock = clock
        self._notice_route = notice_route or DEFAULT_ROUTE
        self._client = httpx.AsyncClient(follow_redirects=False)
        self._senders: dict[tuple[str, str], Sender] = {}
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        # Several processes on one host may share a node name: leases name the process.
        self.owner = f"{node}:{os.getpid()}:{secrets.token_hex(4)}"
        # Deliveries written leased to this sender, committed, not yet attempted; and those
        # that waited too long for it to be safe to send them on that lease.
        self._handed: collections.deque[RowMapping] = collections.deque()
        self._stale: list[tuple[int, int]] = []
        self._sending = 0
        self._claimed_at = time.monotonic()
        self.sent = 0
        self.failed = 0

    async def close(self) -> None:
        await self._client.aclose()

    def release_own_leases(self) -> int:
        """At start: leases held by this node's processes that are no longer running are free."""
        released = 0
        with self._engine.begin() as connection:
            owners = connection.execute(
                select(deliveries.c.lease_owner)
                .where(
                    deliveries.c.status == "pending",
                    deliveries.c.lease_owner.like(f"{self._node}:%"),
                )
                .distinct()
            ).scalars()
            for owner in [owner for owner in owners if not _running(owner, self.owner)]:
                released += connection.execute(
                    update(deliveries)
                    .where(deliveries.c.status == "pending", deliveries.c.lease_owner == owner)
                    .values(lease_until_us=0, lease_owner=None)
                ).rowcount
        return released

    def depth(self) -> int:
        """Deliveries not yet sent or given up."""
        return self._count("pending")

    def dead(self) -> int:
        """Deliveries given up with no other route to take them."""
        return self._count("dead")

    def _count(self, status: str) -> int:
        with self._engine.connect() as connection:
            query = (
                select(func.count()).select_from(deliveries).where(deliveries.c.status == status)
            )
            return int(connection.execute(query).scalar_one())

    def wake(self) -> None:
        """New deliveries may be due: a `work()` in progress claims them without waiting."""
        self._wakeup.set()

    def lease(self) -> Lease | None:
        """How many deliveries may be written leased to this sender now: what it can start
        sending at once (more would wait, and their lease run out); None if none."""
        room = IN_FLIGHT - self._sending - len(self._handed)
        return Lease(self.owner, room) if room > 0 else None

    def hand(self, rows: Collection[RowMapping]) -> None:
        """Committed deliveries leased to this sender (`owner`): attempted before any claim."""
        self._handed.extend(rows)
        if rows:
            self.wake()

    def _take_handed(self, room: int, sending: Collection[int]) -> list[RowMapping]:
        """Up to `room` handed deliveries with lease enough left for an attempt; the others
        are given back to the store at the next claim (none this sender is sending: a claim
        took it already)."""
        taken: list[RowMapping] = []
        now_us = self._clock()
        while self._handed and len(taken) < room:
            row = self._handed.popleft()
            if row["id"] in sending:
                continue
            if row["lease_until_us"] - now_us >= SAFE_LEASE_US:
                taken.append(row)
            else:
                self._stale.append((row["id"], row["lease_until_us"]))
        return taken

    async def work(self) -> int:
        """Send every due delivery once; returns how many were attempted.

        Sends run side by side (up to IN_FLIGHT), and deliveries that come due
        while others are being sent are claimed at once, not after them: one
        slow sink cannot hold up the next page. Each outcome is recorded as it
        comes, beside the sends: a page handed meanwhile does not wait for the
        write (on SQLite it may wait out the busy handler, several milliseconds,
        behind the listeners' commits). `work` returns when nothing is due,
        in flight or being recorded.
        """
        async with self._lock:
            attempted = 0
            in_flight: dict[asyncio.Task[Outcome], int] = {}
            # Outcomes being written: a handed page does not wait for them.
            recording: set[asyncio.Task[None]] = set()
            woken: asyncio.Task[Any] | None = None
            try:
                while True:
                    self._wakeup.clear()
                    # Handed pages go out first: a claim transaction never holds them up.
                    handed = self._take_handed(IN_FLIGHT - len(in_flight), set(in_flight.values()))
                    for row in handed:
                        in_flight[asyncio.create_task(self._attempt(row))] = row["id"]
                    attempted += len(handed)
                    self._sending = len(in_flight)
                    room = IN_FLIGHT - len(in_flight)
                    overdue = time.monotonic() - self._claimed_at >= CLAIM_EVERY_SECONDS
                    # Not beside a write of outcomes: two write transactions of one process
                    # would meet in SQLite's busy handler, and one could fail.
                    claim = not recording and (not handed or self._stale or overdue)
                    if room > 0 and claim:
                        due = await self._claim_safely(room, set(in_flight.values()))
                        for row in due:
                            in_flight[asyncio.create_task(self._attempt(row))] = row["id"]
                        attempted += len(due)
                        self._sending = len(in_flight)
                    if not in_flight and not recording:
                        return attempted
                    woken = asyncio.create_task(self._wakeup.wait())
                    await asyncio.wait(
                        {*in_flight, *recording, woken}, return_when=asyncio.FIRST_COMPLETED
                    )
                    woken.cancel()
                    for written in [written for written in recording if written.done()]:
                        recording.discard(written)
                        written.result()  # a failed write ends the work: see below
                    finished = [task for task in in_flight if task.done()]
                    for task in finished:
                        del in_flight[task]
                    self._sending = len(in_flight)
                    if finished:
                        outcomes = [task.result() for task in finished]
                        writing = asyncio.to_thread(self._record, outcomes, self._clock())
                        recording.add(asyncio.create_task(writing))
            finally:
                # Only if recording failed or we are stopping: the leases run out and the
                # sends are retried (at least once, never lost). Outcomes being written are
                # left to finish in their thread.
                for task in [*in_flight, *([woken] if woken is not None else [])]:
                    task.cancel()
                self._sending = 0

    async def _claim_safely(self, room: int, sending: Collection[int]) -> list[RowMapping]:
        """Claim what is due; when the store fails, nothing (what is in flight goes on, and
        the stale leases wait for the next claim)."""
        stale, self._stale = self._stale, []
        try:
            return await asyncio.to_thread(self._claim, self._clock(), room, sending, stale)
        except SQLAlchemyError as error:
            self._stale = stale + self._stale
            log.warning("claiming due deliveries failed: %s", error)
            return []
        finally:
            self._claimed_at = time.monotonic()

    def _claim(
        self,
        now_us: int,
        room: int,
        sending: Collection[int],
        stale: Collection[tuple[int, int]] = (),
    ) -> list[RowMapping]:
        """Lease up to `room` due deliveries to this process, leaving out those it is sending;
        first give up the `stale` leases, (delivery, lease end) it was handed too late to send
        on (only those: a lease it has claimed since is its own)."""
        claimed: list[RowMapping] = []
        with self._engine.begin() as connection:
            if stale:
                given_back = [
                    {"delivery": id_, "owner": self.owner, "until": until} for id_, until in stale
                ]
                connection.execute(_GIVE_BACK, given_back)
            rows = connection.execute(_DUE, {"now": now_us}).mappings().all()
            for row in rows:
                if len(claimed) >= room:
                    break
                if row["id"] in sending:
                    continue
                # Re-check everything: another sender may have tried it since the SELECT.
                taken = connection.execute(
                    _TAKE,
                    {
                        "delivery": row["id"],
                        "now": now_us,
                        "until": now_us + LEASE_US,
                        "owner": self.owner,
                    },
                )
                if taken.rowcount == 1:
                    claimed.append(row)
        return claimed

    async def _attempt(self, row: RowMapping) -> Outcome:
        try:
            sender = self._sender(row["route"], row["sink"])
            if sender is None:
                return Outcome(row, f"sink {row['route']}/{row['sink']} is no longer configured")
            # Well within the lease: no other sender, this one included, takes it up meanwhile.
            async with asyncio.timeout(ATTEMPT_SECONDS):
                await sender.send(row["id"], json.loads(row["payload"]))
        except TimeoutError:
            return Outcome(row, f"no answer within {ATTEMPT_SECONDS:g} s")
        except DeliveryFailed as failure:
            return Outcome(row, str(failure))
        except Exception as failure:
            log.exception("delivery %d to %s/%s crashed", row["id"], row["route"], row["sink"])
            return Outcome(row, f"{type(failure).__name__}")
        return Outcome(row, None)

    async def page_directly(self, route_name: str, payload: dict[str, Any]) -> int:
        """Send `payload` through each sink of the route now, once, without the store (for
        when the store is what failed, so nothing can be queued); how many sinks took it."""
        route = self._policy.routes.get(route_name)
        taken = 0
        for sink in () if route is None else route.sinks:
            sender = self._sender(route_name, sink.key)
            if sender is None:
                continue
            try:
                async with asyncio.timeout(ATTEMPT_SECONDS):
                    await sender.send(0, {**payload, "route": route_name})
            except Exception as error:
                log.error("direct page via %s/%s failed: %s", route_name, sink.key, error)
            else:
                taken += 1
        return taken

    def _sender(self, route_name: str, key: str) -> Sender | None:
        if (route_name, key) not in self._senders:
            route = self._policy.routes.get(route_name)
            sink = None if route is None else next((s for s in route.sinks if s.key == key), None)
            if sink is None:
                return None
            self._senders[(route_name, key)] = sinks.build(sink, self._client)
        return self._senders[(route_name, key)]

    def _record(self, outcomes: list[Outcome], now_us: int) -> None:
        with self._engine.begin() as connection:
            events = []
            for outcome in outcomes:
                row = outcome.delivery
                attempt = row["attempts"] + 1
                payload: dict[str, Any] = json.loads(row["payload"])
                data = {
                    "delivery": row["id"],
                    "alert_id": row["alert_id"],
                    "purpose": row["purpose"],
                    "route": row["route"],
                    "target": row["sink"],
                    "attempt": attempt,
                    "error": outcome.error,
                }
                if outcome.error is None:
                    self.sent += 1
                    connection.execute(
                        _SENT,
                        {
                            "delivery": row["id"],
                            "owner": self.owner,
                            "at": now_us,
                            "attempt": attempt,
                        },
                    )
                    events.append(self._event("alert_sent", payload, now_us, data))
                elif attempt < self._retry.max_attempts:
                    connection.execute(
                        _RETRY,
                        {
                            "delivery": row["id"],
                            "owner": self.owner,
                            "attempt": attempt,
                            "error": outcome.error,
                            "next": now_us + self._retry.delay_us(attempt),
                        },
                    )
                    events.append(
                        self._event("alert_failed", payload, now_us, {**data, "final": False})
                    )
                else:
                    self.failed += 1
                    escalated_to = self._give_up(
                        connection, row, payload, attempt, outcome.error, now_us
                    )
                    final = {**data, "final": True, "escalated_to": escalated_to}
                    events.append(self._event("alert_failed", payload, now_us, final))
            ledger.append(connection, events)

    def _give_up(
        self,
        connection: Connection,
        row: RowMapping,
        payload: dict[str, Any],
        attempts: int,
        error: str,
        now_us: int,
    ) -> str | None:
        """Escalate a delivery out of attempts, or dead-letter it; returns the route it went to.

        An escalated copy is never escalated again, so routes escalating to each
        other cannot pass a page back and forth.
        """
        target = None
        if "escalated_from" not in payload and row["purpose"] not in ("ack", "resolve"):
            target = escalation_route(self._policy, row["route"])
        given_up = connection.execute(
            update(deliveries)
            # Only from pending: a delivery is escalated or noticed once, even when its lease
            # ran out mid-send and another sender gave it up as well.
            .where(deliveries.c.id == row["id"], deliveries.c.status == "pending")
            .values(
                status="dead" if target is None else "failed", attempts=attempts, last_error=error
            )
        )
        where = f"{row['route']}/{row['sink']}"
        if target is not None:
            log.error(
                "delivery %d to %s given up, escalated to %s: %s",
                row["id"],
                where,
                target.name,
                error,
            )
            if given_up.rowcount == 1:
                escalated_from = {"delivery": row["id"], "route": row["route"], "sink": row["sink"]}
                escalated = {**payload, "purpose": "escalation", "escalated_from": escalated_from}
                enqueue(connection, target, escalated, now_us)
            return target.name
        log.error("delivery %d to %s dead-lettered: %s", row["id"], where, error)
        # A dead notice (or its escalated copy) carries `undelivered`: no notice about a
        # notice, so a notice route that is down too ends the chain here.
        if given_up.rowcount == 1 and "undelivered" not in payload:
            notices.undelivered(
                connection,
                self._policy.routes[self._notice_route],
                node=self._node,
                delivery=row,
                payload=payload,
                attempts=attempts,
                error=error,
                now_us=now_us,
            )
        return None

    def _event(
        self, type_: str, payload: dict[str, Any], now_us: int, data: dict[str, Any]
    ) -> Event:
        return Event(
            type=type_,
            time_us=now_us,
            node=self._node,
            canary_id=payload.get("canary_id"),
            sandbox=payload.get("sandbox"),
            data=data,
        )
