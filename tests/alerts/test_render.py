"""Sandbox-controlled strings come out escaped and defanged in every page format."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alerts.render import Message, defang, for_hit, render
from store.ledger import Entry

INJECTIONS = {
    "qname": "@channel <!here> <@U024BE7LH> [click](http://evil.example/x) *bold* <script>alert(1)</script>.",
    "subject": "Re: <!channel> **urgent** https://phish.example/login\r\nBcc: everyone@corp",
    "user_agent": "<img src=x onerror=alert(1)> @here `code` _x_ \x1b[31mred",
}


def entry(**evidence: object) -> Entry:
    data = {
        "kind": "dns",
        "severity": "high",
        "labels": {"team": "x"},
        "location": "/home/a/.bashrc",
        **evidence,
    }
    return Entry(
        7,
        1_800_000_000_000_000,
        "hit",
        "cn-1",
        "sbx-1",
        "dns",
        "198.51.100.7:5353",
        "n1",
        json.dumps(data),
        "0" * 64,
        "a" * 64,
    )


def test_the_first_line_says_what_happened() -> None:
    message = for_hit(entry(qname="x.tok.zone."), "al-1")
    assert message.headline == (
        "DNS lookup of canary cn-1 (sandbox sbx-1, planted at /home/a/.bashrc) from 198.51.100.7"
    )
    text = render(message, "text")[1]
    assert text.splitlines()[0] == message.headline


@pytest.mark.parametrize("fmt", ["text", "markdown", "html"])
def test_injections_are_neutralised_in_every_format(fmt: str) -> None:
    _, body = render(for_hit(entry(**INJECTIONS), "al-1"), fmt)  # type: ignore[arg-type]
    for dangerous in (
        "@channel",
        "<!here>",
        "<@U024",
        "http://evil",
        "https://phish",
        "@here",
        "<script",
        "<img",
        "\x1b",
        "\r\nBcc",
    ):
        assert dangerous not in body, (fmt, dangerous)
    if fmt == "markdown":
        assert "\\*" in body


@given(st.text(max_size=300))
def test_defanged_text_has_no_mentions_links_or_control_characters(text: str) -> None:
    safe = defang(text)
    assert "://" not in safe.replace("[://]", "")
    assert "@" not in safe.replace("[@]", "")
    assert "<" not in safe
    assert ">" not in safe
    assert all(char.isprintable() for char in safe)


@given(st.text(max_size=100), st.sampled_from(["text", "markdown", "html"]))
def test_rendering_any_value_never_raises_or_leaks_markup(value: str, fmt: str) -> None:
    message = for_hit(entry(qname=value, subject=value), "al-1")
    assert Message.from_json(message.as_json()) == message
    title, body = render(message, fmt)  # type: ignore[arg-type]
    assert title
    assert "<script" not in body
