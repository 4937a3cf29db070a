"""The token core: keyed checks, minting, decoding exfiltrated labels."""

import base64
import hmac
import secrets
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaries.tokens import TOKEN_LENGTH, TokenKey, decode_exfil, is_plausible, new_token
from support import legacy_token

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
KEY = TokenKey(secrets.token_bytes(32))


def test_new_tokens_are_dns_safe_unique_and_plausible_under_their_key() -> None:
    tokens = {new_token(KEY) for _ in range(2000)}
    assert len(tokens) == 2000
    for token in tokens:
        assert len(token) == TOKEN_LENGTH
        assert token == token.lower()
        assert set(token) <= set(BASE32)
        assert is_plausible(token, KEY)
        assert is_plausible(token.upper(), KEY)


def test_a_changed_character_fails_the_check() -> None:
    token = new_token(KEY)
    flipped = ("b" if token[3] == "a" else "a").join((token[:3], token[4:]))
    assert not is_plausible(flipped, KEY)


# A 16-bit check lets 1 in 65,536 through by chance: of 1,000 tokens, 3 or more
# pass less than once in a million runs.
@pytest.mark.parametrize(
    "make",
    [lambda: new_token(TokenKey(secrets.token_bytes(32))), legacy_token],
    ids=["another-key", "legacy-unkeyed"],
)
def test_tokens_not_checked_with_this_key_are_not_plausible(make: Callable[[], str]) -> None:
    assert sum(is_plausible(make(), KEY) for _ in range(1000)) <= 2


@pytest.mark.parametrize(
    "candidate",
    ["", "www", "a" * 25, "a" * 27, "0" * 26, "a-" * 13, "é" * 26, "\u212a" * 26],
)
def test_non_tokens(candidate: str) -> None:
    assert not is_plausible(candidate, KEY)


def test_a_key_is_long_enough_and_never_printed() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TokenKey(b"short")
    assert KEY.secret.hex() not in repr(KEY)


@given(st.text(max_size=40) | st.text(alphabet=BASE32 + BASE32.upper(), min_size=26, max_size=26))
def test_is_plausible_never_raises_and_needs_a_well_formed_token(text: str) -> None:
    if is_plausible(text, KEY):
        assert len(text) == TOKEN_LENGTH
        assert set(text.lower()) <= set(BASE32)


@given(st.text(alphabet=BASE32, min_size=26, max_size=26))
def test_is_plausible_agrees_with_base64_decoding(candidate: str) -> None:
    raw = base64.b32decode(candidate.upper() + "======")
    expected = hmac.digest(KEY.secret, raw[:14], "sha256")[:2] == raw[14:]
    assert is_plausible(candidate, KEY) is expected


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
