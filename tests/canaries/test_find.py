import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaries.find import (
    APEX,
    AddressMatch,
    NameMatch,
    basic_credentials,
    in_address,
    in_domains,
    in_request,
    locate,
    scan,
    split_name,
)
from canaries.tokens import TOKEN_LENGTH, TokenKey, new_token
from support import legacy_token

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


TOKEN = new_token(TokenKey(secrets.token_bytes(32)))


BASE32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def well_formed(candidate: str) -> bool:
    return len(candidate) == TOKEN_LENGTH and BASE32.issuperset(candidate)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (f"{TOKEN}@canary.example.test", AddressMatch(TOKEN, "local")),
        (f"<{TOKEN.upper()}@Canary.Example.Test>", AddressMatch(TOKEN, "local")),
        (f"ceo@{TOKEN}.canary.example.test", AddressMatch(TOKEN, "domain")),
        (f"a@b.{TOKEN}.canary.example.test", AddressMatch(TOKEN, "domain")),
        (f"{TOKEN}@example.test", None),
        (f"{TOKEN}@canary.example.test.evil", None),
        ("nobody", None),
        ("@canary.example.test", None),
    ],
)
def test_in_address(address: str, expected: AddressMatch | None) -> None:
    assert in_address(address, ZONE) == expected


def test_in_domains() -> None:
    domains = (ZONE, ("mail", "corp"))
    assert in_domains("canary.example.test", domains)
    assert in_domains("x.y.canary.example.test", domains)
    assert in_domains("MAIL.corp.", domains)
    assert not in_domains("gmail.com", domains)
    assert not in_domains("example.test", domains)


@pytest.mark.parametrize(
    "template",
    [
        "{t}",
        "password {t}\n",
        "sk-proj-{t}",
        "Bearer {t}",
        "https://u:{t}@host/",
        "aws_secret_access_key = {t}/ABCDEF+",
        "?key={T}&x=1",
        '"{t}"',
    ],
)
def test_scan_finds_standalone_tokens(template: str) -> None:
    assert scan(template.format(t=TOKEN, T=TOKEN.upper())) == {TOKEN}


@pytest.mark.parametrize("text", ["x" + TOKEN, TOKEN + "a", TOKEN + "2", TOKEN[:25]])
def test_scan_ignores_tokens_glued_to_base32_or_cut(text: str) -> None:
    assert scan(text) == set()


@given(
    st.text(max_size=300),
    st.text(alphabet="-_./:= \n\"'", min_size=1, max_size=3),
    st.text(max_size=300),
)
def test_scan_finds_a_token_anywhere_it_stands_alone(before: str, gap: str, after: str) -> None:
    text = before + gap + TOKEN + gap + after
    assert TOKEN in scan(text)


@given(st.text(max_size=2000))
def test_scan_never_raises_and_returns_only_well_formed_tokens(text: str) -> None:
    assert all(well_formed(found) for found in scan(text))


def test_scan_leaves_telling_tokens_from_junk_to_the_index() -> None:
    """Only the index knows the key and the canaries minted before checks were keyed."""
    legacy = legacy_token()
    assert scan(f"user={legacy.upper()} pass={TOKEN}") == {legacy, TOKEN}


def test_in_request_reports_every_place() -> None:
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    found = in_request(
        host=f"{TOKEN}.canary.example.test:8080",
        target=f"/a/{TOKEN}/b?q=%20{TOKEN}",
        headers=[
            ("Host", "ignored"),
            ("Authorization", f"Basic {basic}"),
            ("Cookie", f"s={TOKEN}"),
        ],
        body_head=f"x={TOKEN}",
        zone=ZONE,
    )
    # The encoded Basic value may hold a base32-looking run too: the index rejects such.
    assert found[TOKEN] == [
        "host",
        "path",
        "query",
        "header:authorization",
        "header:cookie",
        "body",
    ]


@given(
    host=st.text(max_size=100),
    target=st.text(max_size=200),
    headers=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=100)), max_size=5),
    body=st.text(max_size=200),
)
def test_in_request_never_raises(
    host: str, target: str, headers: list[tuple[str, str]], body: str
) -> None:
    found = in_request(host, target, headers, body, ZONE)
    for token, places in found.items():
        assert places
        assert places == ["host"] or well_formed(token)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Basic dTpw", "u:p"), ("basic  dTpw ", "u:p"), ("Bearer x", ""), ("Basic !!!", "")],
)
def test_basic_credentials(value: str, expected: str) -> None:
    assert basic_credentials(value) == expected


@given(st.text(max_size=80), st.sampled_from(["", "x.", "a.b."]))
def test_in_address_never_raises_and_finds_only_positional_tokens(local: str, prefix: str) -> None:
    assert in_address(local, ZONE) is None or "@" in local
    match = in_address(f"{local}@{prefix}{TOKEN}.canary.example.test", ZONE)
    if local.lstrip().lstrip("<>") and "@" not in local:
        assert match == AddressMatch(TOKEN, "domain")
