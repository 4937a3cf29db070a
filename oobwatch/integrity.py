"""Scheduled ledger integrity: anchor the head outside the database, and verify the chain.

A chain found broken pages the heartbeat route once per distinct break
(the first bad row and the problem), not on every check.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from alerts.incidents import delivery_payload, queue
from alerts.policy import DEFAULT_ROUTE, Policy
from alerts.render import Line, Message
from store import anchors, ledger
from store.clock import to_iso
from store.ledger import Event, Verdict

log = logging.getLogger(__name__)


@dataclass
class Integrity:
    """The node's anchoring and verifying jobs."""

    engine: Engine
    policy: Policy
    node: str
    anchor_file: Path | None
    anchor_route: str | None
    alarm_route: str | None
    reported: tuple[int | None, str | None] | None = None

    def anchor(self, now_us: int) -> tuple[int, str]:
        """Save the current head to the anchor file and send it to the anchor route."""
        with self.engine.begin() as connection:
            seq, digest = ledger.head(connection)
            if self.anchor_route is not None:
                message = Message(
                    f"oobwatch ledger head on {self.node}",
                    f"Ledger head of node {self.node}: row {seq}, hash {digest}",
                    [Line("seq", str(seq)), Line("hash", digest), Line("time", to_iso(now_us))],
                )
                payload = delivery_payload(
                    "anchor",
                    node=self.node,
                    dedup_key=f"anchor-{self.node}",
                    message=message,
                    severity="low",
                    head={"seq": seq, "hash": digest},
                )
                queue(connection, self.policy.routes[self.anchor_route], payload, now_us)
        if self.anchor_file is not None:
            anchors.save(self.anchor_file, seq, digest, self.node, now_us)
        return seq, digest

    def check(self, now_us: int) -> Verdict:
        """Verify the chain (and the anchor file, if any); page a new break."""
        with self.engine.connect() as connection:
            verdict = ledger.verify(connection)
            problem = verdict.problem
            if verdict.intact and self.anchor_file is not None and self.anchor_file.exists():
                problem = ledger.missed_anchor(connection, anchors.load(self.anchor_file))
        if problem is None:
            self.reported = None
            return verdict
        state = (verdict.bad_seq, problem)
        if state != self.reported:
            self.reported = state
            log.error("ledger integrity check failed: %s", problem)
            self._alarm(verdict, problem, now_us)
        return verdict

    def _alarm(self, verdict: Verdict, problem: str, now_us: int) -> None:
        message = Message(
            f"oobwatch LEDGER BROKEN on {self.node}",
            f"The ledger failed verification on node {self.node}: {problem}",
            [
                Line("first bad row", str(verdict.bad_seq)),
                Line("verified before it", str(verdict.count)),
            ],
        )
        payload = delivery_payload(
            "integrity",
            node=self.node,
            dedup_key=f"ledger-{self.node}",
            message=message,
            severity="critical",
        )
        with self.engine.begin() as connection:
            queue(
                connection, self.policy.routes[self.alarm_route or DEFAULT_ROUTE], payload, now_us
            )
            ledger.append(
                connection,
                [
                    Event(
                        type="ledger_broken",
                        time_us=now_us,
                        node=self.node,
                        data={"bad_seq": verdict.bad_seq, "problem": problem},
                    )
                ],
            )
