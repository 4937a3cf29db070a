"""Finding a token in what a sandbox sent out: plain functions over strings.

A DNS name carries a token at one position only: the label directly under
the zone apex (`<token>.<zone>`, with any labels to its left, as in
`x.y.<token>.<zone>`). Matching by position rather than by searching the
whole name means a token smuggled elsewhere in a junk name never matches,
and the answer to any name costs one dictionary lookup.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NameMatch:
    """A name under the zone: the label where a token would be, and the labels left of it."""

    candidate: str
    left: tuple[str, ...]


def split_name(name: str) -> tuple[str, ...]:
    """Lowercase labels of a dotted name, ignoring a trailing dot."""
    return tuple(name.rstrip(".").lower().split(".")) if name.strip(".") else ()


APEX = NameMatch("", ())


def locate(labels: tuple[str, ...], zone: tuple[str, ...]) -> NameMatch | None:
    """Where a lowercase name sits: None outside `zone`, APEX for the apex itself."""
    depth = len(zone)
    position = len(labels) - depth - 1
    if position < -1 or labels[position + 1 :] != zone:
        return None
    if position == -1:
        return APEX
    return NameMatch(labels[position], tuple(labels[:position]))
