"""Scheduled ledger integrity: anchor the head outside the database, and verify the chain.

A chain found broken pages the heartbeat route once per distinct break
(the first bad row and the problem), not on every check.
"""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine

from alerts import notices
from alerts.policy import DEFAULT_ROUTE, Policy
from store import anchors, checks, ledger
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
                route = self.policy.routes[self.anchor_route]
                notices.ledger_anchor(
                    connection, route, node=self.node, seq=seq, digest=digest, now_us=now_us
                )
        if self.anchor_file is not None:
            anchors.save(self.anchor_file, seq, digest, self.node, now_us)
        with self.engine.begin() as connection:
            checks.record(connection, "anchor", self.node, now_us, seq, digest)
        return seq, digest

    def check(self, now_us: int) -> Verdict:
        """Verify the chain (and the anchor file, if any); page a new break. The verdict
        names a saved head the chain lost as its problem."""
        with self.engine.connect() as connection:
            verdict = ledger.verify(connection)
            problem = verdict.problem
            if verdict.intact and self.anchor_file is not None and self.anchor_file.exists():
                problem = ledger.missed_anchor(connection, anchors.load(self.anchor_file))
        with self.engine.begin() as connection:
            checks.record(
                connection,
                "verify",
                self.node,
                now_us,
                verdict.count,
                verdict.head_hash,
                problem,
            )
        if problem is None:
            self.reported = None
            return verdict
        state = (verdict.bad_seq, problem)
        if state != self.reported:
            self.reported = state
            log.error("ledger integrity check failed: %s", problem)
            self._alarm(verdict, problem, now_us)
        return replace(verdict, problem=problem)

    def _alarm(self, verdict: Verdict, problem: str, now_us: int) -> None:
        with self.engine.begin() as connection:
            notices.ledger_broken(
                connection,
                self.policy.routes[self.alarm_route or DEFAULT_ROUTE],
                node=self.node,
                problem=problem,
                bad_seq=verdict.bad_seq,
                verified=verdict.count,
                now_us=now_us,
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
