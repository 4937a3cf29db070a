"""Summaries and incidents the database computes agree with grouping the whole timeline.

The console's sandbox list, its newest incidents and an incident looked up by
any of its hits are read with SQL (window functions, aggregates) so they stay
cheap on a long ledger; these checks hold them to `incidents()` over every
entry, on SQLite and on a real PostgreSQL server.
"""

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from store import ledger
from store.activity import SOURCES_NAMED, activity, newest_incidents
from store.timeline import (
    TimelineQuery,
    find_incident,
    incidents,
    query_incidents,
    timeline,
    timeline_page,
)

GAP = 100
_runs = itertools.count()

# (sandbox, microseconds since the previous entry, type, aggregate count or None)
rows = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from([0, 1, GAP, GAP + 1, 5 * GAP]),
        st.sampled_from(["hit", "hit", "hit", "alert_opened"]),
        st.one_of(st.none(), st.integers(0, 50)),
    ),
    max_size=40,
)


def event(sandbox: str, time_us: int, kind: str, count: int | None, n: int) -> ledger.Event:
    data: dict[str, Any] = {"n": n}
    if kind == "hit" and count is not None:
        data["burst"] = {
            "count": count,
            "sources": {f"203.0.113.{n % 7}": 1},
            "protocols": {"smtp": 1},
        }
    return ledger.Event(
        type=kind,
        time_us=time_us,
        node="n",
        canary_id="cn-1",
        sandbox=sandbox,
        protocol="dns" if n % 2 else "http",
        source=f"198.51.100.{n % 30}" if kind == "hit" else None,
        data=data,
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows, newest=st.integers(1, 4))
def test_sql_summaries_match_grouping_every_entry(
    engine: Engine, rows: list[tuple[int, int, str, int | None]], newest: int
) -> None:
    run = next(_runs)
    names = [f"run{run}-{index}" for index in range(3)]
    moment = 1_000_000
    events = []
    for n, (index, step, kind, count) in enumerate(rows):
        moment += step
        events.append(event(names[index], moment, kind, count, n))
    with engine.begin() as connection:
        ledger.append(connection, events)
    with engine.connect() as connection:
        everywhere = incidents(timeline(connection, TimelineQuery()), GAP)[-newest:]
        listed = newest_incidents(connection, TimelineQuery(), GAP, newest)
        assert [(i.id, i.follow_up) for i, _ in listed] == [(i.id, i.follow_up) for i in everywhere]
        assert [total.hits for _, total in listed] == [i.hit_count for i in everywhere]
        summed = activity(connection, GAP, exclude="unused")
        for name in names:
            whole = incidents(timeline(connection, TimelineQuery(sandbox=name)), GAP)
            if not whole:
                assert name not in summed
                continue
            got = summed[name]
            hits = [hit for incident in whole for hit in incident.hits]
            assert got.hits == sum(incident.hit_count for incident in whole)
            assert got.incidents == len(whole)
            assert got.last_us == max(hit.time_us for hit in hits)
            assert got.channels == {hit.protocol for hit in hits} | (
                {"smtp"} if any("burst" in hit.evidence for hit in hits) else set()
            )
            assert set(got.sources) == {s for incident in whole for s in incident.sources}
            assert len(got.named_sources) == min(SOURCES_NAMED, len(got.sources))
            paged, after = [], None
            while True:
                page, after = timeline_page(connection, TimelineQuery(sandbox=name), after, 3)
                paged += page
                if after is None:
                    break
            assert paged == timeline(connection, TimelineQuery(sandbox=name))
            recent = query_incidents(connection, TimelineQuery(sandbox=name, newest=newest), GAP)
            assert [i.entries for i in recent] == [i.entries for i in whole[-newest:]]
            listed = newest_incidents(connection, TimelineQuery(sandbox=name), GAP, newest)
            assert [i.id for i, _ in listed] == [i.id for i in whole[-newest:]]
            for (incident, total), expected in zip(listed, whole[-newest:], strict=True):
                assert incident.follow_up == expected.follow_up
                assert (total.hits, total.last_us) == (expected.hit_count, expected.last_us)
                assert list(total.canaries) == expected.canaries
                assert set(total.sources) == set(expected.sources)
            for incident in whole:
                for hit in incident.hits:
                    found = find_incident(connection, f"in-{hit.seq}", GAP)
                    assert found is not None
                    assert (found.id, found.entries) == (incident.id, incident.entries)
                short = find_incident(connection, incident.id, GAP, rows=2)
                assert short is not None
                first, rest = incident.entries[:2], incident.entries[2:]
                assert short.cut == bool(rest)
                assert short.entries == first + [e for e in rest if e.type.startswith("alert_")]
                [span] = activity(connection, GAP, *short.span).values()
                assert (span.hits, span.incidents, span.last_us) == (
                    incident.hit_count,
                    1,
                    incident.last_us,
                )
                assert list(span.canaries) == incident.canaries
                assert set(span.sources) == set(incident.sources)


def test_only_hits_name_an_incident(engine: Engine) -> None:
    with engine.begin() as connection:
        [alert, hit] = ledger.append(
            connection,
            [event("lone", 5, "alert_opened", None, 0), event("lone", 6, "hit", None, 1)],
        )
        assert find_incident(connection, f"in-{alert.seq}", GAP) is None
        found = find_incident(connection, f"in-{hit.seq}", GAP)
        assert found is not None
        assert found.entries == [hit]
