"""Turning committed hits into alerts: open, fold, digest, escalate, acknowledge, resolve.

The dispatcher reads hits from the ledger after a cursor kept in the store,
and moves the cursor in the same transaction that opens or folds alerts and
writes their deliveries to the outbox. A crash therefore neither loses a hit
nor pages it twice, and several nodes sharing a database take turns on the
cursor instead of each paging the same hit.

Dedupe: the first hit of a canary opens an alert and pages at once; hits in
the `dedupe_window` that follows the opening fold into it (count, last seen,
sources, protocols) and are summarised by digests every `digest_every`; the
first hit after the window opens a new alert. Every hit stays in the ledger.
"""

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, bindparam, func, insert, select, update

from alerts.deliveries import Lease, delivery_payload, enqueue, enqueue_leased
from alerts.policy import Facts, IgnoreRule, Policy, Route
from alerts.render import Line, Message, for_hit, plural, truncate
from canaries.model import HEARTBEAT_SANDBOX
from store import bursts, ledger
from store.clock import to_iso
from store.ledger import Entry, Event
from store.prepared import Prepared
from store.schema import alerts, deliveries, dispatch_cursor
from store.schema import ledger as ledger_table

MAX_SOURCES = 50
# Hits per dispatch transaction: it holds the write lock the listeners' commits need,
# so a backlog is worked off in short transactions with a pause between them.
BATCH = 100
BATCH_PAUSE_SECONDS = 0.002
# Canaries whose open alert this node's dispatches remember (a hint: see `may_open`).
OPEN_WINDOWS_KEPT = 10_000

# Alert rows as shown: with how many of their deliveries were dead-lettered.
_SHOWN = select(
    alerts,
    select(func.count())
    .select_from(deliveries)
    .where(deliveries.c.alert_id == alerts.c.id, deliveries.c.status == "dead")
    .scalar_subquery()
    .label("undelivered"),
)


@dataclass(frozen=True, slots=True)
class Timing:
    """Dedupe and digest periods, in microseconds."""

    dedupe_window_us: int
    digest_every_us: int


