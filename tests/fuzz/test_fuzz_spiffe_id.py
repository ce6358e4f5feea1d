"""SPIFFE IDs and trust domain names: only SpiffeIdError, and a parsed ID
prints back as exactly the text it was parsed from."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.identity import SpiffeId, SpiffeIdError, TrustDomain
from tests.fuzz.strategies import any_char, any_text

# Mostly the grammar's own characters, so inputs get past the scheme check.
_near = st.text(
    st.one_of(
        st.sampled_from("abcxyz019.-_/:@%?#[]AZ"),
        any_char,
    ),
    max_size=80,
)
ids = st.one_of(
    any_text,
    st.builds(lambda rest: "spiffe://" + rest, _near),
    st.builds(lambda td, path: f"spiffe://{td}{path}", _near, _near),
    st.builds(lambda n: "spiffe://a.org/" + "x" * n, st.integers(2000, 2100)),
)


@given(ids)
def test_spiffe_id_parse(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed


@given(st.one_of(ids, _near))
def test_trust_domain_parse(text: str) -> None:
    try:
        td = TrustDomain.parse(text)
    except SpiffeIdError:
        return
    assert TrustDomain.parse(td.name) == td
    assert TrustDomain.parse(td.id_string()) == td
