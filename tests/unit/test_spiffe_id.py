"""SPIFFE ID and trust domain parsing: one case per rule of the SPIFFE-ID standard."""

from __future__ import annotations

import pytest

from proxy.identity.spiffe_id import SpiffeId, SpiffeIdError, TrustDomain

TD_255 = "a" * 255
# "spiffe://" (9) + 255-byte trust domain + "/" + 1783 path bytes = 2048 bytes.
ID_2048 = f"spiffe://{TD_255}/" + "p" * (2048 - 9 - 255 - 1)
ID_2049 = ID_2048 + "p"


VALID_IDS = [
    "spiffe://example.org",
    "spiffe://example.org/workload",
    "spiffe://payroll.example/agent/payroll",
    "spiffe://k8s-west.example.com/ns/staging/sa/default",
    "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
    "spiffe://a_b.c-d.0/Mixed.Case_Path-9/X",
    "spiffe://example.org/...",  # three dots is an ordinary segment
    "spiffe://example.org/.hidden",
    "spiffe://1.2.3.4/x",
    f"spiffe://{TD_255}/x",
    ID_2048,
]


@pytest.mark.parametrize("text", VALID_IDS)
def test_valid_id_round_trips(text: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert str(spiffe_id) == text
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


def test_parts() -> None:
    spiffe_id = SpiffeId.parse("spiffe://example.org/ns/prod")
    assert spiffe_id.trust_domain == TrustDomain("example.org")
    assert spiffe_id.path == "/ns/prod"
    assert SpiffeId.parse("spiffe://example.org").path == ""


INVALID_IDS = [
    ("", "empty"),
    ("example.org/workload", "scheme must be spiffe"),
    ("//example.org/workload", "scheme must be spiffe"),
    ("spiffe:example.org/workload", "scheme must be spiffe"),
    ("spiffe:/example.org/workload", "scheme must be spiffe"),
    ("http://example.org/workload", "scheme must be spiffe, not 'http'"),
    ("SPIFFE://example.org/workload", "scheme must be spiffe, in lowercase"),
    ("Spiffe://example.org/workload", "scheme must be spiffe, in lowercase"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///workload", "trust domain is missing"),
    ("spiffe://Example.org/workload", "uppercase"),
    ("spiffe://EXAMPLE.ORG", "uppercase"),
    ("spiffe://user@example.org/workload", "userinfo is not allowed"),
    ("spiffe://user:pw@example.org/workload", "userinfo is not allowed"),
    ("spiffe://example.org:8443/workload", "port is not allowed"),
    ("spiffe://example.org:/workload", "port is not allowed"),
    ("spiffe://[::1]/workload", r"invalid character '\[' in trust domain"),
    ("spiffe://example.org/workload?x=1", "query is not allowed"),
    ("spiffe://example.org?x=1", "query is not allowed"),
    ("spiffe://example.org/workload#frag", "fragment is not allowed"),
    ("spiffe://example.org#frag?x", "fragment is not allowed"),
    ("spiffe://example.org/work%20load", "percent-encoding is not allowed"),
    ("spiffe://example.org/%2e%2e", "percent-encoding is not allowed"),
    ("spiffe://ex%41mple.org/workload", "percent-encoding is not allowed"),
    ("spiffe://example.org//workload", r"empty path segment"),
    ("spiffe://example.org/a//b", r"empty path segment"),
    ("spiffe://example.org/./workload", r"path segment is '\.'"),
    ("spiffe://example.org/a/.", r"path segment is '\.'"),
    ("spiffe://example.org/../workload", r"path segment is '\.\.'"),
    ("spiffe://example.org/a/..", r"path segment is '\.\.'"),
    ("spiffe://example.org/workload/", "trailing slash"),
    ("spiffe://example.org/", "trailing slash"),
    ("spiffe://example.org/work$load", r"invalid character '\$' in path"),
    ("spiffe://example.org/work load", r"invalid character ' ' in path"),
    ("spiffe://example.org/work+load", r"invalid character '\+' in path"),
    ("spiffe://example.org/a:b", r"invalid character ':' in path"),
    ("spiffe://example.org/caf\u00e9", "invalid character '\u00e9' in path"),
    ("spiffe://example.org/a\nb", r"invalid character '\\n' in path"),
    ("spiffe://exa mple.org/workload", r"invalid character ' ' in trust domain"),
    ("spiffe://exa$mple.org", r"invalid character '\$' in trust domain"),
    ("spiffe://caf\u00e9.org/x", "invalid character '\u00e9' in trust domain"),
    (f"spiffe://{'a' * 256}/x", "trust domain is too long"),
    (ID_2049, "SPIFFE ID is too long"),
    # Lone surrogates (issue 12 item 27): a rule, never a UnicodeEncodeError.
    ("\ud800", "scheme must be spiffe"),
    ("spiffe://example.org/\ud800", "invalid character '\\\\ud800' in path"),
    ("spiffe://\udfff.org/x", "invalid character '\\\\udfff' in trust domain"),
]


@pytest.mark.parametrize(("text", "rule"), INVALID_IDS)
def test_invalid_id_names_the_rule(text: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError, match=rule):
        SpiffeId.parse(text)


def test_error_is_a_value_error_with_rule() -> None:
    with pytest.raises(ValueError) as info:
        SpiffeId.parse("spiffe://example.org/x?y")
    assert isinstance(info.value, SpiffeIdError)
    assert info.value.rule == "query is not allowed"


def test_error_message_is_short_and_escaped() -> None:
    hostile = "spiffe://example.org/x\nFAKE LOG LINE" + "y" * 3000
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(hostile)
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 300


def test_constructor_validates() -> None:
    td = TrustDomain("example.org")
    with pytest.raises(SpiffeIdError, match="must start with '/'"):
        SpiffeId(td, "workload")
    with pytest.raises(SpiffeIdError, match="trailing slash"):
        SpiffeId(td, "/a/")
    with pytest.raises(SpiffeIdError, match="too long"):
        SpiffeId(TrustDomain(TD_255), "/" + "p" * 2000)
    with pytest.raises(SpiffeIdError, match="uppercase"):
        TrustDomain("Example.org")


def test_is_member_of() -> None:
    spiffe_id = SpiffeId.parse("spiffe://a.org/workload")
    assert spiffe_id.is_member_of(TrustDomain("a.org"))
    assert not spiffe_id.is_member_of(TrustDomain("b.org"))
    assert not spiffe_id.is_member_of(TrustDomain("a.org.evil"))


def test_ids_are_values() -> None:
    first = SpiffeId.parse("spiffe://a.org/x")
    second = SpiffeId.parse("spiffe://a.org/x")
    assert first == second
    assert {first: 1}[second] == 1
    assert first != SpiffeId.parse("spiffe://a.org/X")  # paths are case-sensitive


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("example.org", "example.org"),
        ("spiffe://example.org", "example.org"),
        ("spiffe://example.org/path", "example.org"),  # as go-spiffe and py-spiffe do
        ("spiffe://example.org/ns/prod/sa/payroll", "example.org"),
        ("a_b-c.0", "a_b-c.0"),
        (TD_255, TD_255),
    ],
)
def test_trust_domain_parse(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert str(td) == name
    assert td.id_string() == f"spiffe://{name}"
    assert SpiffeId.parse(td.id_string()).trust_domain == td


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("", "trust domain is missing"),
        ("Example.org", "uppercase"),
        ("example.org:443", "port is not allowed"),
        ("user@example.org", "userinfo is not allowed"),
        ("ex%41mple.org", "percent-encoding is not allowed"),
        ("exa mple.org", "invalid character ' '"),
        ("example.org/path", "invalid character '/'"),
        ("a" * 256, "trust domain is too long"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe://example.org/path/", "trailing slash"),  # the ID form must be a valid ID
        ("spiffe://example.org/a/../b", "dot segments"),
        ("\ud800", "invalid character"),
        ("SPIFFE://example.org", "lowercase"),
        ("http://example.org", "scheme must be spiffe"),
        ("spiffe:example.org", "scheme must be spiffe"),
    ],
)
def test_invalid_trust_domain_names_the_rule(text: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError, match=rule):
        TrustDomain.parse(text)
