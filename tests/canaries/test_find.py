import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaries.find import NameMatch, in_zone, split_name, under_zone

ZONE = ("canary", "example", "test")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tok.canary.example.test", NameMatch("tok", ())),
        ("TOK.Canary.EXAMPLE.test.", NameMatch("tok", ())),
        ("x.y.tok.canary.example.test", NameMatch("tok", ("x", "y"))),
        ("canary.example.test", None),
        ("tok.example.test", None),
        ("tok.canary.example.test.evil.com", None),
        ("tok.xcanary.example.test", None),
        ("canary.example.test.canary.example.test", NameMatch("test", ("canary", "example"))),
    ],
)
def test_under_zone(name: str, expected: NameMatch | None) -> None:
    assert under_zone(split_name(name), ZONE) == expected


@pytest.mark.parametrize(
    ("name", "inside"),
    [
        ("canary.example.test", True),
        ("a.canary.example.test", True),
        ("example.test", False),
        ("", False),
    ],
)
def test_in_zone(name: str, inside: bool) -> None:
    assert in_zone(split_name(name), ZONE) is inside


@given(st.lists(st.text(max_size=20), max_size=8))
def test_the_token_position_is_fixed(labels: list[str]) -> None:
    """Whatever precedes the zone, the candidate is exactly the label above the apex."""
    lowered = [label.lower() for label in labels]
    match = under_zone([*lowered, *ZONE], ZONE)
    if not lowered:
        assert match is None
    else:
        assert match == NameMatch(lowered[-1], tuple(lowered[:-1]))
