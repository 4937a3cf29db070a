"""The alerting parts of a node, built from its configuration: alert state, outbox, pager,
the ledger integrity job. The CLI builds only the part an operation uses."""

from sqlalchemy import Engine

from alerts.outbox import Outbox, Retry
from alerts.pager import Pager, in_a_thread
from alerts.policy import Policy
from alerts.state import AlertState, Timing
from oobwatch.config import Config
from oobwatch.integrity import Integrity
from store.clock import now_us
from store.writer import LedgerWriter


def alert_state(config: Config, engine: Engine, policy: Policy | None = None) -> AlertState:
    alerts = config.alerts
    timing = Timing(alerts.dedupe_window, alerts.digest_every)
    console = config.api.base_url if config.api.public_url is not None else None
    return AlertState(engine, policy or config.policy(), timing, config.node.name, console)


def outbox(config: Config, engine: Engine, policy: Policy) -> Outbox:
    alerts = config.alerts
    retry = Retry(alerts.retry_base, alerts.retry_max, alerts.max_attempts)
    return Outbox(engine, policy, retry, config.node.name, now_us, config.heartbeat.route)


def pager(config: Config, engine: Engine, policy: Policy, writer: LedgerWriter) -> Pager:
    # SQLite has one write lock for everything: alert work takes turns with appends on the
    # writer's thread. PostgreSQL locks rows, and the dispatch lock is not the ledger's:
    # there alert work must not hold up appends while it waits for another node's turn.
    sqlite = engine.dialect.name == "sqlite"
    return Pager(
        alert_state(config, engine, policy),
        outbox(config, engine, policy),
        now_us,
        writer.call if sqlite else in_a_thread,
    )


def integrity(config: Config, engine: Engine, policy: Policy | None = None) -> Integrity:
    return Integrity(
        engine,
        policy or config.policy(),
        config.node.name,
        config.ledger.anchor_file,
        config.ledger.anchor_route,
        config.heartbeat.route,
    )
