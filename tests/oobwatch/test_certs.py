"""Keeping the certificate: when an ACME order is due, one node at a time, and what a failure or
a renewal asked for does, on a real store (no ACME server needed to decide)."""

import datetime
from pathlib import Path

from sqlalchemy import Engine, update

from listeners.certificates import Challenges, Served, self_signed
from oobwatch.certs import RETRY_AFTER_FAILURE, CertificateKeeper, renewal_due
from oobwatch.config import Config, load
from store import acme
from store.clock import now_us
from store.schema import acme_orders
from support import node_config

ZONE = "canary.example.test"
LEASE = 60_000_000


def acme_config(tmp_path: Path, store_url: str, node: str = "n1") -> Config:
    extra = "[tls]\nacme_directory = 'https://127.0.0.1:9/dir'\n"
    path = node_config(tmp_path, "json://127.0.0.1:1/", extra=extra, store_url=store_url)
    path.write_text(path.read_text().replace('name = "n1"', f'name = "{node}"'))
    return load(path)


def keeper(config: Config, engine: Engine) -> tuple[CertificateKeeper, Challenges]:
    challenges = Challenges()
    current = Served(self_signed(ZONE), "self-signed")
    return CertificateKeeper(config, engine, current, challenges), challenges


def test_a_failure_after_a_renewal_was_asked_waits_before_the_next_order(engine: Engine) -> None:
    now = now_us()
    acme.ask_renewal(engine, now)
    assert renewal_due(acme.state(engine), ZONE, now) == "a renewal was asked for"
    assert acme.claim(engine, "n1", now, LEASE, None)
    acme.failed(engine, "n1", "validation failed", now)
    state = acme.state(engine)
    # The ask was taken with the claim: a failure is not retried at once, every tick.
    assert state.renew_asked_us is None
    assert renewal_due(state, ZONE, now + 1_000_000) is None
    later = now + RETRY_AFTER_FAILURE // datetime.timedelta(microseconds=1) + 1
    assert renewal_due(state, ZONE, later) == "there is no certificate yet"
    # Asked again after the failure: due at once.
    acme.ask_renewal(engine, now + 2)
    assert renewal_due(acme.state(engine), ZONE, now + 3) == "a renewal was asked for"


def test_a_node_that_found_no_certificate_does_not_order_one_another_node_just_got(
    engine: Engine,
) -> None:
    now = now_us()
    seen = acme.state(engine).pem
    assert seen is None
    # Meanwhile another node's order ends: certificate stored, order released.
    assert acme.claim(engine, "n2", now, LEASE, None)
    acme.succeeded(engine, "n2", self_signed(ZONE), now)
    assert acme.state(engine).holder is None
    assert not acme.claim(engine, "n1", now, LEASE, seen)


def test_one_node_orders_and_its_published_answers_reach_the_other_node(
    tmp_path: Path, store_url: str, engine: Engine
) -> None:
    one = acme_config(tmp_path, store_url, "n1")
    other = acme_config(tmp_path, store_url, "n2")
    first, first_answers = keeper(one, engine)
    second, second_answers = keeper(other, engine)
    tick = first.tick()
    assert tick.order == "there is no certificate yet"
    # The other node sees the lease and does not order too.
    assert second.tick().order is None
    acme.publish(engine, "n1", ["answer-a", "answer-b"])
    # While its order runs, the holder's ticks keep its lease and leave its answers alone...
    held = acme.state(engine).held_until_us
    assert held is not None
    assert first.tick(ordering=True).order is None
    state = acme.state(engine)
    assert state.challenges == ("answer-a", "answer-b")
    assert state.held_until_us is not None
    assert state.held_until_us >= held
    # ...and the other node serves them from the store.
    second.tick()
    assert second_answers.values == ("answer-a", "answer-b")
    assert first_answers.values == ()
    # Once the lease lapses (the holder died), they are no longer served, and another takes it.
    with engine.begin() as connection:
        connection.execute(update(acme_orders).values(held_until_us=now_us() - 1))
    assert second.tick().order == "there is no certificate yet"
    assert second_answers.values == ()
    assert acme.state(engine).holder == "n2"


def test_a_stored_certificate_is_served_and_one_for_other_names_is_not(
    tmp_path: Path, store_url: str, engine: Engine
) -> None:
    config = acme_config(tmp_path, store_url)
    ours, challenges = keeper(config, engine)
    acme.claim(engine, "seed", 0, 1, None)
    other = self_signed("elsewhere.example")
    with engine.begin() as connection:
        connection.execute(update(acme_orders).values(pem=other, holder=None))
    tick = ours.tick()
    assert tick.serve is None
    assert tick.order is not None
    assert "does not name" in tick.order
    assert challenges.values == ()
    good = self_signed(ZONE)
    with engine.begin() as connection:
        connection.execute(update(acme_orders).values(pem=good, holder=None, held_until_us=None))
    fresh = keeper(config, engine)[0].tick()
    assert fresh.serve == Served(good, "acme")
