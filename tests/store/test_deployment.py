"""Deployment secrets: made once per store, the same for every node on it, even when they race."""

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from canaries.index import TokenIndex
from canaries.mint import token_key
from canaries.tokens import is_plausible
from store import deployment
from store.engine import open_engine
from support import plant_canary


def test_a_secret_is_made_once_and_read_back(engine: Engine) -> None:
    first = deployment.secret(engine, "one")
    assert len(first) == 32
    assert deployment.secret(engine, "one") == first
    assert deployment.secret(engine, "two", size=16) != first


def test_nodes_racing_to_make_a_secret_share_one(engine: Engine, store_url: str) -> None:
    nodes = [engine, *(open_engine(store_url) for _ in range(3))]
    try:
        for attempt in range(10):
            name = f"raced-{attempt}"
            start = threading.Barrier(len(nodes))

            def make(node: Engine, name: str = name, start: threading.Barrier = start) -> bytes:
                start.wait()
                return deployment.secret(node, name)

            with ThreadPoolExecutor(len(nodes)) as pool:
                made = list(pool.map(make, nodes))
            assert len(set(made)) == 1
    finally:
        for node in nodes[1:]:
            node.dispose()


async def test_a_token_minted_on_one_node_is_plausible_on_another(
    engine: Engine, store_url: str
) -> None:
    other = open_engine(store_url)
    try:
        listening = TokenIndex(other)
        canary = plant_canary(engine)  # not loaded: the other node must recognise it by its check
        assert is_plausible(canary.token, listening.key)
        assert token_key(engine) == listening.key
        assert await listening.lookup(canary.token) == canary
    finally:
        other.dispose()
