import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaries.find import APEX, NameMatch, locate, split_name

ZONE = ("canary", "example", "test")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tok.canary.example.test", NameMatch("tok", ())),
        ("TOK.Canary.EXAMPLE.test.", NameMatch("tok", ())),
        ("x.y.tok.canary.example.test", NameMatch("tok", ("x", "y"))),
        ("canary.example.test", APEX),
        ("canary.example.test.", APEX),
        ("tok.example.test", None),
        ("example.test", None),
        ("", None),
        ("tok.canary.example.test.evil.com", None),
        ("tok.xcanary.example.test", None),
        ("canary.example.test.canary.example.test", NameMatch("test", ("canary", "example"))),
    ],
)
def test_locate(name: str, expected: NameMatch | None) -> None:
    assert locate(split_name(name), ZONE) == expected


@given(st.lists(st.text(max_size=20), max_size=8))
def test_the_token_position_is_fixed(labels: list[str]) -> None:
    """Whatever precedes the zone, the candidate is exactly the label above the apex."""
    lowered = tuple(label.lower() for label in labels)
    match = locate((*lowered, *ZONE), ZONE)
    if not lowered:
        assert match is APEX
    else:
        assert match == NameMatch(lowered[-1], lowered[:-1])


@given(st.lists(st.text(max_size=20), max_size=8))
def test_names_not_ending_in_the_zone_are_outside(labels: list[str]) -> None:
    name = tuple(labels)
    if name[-3:] != ZONE:
        assert locate(name, ZONE) is None
