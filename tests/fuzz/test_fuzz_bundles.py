"""Trust bundles in every format (PEM, DER, SPIFFE JWKS, and the
format-sniffing from_bytes the files source uses): only BundleError."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.identity import BundleError, TrustBundle, TrustDomain
from tests.fuzz import seeds
from tests.fuzz.strategies import inputs, json_documents

TD = TrustDomain.parse("a.org")
JWKS_KEYS = ("keys", "use", "kty", "x5c", "x509-svid", "EC", "RSA", "spiffe_sequence", "kid")


def _bundle_or_error(call: object, data: bytes | str) -> None:
    try:
        bundle = call(TD, data)  # type: ignore[operator]
    except BundleError:
        return
    assert bundle.trust_domain == TD and bundle.authorities


@given(inputs(seeds.certificates_pem()))
def test_from_pem(data: bytes) -> None:
    _bundle_or_error(TrustBundle.from_pem, data)


@given(inputs(seeds.certificates_der()))
def test_from_der(data: bytes) -> None:
    _bundle_or_error(TrustBundle.from_der, data)


@given(json_documents(JWKS_KEYS, seeds.jwks()))
def test_from_jwks(data: bytes) -> None:
    _bundle_or_error(TrustBundle.from_jwks, data)


@given(json_documents(JWKS_KEYS, seeds.jwks()).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_from_jwks_text(data: str) -> None:
    _bundle_or_error(TrustBundle.from_jwks, data)


@given(
    st.one_of(
        inputs(seeds.certificates_pem() + seeds.certificates_der() + seeds.jwks()),
        json_documents(JWKS_KEYS, seeds.jwks()),
    )
)
def test_from_bytes(data: bytes) -> None:
    _bundle_or_error(TrustBundle.from_bytes, data)
