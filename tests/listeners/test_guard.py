"""The connection guard's admission rules, as pure logic (the listeners' tests drive real sockets)."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listeners import guard as guard_module
from listeners.guard import ConnectionGuard, Slot, source_of
from listeners.smtp import MessagePlaces


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(guard_module.time, "monotonic", fake)
    return fake


def admit_many(guard: ConnectionGuard, address: str, count: int, closed: list[str]) -> list[Slot]:
    slots = []
    for n in range(count):
        slot = guard.admit(address, lambda tag=f"{address}#{n}": closed.append(tag))
        assert slot is not None
        slots.append(slot)
    return slots


def test_sources_are_addresses_and_ipv6_64s_in_networks_of_24s_and_48s() -> None:
    assert source_of("192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9")
    assert source_of("2001:db8:1:2::1")[0] != source_of("2001:db8:1:3::1")[0]
    assert source_of("2001:db8:1:2::1")[1] == source_of("2001:db8:1:3::1")[1] == "2001:db8:1::/48"
    assert source_of("::ffff:192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert source_of("not an address") == ("not an address", "not an address")


def test_a_source_at_its_cap_loses_its_own_oldest_once_it_is_old(clock: Clock) -> None:
    closed: list[str] = []
    guard = ConnectionGuard(total=100, per_source=3, grace=1.0)
    admit_many(guard, "192.0.2.1", 3, closed)
    # Young: a neighbour behind the same address may be about to send its request.
    assert guard.admit("192.0.2.1", lambda: closed.append("new")) is None
    assert guard.refused["source"] == 1
    clock.now += 2
    assert guard.admit("192.0.2.1", lambda: closed.append("new")) is not None
    assert closed == ["192.0.2.1#0"]
    assert guard.evicted["source"] == 1
    assert guard.open == 3


def test_the_busiest_network_yields_first(clock: Clock) -> None:
    closed: list[str] = []
    guard = ConnectionGuard(total=6, per_source=6, grace=1.0)
    admit_many(guard, "198.51.100.2", 2, closed)
    admit_many(guard, "192.0.2.1", 3, closed)
    admit_many(guard, "192.0.2.7", 1, closed)
    clock.now += 2
    assert guard.admit("203.0.113.9", lambda: None) is not None
    # Not the oldest of all (198.51.100.2's), but the oldest of the busiest network.
    assert closed == ["192.0.2.1#0"]
    assert guard.evicted["fair"] == 1


def test_a_network_of_many_sources_holds_no_more_than_its_cap(clock: Clock) -> None:
    """One /48 holds 65,536 /64s, each with one stalled connection its fair share as a source:
    the /48 still holds at most its network cap, and a newcomer from elsewhere gets in at once."""
    closed: list[str] = []
    guard = ConnectionGuard(total=512, per_source=32, grace=1.0)
    assert guard.per_network == 128
    for n in range(128):
        admit_many(guard, f"2001:db8:1:{n:x}::99", 1, closed)
    for n in range(128, 600):
        assert guard.admit(f"2001:db8:1:{n:x}::99", lambda: None) is None
    assert guard.refused["network"] == 600 - 128
    assert guard.admit("198.51.100.7", lambda: None) is not None
    assert guard.admit("2001:db8:2::1", lambda: None) is not None
    # Once its connections are old, the network makes room for its own newcomer.
    clock.now += 2
    assert guard.admit("2001:db8:1:ffff::99", lambda: None) is not None
    assert closed == ["2001:db8:1:0::99#0"]
    assert guard.evicted["network"] == 1
    assert guard.open == 130


def test_many_networks_with_one_stalled_connection_each_cannot_lock_out_a_newcomer(
    clock: Clock,
) -> None:
    closed: list[str] = []
    guard = ConnectionGuard(total=512, per_source=32, grace=1.0)
    for n in range(512):
        admit_many(guard, f"2001:db8:{n:x}::99", 1, closed)
    clock.now += 2
    assert guard.admit("198.51.100.7", lambda: None) is not None
    assert guard.admit("2001:db8:5::98", lambda: None) is not None
    assert closed == ["2001:db8:0::99#0", "2001:db8:1::99#0"]
    assert guard.evicted["oldest"] == 2
    assert guard.open == 512


def test_a_connection_that_keeps_talking_is_not_the_one_closed(clock: Clock) -> None:
    """A slow upload or a mail session is old but active: the silent one goes first."""
    closed: list[str] = []
    guard = ConnectionGuard(total=100, per_source=2, grace=1.0)
    talking, _silent = admit_many(guard, "192.0.2.1", 2, closed)
    clock.now += 5
    talking.touch()
    assert guard.admit("192.0.2.1", lambda: None) is not None
    assert closed == ["192.0.2.1#1"]


def test_a_full_listener_of_young_connections_refuses(clock: Clock) -> None:
    guard = ConnectionGuard(total=4, per_source=4, grace=1.0)
    admit_many(guard, "192.0.2.1", 4, [])
    assert guard.admit("198.51.100.2", lambda: None) is None
    assert guard.refused["total"] == 1


def test_release_is_idempotent_and_eviction_releases() -> None:
    guard = ConnectionGuard(total=2, per_source=1, grace=0.0)
    first = guard.admit("192.0.2.1", lambda: None)
    assert first is not None
    second = guard.admit("192.0.2.1", lambda: None)
    assert second is not None
    assert guard.open == 1
    first.release()
    first.release()
    second.release()
    assert guard.open == 0


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["admit", "release", "tick"]), st.integers(0, 7)),
        max_size=200,
    )
)
def test_the_caps_hold_whatever_the_order(steps: list[tuple[str, int]]) -> None:
    now = [0.0]
    saved = guard_module.time.monotonic
    guard_module.time.monotonic = lambda: now[0]  # type: ignore[assignment]
    try:
        guard = ConnectionGuard(total=6, per_source=2, grace=1.0, per_network=4)
        live: list[Slot] = []

        def closer(slot_box: list[Slot]) -> None:
            live.remove(slot_box[0])

        for action, n in steps:
            if action == "admit":
                box: list[Slot] = []
                address = f"192.0.{n % 3}.{n % 4}"
                slot = guard.admit(address, lambda box=box: closer(box))
                if slot is not None:
                    box.append(slot)
                    live.append(slot)
            elif action == "release" and live:
                live.pop(n % len(live)).release()
            else:
                now[0] += 0.6
            assert guard.open == len(live) <= 6
            assert max(Counter(slot.source for slot in live).values(), default=0) <= 2
            assert max(Counter(slot.network for slot in live).values(), default=0) <= 4
    finally:
        guard_module.time.monotonic = saved  # type: ignore[assignment]


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["admit", "release", "pin", "tick"]), st.integers(0, 11)),
        max_size=200,
    )
)
def test_message_places_hold_their_caps_and_never_stop_a_pinned_message(
    steps: list[tuple[str, int]],
) -> None:
    now = [0.0]
    saved = guard_module.time.monotonic
    guard_module.time.monotonic = lambda: now[0]  # type: ignore[assignment]
    try:
        places = MessagePlaces(total=4, share=2, grace=1.0)
        live: list[Slot] = []
        pinned: set[Slot] = set()

        def stopped(box: list[Slot]) -> None:
            assert box[0] not in pinned
            live.remove(box[0])

        for action, n in steps:
            if action == "admit":
                box: list[Slot] = []
                slot = places.admit(f"192.0.{n % 6}.{n % 2}", lambda box=box: stopped(box))
                if slot is not None:
                    box.append(slot)
                    live.append(slot)
            elif action == "release" and live:
                slot = live.pop(n % len(live))
                slot.release()
                slot.release()
                pinned.discard(slot)
            elif action == "pin" and live:
                live[n % len(live)].pin()
                pinned.add(live[n % len(live)])
            else:
                now[0] += 0.4
            assert places.open == len(live) <= 4
            assert max(Counter(slot.network for slot in live).values(), default=0) <= 2
            assert all(places.usage(f"192.0.{k}.0/24", now[0]) >= 0 for k in range(6))
    finally:
        guard_module.time.monotonic = saved  # type: ignore[assignment]
