"""A peer's certificate chain (network input: whatever the peer sends that
parses as X.509): verify_x509_svid raises only ChainError."""

from __future__ import annotations

import contextlib
import datetime as dt
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.identity import ChainError, TrustBundle, TrustBundleSet, TrustDomain, verify_x509_svid
from tests.fuzz import seeds
from tests.fuzz.strategies import mutated

Cert = x509.Certificate


@cache
def _bundles() -> TrustBundleSet:
    root, _, _ = seeds.pki()
    return TrustBundleSet([TrustBundle(TrustDomain("a.org"), (root.cert,))])


@cache
def _ders() -> tuple[bytes, ...]:
    root, intermediate, leaf = seeds.pki()
    return tuple(c.public_bytes(Encoding.DER) for c in (leaf.cert, intermediate.cert, root.cert))


def _certificate(data: bytes) -> Cert | None:
    try:
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion):  # what the TLS layer would refuse first
        return None


certificates = st.one_of(st.sampled_from(_ders()), mutated(_ders(), max_ops=3)).map(_certificate)


@given(certificates, st.lists(certificates, max_size=3))
def test_verify_peer_chain(leaf: Cert | None, chain: list[Cert | None]) -> None:
    assume(leaf is not None and None not in chain)
    assert leaf is not None
    intermediates = [c for c in chain if c is not None]
    with contextlib.suppress(ChainError):
        verify_x509_svid(leaf, intermediates, _bundles(), dt.datetime.now(dt.UTC))