class AlertState:
    """Alert state in the store, driven by hits and by the clock."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        timing: Timing,
        node: str,
        console_url: str | None = None,
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._timing = timing
        self._node = node
        self._console_url = console_url
        self.last_dispatched = 0
        # The deliveries the last dispatch wrote leased to its `lease` owner, committed.
        self.leased: list[RowMapping] = []
        # Canary id -> when the dedupe window of the alert it had open at its last
        # dispatched hit ends; an alert resolved in this process clears it.
        self._open_windows: dict[str, int] = {}

    def may_open(self, hit: Entry) -> bool:
        """Whether dispatching `hit` may open an alert, and so page: False only when it
        folds into an alert this node's dispatches saw open, within its window.

        A hint for when to dispatch, never for what: the dispatch itself reads the
        alerts. An alert resolved by another process meanwhile (or whose dispatch
        failed to commit) is taken for open here, and the new alert its canary's
        next hit opens is dispatched late: with the folds, after the pager's fold delay
        and the fold chunks in front of it, or at the pager's next tick (1 s).
        """
        if hit.canary_id is None or hit.sandbox == HEARTBEAT_SANDBOX:
            return False
        window_ends = self._open_windows.get(hit.canary_id)
        return window_ends is None or window_ends <= hit.time_us

    def dispatch(
        self,
        now_us: int,
        batches: int | None = None,
        lease: Lease | None = None,
        batch: int = BATCH,
    ) -> int:
        """Process hits committed since the cursor, all of them or `batches` of `batch` at
        most; returns how many deliveries were queued (`last_dispatched` says how many hits).

        With `lease`, first pages (up to its room, and the sinks of one more alert) are
        written leased to its owner and, once committed, listed in `leased` for that
        sender to send at once; the others are queued for any sender to claim.
        """
        queued = 0
        self.last_dispatched = 0
        self.leased = []
        taken = 0
        while batches is None or taken < batches:
            if self.last_dispatched:
                # The lock is not fair: without a pause this thread would take it straight back.
                time.sleep(BATCH_PAUSE_SECONDS)
            with self._engine.begin() as connection:
                # Read the hits before taking the lock the listeners' commits also need,
                # then make sure no other dispatcher moved the cursor meanwhile.
                [(cursor,)] = _READ_CURSOR.execute(connection)
                rows = _HITS_AFTER.execute(connection, {"after": cursor, "batch": batch})
                if not rows:
                    return queued
                hits = [Entry(*row) for row in rows]
                if _lock(connection) != cursor:
                    # Another dispatcher took these hits: not a batch of ours, read on.
                    continue
                taken += 1
                self.last_dispatched += len(rows)
                events: list[Event] = []
                leased: list[RowMapping] = []
                # Hits of one canary in a batch fold in memory: one UPDATE per alert, not per hit.
                folds: dict[str, _Fold] = _Fold.open_for(connection, hits)
                finished: list[_Fold] = []
                for entry in hits:
                    if entry.sandbox == HEARTBEAT_SANDBOX or entry.canary_id is None:
                        continue
                    if self._policy.ignore:
                        rule = self._suppressing(entry, now_us)
                        if rule is not None:
                            data = {"hit_seq": entry.seq, **rule.describe()}
                            events.append(self._event("suppressed", entry, data))
                            continue
                    fold = folds.get(entry.canary_id)
                    if fold is not None and fold.window_ends_us > entry.time_us:
                        fold.add(entry)
                        continue
                    if fold is not None:
                        finished.append(fold)
                    lease_to = (
                        lease.owner
                        if lease is not None and len(self.leased) + len(leased) < lease.room
                        else None
                    )
                    alert_id, queued_now = self._open(
                        connection, entry, now_us, events, lease_to, leased
                    )
                    queued += queued_now
                    window_ends = entry.time_us + self._timing.dedupe_window_us
                    folds[entry.canary_id] = _Fold.opened(alert_id, window_ends, entry)
                _Fold.write_all(connection, [*finished, *folds.values()])
                ledger.append(connection, events)
                _MOVE_CURSOR.execute(connection, {"to": hits[-1].seq})
                # Under the lock, so that a resolve (which takes it) forgets after this.
                self._remember_windows(folds)
            self.leased += leased
        return queued

    def _remember_windows(self, folds: dict[str, "_Fold"]) -> None:
        windows = self._open_windows
        for canary_id, fold in folds.items():
            windows.pop(canary_id, None)
            windows[canary_id] = fold.window_ends_us
        while len(windows) > OPEN_WINDOWS_KEPT:
            del windows[next(iter(windows))]

    def _suppressing(self, entry: Entry, now_us: int) -> IgnoreRule | None:
        """The ignore rule that silences a hit; an aggregate only when one silences each
        (source, protocol, user agent) it counts, never when it counted more than it lists."""
        facts = Facts.of(entry)
        listed = bursts.facts_of(entry.evidence)
        if listed is None:
            return self._policy.suppressed_by(facts, now_us)
        rules = [
            self._policy.suppressed_by(
                replace(facts, source_ip=source, protocol=protocol, user_agent=agent or None),
                now_us,
            )
            for source, protocol, agent in listed
        ]
        return rules[0] if rules and all(rules) else None

    def _open(
        self,
        connection: Connection,
        entry: Entry,
        now_us: int,
        events: list[Event],
        lease_to: str | None,
        leased: list[RowMapping],
    ) -> tuple[str, int]:
        """Open an alert for `entry` and queue its first page to every matching route (leased
        to `lease_to`, and added to `leased`, if given)."""
        routes = self._policy.routes_for(Facts.of(entry))
        alert_id = "al-" + secrets.token_hex(6)
        connection.execute(
            _OPEN_ALERT,
            {
                "id": alert_id,
                "canary_id": entry.canary_id,
                "sandbox": entry.sandbox,
                "routes": json.dumps([route.name for route in routes]),
                "status": "open",
                "opened_us": entry.time_us,
                "window_ends_us": entry.time_us + self._timing.dedupe_window_us,
                "last_hit_us": entry.time_us,
                "first_hit_seq": entry.seq,
                "hit_count": entry.hits,
                "digested_count": entry.hits,
                "next_digest_us": entry.time_us + self._timing.digest_every_us,
                "sources": json.dumps(_Fold.sources_of(entry)[:MAX_SOURCES]),
                "protocols": json.dumps(_Fold.protocols_of(entry)),
            },
        )
        events.append(
            self._event(
                "alert_opened",
                entry,
                {"alert_id": alert_id, "hit_seq": entry.seq, "routes": [r.name for r in routes]},
            )
        )
        payload = self._payload(
            "page",
            alert_id,
            entry.canary_id,
            entry.sandbox,
            for_hit(entry, alert_id, self._console_url),
            entry.evidence.get("severity"),
        )
        if lease_to is None:
            return alert_id, sum(enqueue(connection, route, payload, now_us) for route in routes)
        written = [
            row
            for route in routes
            for row in enqueue_leased(connection, route, payload, now_us, lease_to)
        ]
        leased += written
        return alert_id, len(written)

    def digests(self, now_us: int) -> int:
        """Queue a digest for every alert with hits folded in since its last page or digest."""
        queued = 0
        due_now = (
            alerts.c.status != "resolved",
            alerts.c.hit_count > alerts.c.digested_count,
            alerts.c.next_digest_us <= now_us,
        )
        # Look before locking: this runs every second, and the lock is the listeners' too.
        if not self._any(*due_now):
            return 0
        with self._engine.begin() as connection:
            _lock(connection)
            due = connection.execute(select(alerts).where(*due_now)).mappings().all()
            events = []
            for alert in due:
                new = alert["hit_count"] - alert["digested_count"]
                burst = _latest_burst(connection, alert["canary_id"], alert["opened_us"])
                message = Message(
                    f"oobwatch: {plural(new, 'more hit')}, sandbox {alert['sandbox']}",
                    f"{plural(new, 'more hit')} of canary {alert['canary_id']} (sandbox {alert['sandbox']}) "
                    f"since the last page; {alert['hit_count']} in all",
                    [
                        Line("alert", alert["id"]),
                        Line("new hits", str(new)),
                        Line("total hits", str(alert["hit_count"])),
                        Line("first", to_iso(alert["opened_us"])),
                        Line("last", to_iso(alert["last_hit_us"])),
                        Line("sources", truncate(json.loads(alert["sources"]), 500)),
                        Line("protocols", ", ".join(json.loads(alert["protocols"]))),
                        *([Line("burst", burst)] if burst else []),
                    ],
                )
                payload = self._payload(
                    "digest", alert["id"], alert["canary_id"], alert["sandbox"], message, None
                )
                payload["new_hits"] = new
                payload["total_hits"] = alert["hit_count"]
                for route in self._routes(alert):
                    queued += enqueue(connection, route, payload, now_us)
                connection.execute(
                    update(alerts)
                    .where(alerts.c.id == alert["id"])
                    .values(
                        digested_count=alert["hit_count"],
                        next_digest_us=now_us + self._timing.digest_every_us,
                    )
                )
                events.append(
                    _alert_event(
                        "alert_digest",
                        alert,
                        self._node,
                        now_us,
                        {"new_hits": new, "total_hits": alert["hit_count"]},
                    )
                )
            ledger.append(connection, events)
        return queued

    def escalations(self, now_us: int) -> int:
        """Page `escalate_to` for open alerts nobody acknowledged within `escalate_after`."""
        queued = 0
        waits = [r.escalate_after_us for r in self._policy.routes.values() if r.escalate_to]
        shortest = min((wait for wait in waits if wait is not None), default=None)
        if shortest is None or not self._any(
            alerts.c.status == "open",
            alerts.c.escalated_us.is_(None),
            alerts.c.opened_us <= now_us - shortest,
        ):
            return 0
        with self._engine.begin() as connection:
            _lock(connection)
            candidates = (
                connection.execute(
                    select(alerts).where(alerts.c.status == "open", alerts.c.escalated_us.is_(None))
                )
                .mappings()
                .all()
            )
            events = []
            for alert in candidates:
                targets = [
                    route.escalate_to
                    for route in self._routes(alert)
                    if route.escalate_to
                    and route.escalate_after_us is not None
                    and alert["opened_us"] + route.escalate_after_us <= now_us
                ]
                if not targets:
                    continue
                waited = (now_us - alert["opened_us"]) // 60_000_000
                message = Message(
                    f"oobwatch ESCALATED: unacknowledged alert, sandbox {alert['sandbox']}",
                    f"Alert {alert['id']} on canary {alert['canary_id']} (sandbox {alert['sandbox']}) "
                    f"has not been acknowledged for {waited} min; {plural(alert['hit_count'], 'hit')} so far",
                    [Line("alert", alert["id"]), Line("opened", to_iso(alert["opened_us"]))],
                )
                payload = self._payload(
                    "escalation",
                    alert["id"],
                    alert["canary_id"],
                    alert["sandbox"],
                    message,
                    "critical",
                )
                for name in dict.fromkeys(targets):
                    queued += enqueue(connection, self._policy.routes[name], payload, now_us)
                connection.execute(
                    update(alerts).where(alerts.c.id == alert["id"]).values(escalated_us=now_us)
                )
                events.append(
                    _alert_event(
                        "alert_escalated",
                        alert,
                        self._node,
                        now_us,
                        {"to": list(dict.fromkeys(targets))},
                    )
                )
            ledger.append(connection, events)
        return queued

    def _any(self, *conditions: Any) -> bool:
        with self._engine.connect() as connection:
            return (
                connection.execute(select(alerts.c.id).where(*conditions).limit(1)).first()
                is not None
            )

    def acknowledge(self, alert_id: str, by: str, now_us: int) -> tuple[RowMapping, bool]:
        """Acknowledge an open alert; (its row, whether nothing changed because it was not open)."""
        return self._settle(alert_id, "ack", by, now_us)

    def resolve(self, alert_id: str, by: str, now_us: int) -> tuple[RowMapping, bool]:
        """Resolve an alert; (its row, whether nothing changed because it was resolved already)."""
        return self._settle(alert_id, "resolve", by, now_us)

    def _settle(self, alert_id: str, purpose: str, by: str, now_us: int) -> tuple[RowMapping, bool]:
        """Acknowledge or resolve once: a repeat changes, records and sends nothing.

        The change reaches every sink of the alert's routes (and of the route it
        escalated to): PagerDuty acknowledges or resolves its incident, webhooks
        get the event, chat sinks a short follow-up.
        """
        with self._engine.begin() as connection:
            _lock(connection)
            alert = _alert(connection, alert_id)
            if alert is None:
                raise LookupError(f"no alert {alert_id}")
            settled = ("acknowledged", "resolved") if purpose == "ack" else ("resolved",)
            if alert["status"] in settled:
                return alert, True
            if purpose == "ack":
                values: dict[str, Any] = {
                    "status": "acknowledged",
                    "acked_by": by,
                    "acked_us": now_us,
                }
                done = "acknowledged"
            else:
                values = {"status": "resolved", "resolved_us": now_us}
                done = "resolved"
                self._open_windows.pop(alert["canary_id"], None)
            connection.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))
            message = Message(
                f"oobwatch: alert {alert_id} {done}",
                f"Alert {alert_id} on canary {alert['canary_id']} (sandbox {alert['sandbox']}) "
                f"was {done}",
                [Line("alert", alert_id), Line("by", by, untrusted=True)],
            )
            payload = self._payload(
                purpose, alert_id, alert["canary_id"], alert["sandbox"], message, None
            )
            payload["by"] = by
            for route in self._routes(alert, escalated=alert["escalated_us"] is not None):
                enqueue(connection, route, payload, now_us)
            event_type = "alert_acked" if purpose == "ack" else "alert_resolved"
            ledger.append(
                connection, [_alert_event(event_type, alert, self._node, now_us, {"by": by})]
            )
            changed = _alert(connection, alert_id)
            assert changed is not None
            return changed, False

    def _routes(self, alert: RowMapping, escalated: bool = False) -> list[Route]:
        names = list(json.loads(alert["routes"]))
        if escalated:
            names += [self._policy.routes[n].escalate_to for n in names if n in self._policy.routes]
        return [
            self._policy.routes[name]
            for name in dict.fromkeys(names)
            if name in self._policy.routes
        ]

    def _payload(
        self,
        purpose: str,
        alert_id: str,
        canary_id: str | None,
        sandbox: str | None,
        message: Message | None,
        severity: Any,
    ) -> dict[str, Any]:
        return delivery_payload(
            purpose,
            node=self._node,
            dedup_key=alert_id,
            message=message,
            severity=severity,
            alert_id=alert_id,
            canary_id=canary_id,
            sandbox=sandbox,
        )

    def _event(self, type_: str, entry: Entry, data: dict[str, Any]) -> Event:
        return Event(
            type=type_,
            time_us=entry.time_us,
            node=self._node,
            canary_id=entry.canary_id,
            sandbox=entry.sandbox,
            protocol=entry.protocol,
            source=entry.source,
            data=data,
        )


# Built once: dispatch runs them for every batch of hits. Those that run for every
# batch, with hits of planted canaries every few milliseconds, are run by the driver.
_OPEN_ALERT = insert(alerts)
_READ_CURSOR = Prepared(select(dispatch_cursor.c.seq))
_TAKE_CURSOR = Prepared(
    update(dispatch_cursor)
    .where(dispatch_cursor.c.id == 1)
    .values(seq=dispatch_cursor.c.seq)
    .returning(dispatch_cursor.c.seq)
)
_MOVE_CURSOR = Prepared(
    update(dispatch_cursor).where(dispatch_cursor.c.id == 1).values(seq=bindparam("to"))
)
_HITS_AFTER = Prepared(
    select(*[ledger_table.c[name] for name in Entry.__slots__])
    .where(ledger_table.c.seq > bindparam("after"), ledger_table.c.type == "hit")
    .order_by(ledger_table.c.seq)
    .limit(bindparam("batch"))
)
# The unresolved alerts of the canaries hit in a range of the ledger.
_UNRESOLVED_OF = Prepared(
    select(
        alerts.c.id,
        alerts.c.canary_id,
        alerts.c.window_ends_us,
        alerts.c.last_hit_us,
        alerts.c.sources,
        alerts.c.protocols,
    )
    .where(
        alerts.c.canary_id.in_(
            select(ledger_table.c.canary_id).where(
                ledger_table.c.seq >= bindparam("first"),
                ledger_table.c.seq <= bindparam("last"),
                ledger_table.c.type == "hit",
            )
        ),
        alerts.c.status != "resolved",
    )
    .order_by(alerts.c.opened_us)
)
_FOLD_INTO = Prepared(
    update(alerts)
    .where(alerts.c.id == bindparam("b_id"))
    .values(
        hit_count=alerts.c.hit_count + bindparam("b_added"),
        last_hit_us=bindparam("b_last"),
        sources=bindparam("b_sources"),
        protocols=bindparam("b_protocols"),
    )
)


def _lock(connection: Connection) -> int:
    """Take the dispatch lock: alert state changes one transaction at a time, across nodes;
    returns the dispatch cursor as it is under the lock.

    A no-op write, the transaction's first, so SQLite takes its write lock and
    PostgreSQL a row lock before anything that decides what to write is read.
    """
    [(cursor,)] = _TAKE_CURSOR.execute(connection)
    return int(cursor)


def _alert_event(
    type_: str, alert: RowMapping, node: str, now_us: int, data: dict[str, Any]
) -> Event:
    return Event(
        type=type_,
        time_us=now_us,
        node=node,
        canary_id=alert["canary_id"],
        sandbox=alert["sandbox"],
        data={"alert_id": alert["id"], **data},
    )


class _Fold:
    """Hits folded into one open alert during a dispatch batch, written once at its end."""

    def __init__(
        self,
        alert_id: str,
        window_ends_us: int,
        last_hit_us: int,
        sources: list[Any],
        protocols: list[Any],
    ) -> None:
        self.alert_id = alert_id
        self.window_ends_us = window_ends_us
        self.last_hit_us = last_hit_us
        self.sources = sources
        self.protocols = protocols
        self.added = 0

    @classmethod
    def opened(cls, alert_id: str, window_ends_us: int, entry: Entry) -> "_Fold":
        """The alert `entry` just opened, as the first row wrote it."""
        return cls(
            alert_id,
            window_ends_us,
            entry.time_us,
            cls.sources_of(entry)[:MAX_SOURCES],
            cls.protocols_of(entry),
        )

    @staticmethod
    def sources_of(entry: Entry) -> list[str | None]:
        """The source hosts of a hit: its own, or those an aggregate lists."""
        listed = bursts.sources_of(entry.evidence) if entry.aggregate else []
        return list(dict.fromkeys([entry.source_ip, *listed]))

    @staticmethod
    def protocols_of(entry: Entry) -> list[str | None]:
        listed: list[str | None] = [*bursts.protocols_of(entry.evidence)] if entry.aggregate else []
        return listed or [entry.protocol]

    @classmethod
    def open_for(cls, connection: Connection, hits: Sequence[Entry]) -> dict[str, "_Fold"]:
        """The latest unresolved alert of each canary in `hits` (a run of the ledger's hits,
        in order) still open at its first hit."""
        first: dict[str, int] = {}
        for entry in hits:
            if entry.canary_id is not None:
                first.setdefault(entry.canary_id, entry.time_us)
        if not first:
            return {}
        span = {"first": hits[0].seq, "last": hits[-1].seq}
        found = {}
        for (
            alert_id,
            canary_id,
            window_ends_us,
            last_hit_us,
            sources,
            protocols,
        ) in _UNRESOLVED_OF.execute(connection, span):
            if canary_id in first and window_ends_us > first[canary_id]:
                found[canary_id] = cls(
                    alert_id,
                    window_ends_us,
                    last_hit_us,
                    json.loads(sources),
                    json.loads(protocols),
                )
        return found

    def add(self, entry: Entry) -> None:
        self.added += entry.hits
        self.last_hit_us = max(self.last_hit_us, entry.time_us)
        for values, found in (
            (self.sources, self.sources_of(entry)),
            (self.protocols, self.protocols_of(entry)),
        ):
            for value in found:
                if value is not None and value not in values and len(values) < MAX_SOURCES:
                    values.append(value)

    @staticmethod
    def write_all(connection: Connection, folds: Sequence["_Fold"]) -> None:
        """One executemany for every alert that gained hits."""
        changed = [
            {
                "b_id": fold.alert_id,
                "b_added": fold.added,
                "b_last": fold.last_hit_us,
                "b_sources": json.dumps(fold.sources),
                "b_protocols": json.dumps(fold.protocols),
            }
            for fold in folds
            if fold.added
        ]
        if changed:
            _FOLD_INTO.execute_many(connection, changed)


def _latest_burst(connection: Connection, canary_id: str, since_us: int) -> str | None:
    """The running totals of the canary's latest burst since `since_us`, in one line."""
    data = connection.execute(
        select(ledger_table.c.data)
        .where(
            ledger_table.c.canary_id == canary_id,
            ledger_table.c.type == "hit",
            ledger_table.c.time_us >= since_us,
            ledger_table.c.data.contains(bursts.MARKER, autoescape=True),
        )
        .order_by(ledger_table.c.seq.desc())
        .limit(1)
    ).scalar()
    return None if data is None else bursts.summary(canary_id, json.loads(data))


def _alert(connection: Connection, alert_id: str) -> RowMapping | None:
    return connection.execute(_SHOWN.where(alerts.c.id == alert_id)).mappings().first()


def list_alerts(engine: Engine, open_only: bool = False) -> Sequence[RowMapping]:
    query = _SHOWN.order_by(alerts.c.opened_us)
    if open_only:
        query = query.where(alerts.c.status != "resolved")
    with engine.connect() as connection:
        return connection.execute(query).mappings().all()
