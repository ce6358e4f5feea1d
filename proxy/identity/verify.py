"""Verifying a peer's X509-SVID, scoped to the peer's own trust domain.

Theory of operation: the key property (invariant 2) is that an SVID for
``spiffe://B/...`` is accepted only if it chains to trust domain B's bundle.
A verifier handed the union of all bundles would accept an SVID for B minted
by A's CA, i.e. any federated trust domain could impersonate any other. So:

1. Read the SPIFFE ID from the leaf and apply the leaf rules (svid.py)
   *before* any path building: the ID decides which bundle may anchor it.
2. Build a trust store from that one trust domain's bundle and nothing else.
3. Let ``cryptography``'s verifier (RFC 5280 path building: signatures,
   issuer/subject chaining, validity, basicConstraints cA and pathLen,
   unknown critical extensions) find a path from the leaf to that store.
4. Check the SPIFFE signing-certificate rules on every CA in the path.

Why a custom extension policy: the verifier's defaults are the CA/Browser
Forum web PKI profile, which refuses legitimate SVIDs (X509-SVID 4.4 allows a
critical EKU, the web PKI does not; the web PKI requires an AKI on leaves,
X.509 does not). We permit all extensions, because the SPIFFE rules are
checked here explicitly, except that the CA policy requires basicConstraints
(cryptography insists, and then enforces cA=true and pathLen itself) and
keyUsage with keyCertSign, so that path building never wanders through a
certificate that may not sign. Unknown critical extensions are still refused.

Still refused by the verifier whatever the policy, and so by us: URI name
constraints ("unsupported name constraint", although X509-SVID 4.2 allows
them), CA keys other than RSA >= 2048 bits and P-256/384/521 (so no Ed25519
CAs; Ed25519 leaf keys are fine), signature algorithms outside the web PKI
list, CAs with an empty subject, negative serials or serials over 20 octets,
certificates other than v3.

Expiry is checked on the leaf and the intermediates before path building,
so an expired or not-yet-valid certificate yields the distinct reason
"certificate_expired" (invariant 7). The verifier checks the same times
again, and the anchor's, as part of path validation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from proxy.identity.bundle import TrustBundleSet
from proxy.identity.spiffe_id import SpiffeId
from proxy.identity.svid import (
    SvidError,
    check_validity,
    describe,
    validate_leaf,
    validate_signing_cert,
)

UNTRUSTED_CHAIN = "untrusted_chain"
CERTIFICATE_EXPIRED = "certificate_expired"
INVALID_SVID = "invalid_svid"


class ChainError(ValueError):
    """A peer's SVID was refused. ``reason`` is one of "untrusted_chain",
    "certificate_expired" or "invalid_svid" (a stable label for audit)."""

    def __init__(self, message: str, *, reason: str = UNTRUSTED_CHAIN) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedSvid:
    """A peer SVID that passed verification, with the path that anchored it."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc


def _require_key_cert_sign(_policy: Policy, cert: x509.Certificate, usage: x509.KeyUsage) -> None:
    if not usage.key_cert_sign:
        raise ValueError(f"CA {describe(cert)} lacks keyUsage keyCertSign")


# Built once: the policies are immutable and do not depend on the peer.
_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_key_cert_sign)
)
# The leaf rules are SPIFFE's, not the web PKI's; validate_leaf applies them.
_EE_POLICY = ExtensionPolicy.permit_all()


def verify_x509_svid(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    bundles: TrustBundleSet,
    now: dt.datetime,
) -> VerifiedSvid:
    """Verify a peer's SVID against its own trust domain's bundle, or raise ChainError."""
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    try:
        spiffe_id = validate_leaf(leaf)
    except SvidError as exc:
        raise ChainError(str(exc), reason=INVALID_SVID) from exc

    # Only the leaf's own trust domain may anchor it (see the module docstring).
    trust_domain = spiffe_id.trust_domain
    bundle = bundles.get(trust_domain)
    if bundle is None:
        raise ChainError(f"no trust bundle for trust domain {trust_domain}", reason=UNTRUSTED_CHAIN)

    for role, cert in [("leaf", leaf)] + [
        (f"intermediate {i} {describe(c)}", c) for i, c in enumerate(intermediates, start=1)
    ]:
        try:
            check_validity(cert, now)
        except SvidError as exc:
            raise ChainError(f"{role}: {exc}", reason=CERTIFICATE_EXPIRED) from exc

    verifier = (
        PolicyBuilder()
        .store(Store(list(bundle.authorities)))
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        chain = verifier.verify(leaf, list(intermediates)).chain
    except (VerificationError, ValueError) as exc:
        # ValueError too: a malformed peer certificate must end in a refusal,
        # never in an unexpected exception (invariant 5).
        raise ChainError(
            f"{spiffe_id} does not chain to the trust bundle of {trust_domain}: {exc}",
            reason=UNTRUSTED_CHAIN,
        ) from exc

    # A bundle that holds the leaf itself would "verify" it with no signer.
    if len(chain) < 2:
        raise ChainError(
            f"{spiffe_id} is itself a trust anchor; an SVID must be signed by a CA",
            reason=UNTRUSTED_CHAIN,
        )
    # The policy above already demands cA and keyCertSign; checking again with
    # the SPIFFE predicate keeps this property independent of library details.
    # A failure here means the path is not trustworthy, not that the leaf is
    # malformed, hence untrusted_chain.
    for cert in chain[1:]:
        try:
            validate_signing_cert(cert)
        except SvidError as exc:
            raise ChainError(str(exc), reason=UNTRUSTED_CHAIN) from exc

    return VerifiedSvid(spiffe_id=spiffe_id, leaf=leaf, chain=tuple(chain))


def accept_verified_path(
    path: Sequence[x509.Certificate],
    bundles: TrustBundleSet,
    now: dt.datetime,
) -> VerifiedSvid | None:
    """The SPIFFE checks left for a path a TLS library has already verified.

    Precondition: ``path`` runs from the leaf to a trust anchor and the TLS
    library (OpenSSL, in the handshake) has checked every signature, validity
    period and CA constraint on it. What remains is what OpenSSL cannot know:
    the X509-SVID rules, and that the anchor belongs to the bundle of the
    leaf's *own* trust domain. When the anchor is not in that bundle this
    returns None and the caller must run :func:`verify_x509_svid`, which
    decides (and rejects a cross-domain forgery). Saves the second full path
    verification on every ordinary handshake.
    """
    if len(path) < 2:
        return None
    leaf = path[0]
    try:
        spiffe_id = validate_leaf(leaf)
    except SvidError as exc:
        raise ChainError(str(exc), reason=INVALID_SVID) from exc
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None or path[-1] not in bundle.authorities:
        return None
    for cert in path:
        try:
            check_validity(cert, now)
        except SvidError as exc:
            raise ChainError(f"{describe(cert)}: {exc}", reason=CERTIFICATE_EXPIRED) from exc
    for cert in path[1:]:
        try:
            validate_signing_cert(cert)
        except SvidError as exc:
            raise ChainError(str(exc), reason=UNTRUSTED_CHAIN) from exc
    return VerifiedSvid(spiffe_id=spiffe_id, leaf=leaf, chain=tuple(path))
