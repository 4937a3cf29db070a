"""The token index: memory first, the store only for plausible unknowns, even under a forged flood."""

import asyncio
import secrets

import pytest
from sqlalchemy import Engine

from canaries import index as index_module
from canaries.index import NegativeCache, TokenIndex, Unknowable
from canaries.tokens import TokenKey, is_plausible, new_token
from store import registry
from support import forged_tokens, plant_canary, plant_legacy_canary


async def test_a_just_minted_canary_is_found_in_the_store(sqlite_engine: Engine) -> None:
    index = TokenIndex(sqlite_engine)
    index.refresh()
    canary = plant_canary(sqlite_engine)  # after the refresh: only the store knows it
    assert index.get(canary.token) is None
    assert await index.lookup(canary.token) == canary
    assert index.get(canary.token) == canary
    assert index.store_lookups == 1


async def test_forged_and_foreign_tokens_never_reach_the_store(sqlite_engine: Engine) -> None:
    index = TokenIndex(sqlite_engine)
    index.refresh()
    canary = plant_canary(sqlite_engine)
    other_key = TokenKey(secrets.token_bytes(32))
    foreign = [new_token(other_key) for _ in range(100)]
    # Chance collisions with this key are plausible: leave them out, as forged_tokens does.
    foreign = [token for token in foreign if not is_plausible(token, index.key)]
    junk = [*forged_tokens(index.key, 5000), *foreign, "www", "a" * 25]
    found = await asyncio.gather(*(index.lookup(token) for token in junk))
    assert found == [None] * len(junk)
    assert index.store_lookups == 0
    assert index.overflow == 0
    # The real one is still found behind them, with the one store query it needs.
    assert await index.lookup(canary.token) == canary
    assert index.store_lookups == 1


async def test_canaries_minted_before_checks_were_keyed_still_hit(sqlite_engine: Engine) -> None:
    legacy = plant_legacy_canary(sqlite_engine)
    index = TokenIndex(sqlite_engine)
    assert not is_plausible(legacy.token, index.key)
    # Not plausible, so not asked about before the index has loaded it...
    assert await index.lookup(legacy.token) is None
    index.refresh()
    # ...and found by lookup, whatever its check, once it has.
    assert index.get(legacy.token) == legacy
    assert await index.lookup(legacy.token) == legacy
    assert index.store_lookups == 0


async def test_the_stores_no_is_remembered_until_it_expires(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = TokenIndex(sqlite_engine)
    unknown = new_token(index.key)
    for _ in range(5):
        assert await index.lookup(unknown) is None
    assert index.store_lookups == 1
    assert index.negative_hits == 4
    monkeypatch.setattr(index_module, "NEGATIVE_TTL_SECONDS", 0.0)
    expiring = TokenIndex(sqlite_engine)
    for _ in range(3):
        assert await expiring.lookup(unknown) is None
    assert expiring.store_lookups == 3
    assert expiring.negative_hits == 0


async def test_a_canary_loaded_later_is_no_longer_absent(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = TokenIndex(sqlite_engine)
    token = new_token(index.key)
    assert await index.lookup(token) is None  # asked before its canary was committed
    monkeypatch.setattr("canaries.mint.new_token", lambda _key: token)
    canary = plant_canary(sqlite_engine)
    index.refresh()
    assert await index.lookup(token) == canary
    assert index.negative_hits == 0


async def test_a_failed_store_lookup_is_not_remembered(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = TokenIndex(sqlite_engine)
    index.refresh()
    canary = plant_canary(sqlite_engine)

    def store_away(*_args: object) -> None:
        raise ConnectionError("store away")

    monkeypatch.setattr(registry, "by_tokens", store_away)
    # Not "no such canary": the listener must answer with a temporary failure.
    with pytest.raises(Unknowable):
        await index.lookup(canary.token)
    monkeypatch.undo()
    assert await index.lookup(canary.token) == canary
    assert index.store_lookups == 2
    assert index.negative_hits == 0


async def test_a_full_queue_is_a_temporary_failure_never_junk(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "MAX_PENDING", 4)
    index = TokenIndex(sqlite_engine)
    index.refresh()
    canary = plant_canary(sqlite_engine)
    plausible = [new_token(index.key) for _ in range(12)]
    # One token asked for again and again while it is looked up takes one place, not many.
    found = await asyncio.gather(
        *(index.lookup(canary.token) for _ in range(100)),
        *(index.lookup(token) for token in plausible),
        return_exceptions=True,
    )
    assert found[:100] == [canary] * 100
    answers = found[100:]
    # Four places: the canary and three others went to the store in one round; the other
    # nine could not be told, so none of them is answered as junk.
    assert answers[:3] == [None] * 3
    assert all(isinstance(answer, Unknowable) for answer in answers[3:])
    assert index.overflow == 9
    assert index.store_lookups == 1


async def test_one_source_cannot_take_every_place_in_the_queue(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "MAX_PENDING_PER_SOURCE", 2)
    index = TokenIndex(sqlite_engine)
    index.refresh()
    flood = [new_token(index.key) for _ in range(5)]
    found = await asyncio.gather(
        *(index.lookup(token, "192.0.2.66") for token in flood),
        index.lookup(new_token(index.key), "198.51.100.7"),
        return_exceptions=True,
    )
    assert found[:2] == [None, None]
    assert all(isinstance(answer, Unknowable) for answer in found[2:5])
    # Another source still gets its place.
    assert found[5] is None
    # And the flooding source has its places back once its round is answered.
    assert await index.lookup(new_token(index.key), "192.0.2.66") is None


async def test_tokens_asked_for_together_share_one_round(sqlite_engine: Engine) -> None:
    index = TokenIndex(sqlite_engine)
    index.refresh()
    canaries = [plant_canary(sqlite_engine) for _ in range(3)]
    tokens = [canary.token for canary in canaries] * 20
    found = await asyncio.gather(*(index.lookup(token) for token in tokens))
    assert found == canaries * 20
    assert index.store_lookups == 1


def test_the_negative_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache = NegativeCache(size=3, ttl=5.0, clock=lambda: now[0])
    for token in ("a", "b", "c", "d"):
        cache.add(token)
    assert len(cache) == 3
    assert "a" not in cache  # the oldest made room
    now[0] = 1.0
    cache.add("b")  # added again: it goes to the back and lives until 6.0
    cache.add("e")
    assert "c" not in cache
    assert [token for token in "abcde" if token in cache] == ["b", "d", "e"]
    now[0] = 5.0
    assert "d" not in cache
    assert len(cache) == 2
    cache.discard("e")
    cache.discard("never-added")
    assert [token for token in "abcde" if token in cache] == ["b"]
    now[0] = 6.0
    assert "b" not in cache
    assert len(cache) == 0
