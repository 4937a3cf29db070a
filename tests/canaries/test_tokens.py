import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaries.tokens import TOKEN_LENGTH, decode_exfil, is_token, new_token


def test_new_tokens_are_dns_safe_unique_and_valid() -> None:
    tokens = {new_token() for _ in range(2000)}
    assert len(tokens) == 2000
    for token in tokens:
        assert len(token) == TOKEN_LENGTH
        assert token == token.lower()
        assert set(token) <= set("abcdefghijklmnopqrstuvwxyz234567")
        assert is_token(token)
        assert is_token(token.upper())


def test_a_changed_character_fails_the_checksum() -> None:
    token = new_token()
    flipped = ("b" if token[3] == "a" else "a").join((token[:3], token[4:]))
    assert not is_token(flipped)


@pytest.mark.parametrize(
    "candidate",
    ["", "www", "a" * 25, "a" * 27, "0" * 26, "a-" * 13, "é" * 26],
)
def test_non_tokens(candidate: str) -> None:
    assert not is_token(candidate)


@given(st.text(max_size=40))
def test_is_token_never_raises(text: str) -> None:
    is_token(text)


@pytest.mark.parametrize(
    ("labels", "decoded"),
    [
        ([base64.b32encode(b"root:x:0:0").decode().rstrip("=").lower()], "root:x:0:0"),
        (["6865", "6c6c6f"], "hello"),
        (["www"], None),
        ([], None),
        (["ff00"], None),
    ],
)
def test_decode_exfil(labels: list[str], decoded: str | None) -> None:
    assert decode_exfil(labels) == decoded


@given(st.lists(st.text(max_size=63), max_size=6))
def test_decode_exfil_never_raises(labels: list[str]) -> None:
    result = decode_exfil(labels)
    assert result is None or result.isprintable()
