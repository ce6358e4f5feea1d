"""The identity snapshot: our SVID plus every trust bundle, checked as a whole.

A snapshot is immutable. :func:`build_snapshot` is the one place that
decides whether a set of parts is a usable identity:

* the SVID passed ``load_x509_svid`` (leaf rules, chain order, key matches);
* it is inside its validity period now;
* we have a bundle for our own trust domain, and federated bundles are for
  other trust domains (each at most once);
* our SVID chains to our own bundle, so we never present something our
  peers' copy of the same bundle would refuse.

Its errors are :class:`IdentityLoadError`: one line naming the origin and
the problem, built from our own text and from identity-module errors, which
are key-safe.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from proxy.identity.bundle import BundleError, TrustBundle, TrustBundleSet
from proxy.identity.svid import SvidError, X509Svid, check_validity
from proxy.identity.verify import ChainError, verify_x509_svid

__all__ = [
    "IdentityLoadError",
    "IdentitySnapshot",
    "build_snapshot",
    "describe_snapshot",
    "snapshot_fingerprint",
]


class IdentityLoadError(ValueError):
    """An identity could not be loaded or was refused.

    The message is one line naming the file or field and the problem; it
    never contains key material.
    """


@dataclass(frozen=True)
class IdentitySnapshot:
    svid: X509Svid
    bundles: TrustBundleSet

    @functools.cached_property
    def local_id(self) -> str:
        """Rendered once per snapshot: every audit record carries it."""
        return str(self.svid.spiffe_id)

    def expired(self, now: _dt.datetime) -> bool:
        return now >= self.svid.not_after


def build_snapshot(
    svid: X509Svid,
    own_bundle: TrustBundle,
    federated: Iterable[TrustBundle],
    now: _dt.datetime,
    *,
    origin: str,
) -> IdentitySnapshot:
    """Check a candidate identity as a whole; IdentityLoadError if it is unusable.

    ``origin`` names where the SVID came from (a file, the Workload API) and
    starts every error message.
    """
    try:
        check_validity(svid.leaf, now)
    except SvidError as exc:
        raise IdentityLoadError(f"{origin}: our SVID is not usable now: {exc}") from None
    own_td = svid.spiffe_id.trust_domain
    if own_bundle.trust_domain != own_td:
        raise IdentityLoadError(
            f"{origin}: the bundle is for {own_bundle.trust_domain} but our SVID "
            f"{svid.spiffe_id} is in {own_td}"
        )
    bundles = [own_bundle]
    for bundle in federated:
        if bundle.trust_domain == own_td:
            raise IdentityLoadError(
                f"{origin}: a federated bundle is for our own trust domain {own_td}"
            )
        bundles.append(bundle)
    try:
        bundle_set = TrustBundleSet(bundles)
    except BundleError as exc:
        raise IdentityLoadError(f"{origin}: {exc}") from None
    try:
        verify_x509_svid(svid.leaf, svid.intermediates, bundle_set, now)
    except ChainError as exc:
        raise IdentityLoadError(
            f"{origin}: our SVID does not verify against our own trust bundle: {exc}"
        ) from None
    return IdentitySnapshot(svid=svid, bundles=bundle_set)


def snapshot_fingerprint(snapshot: IdentitySnapshot) -> str:
    """SHA-256 over our certificate chain and every bundle.

    Equal fingerprints mean a reload changed nothing that a handshake would
    use, so there is nothing to swap. The key is not hashed: load_x509_svid
    guarantees it matches the leaf, so the leaf decides it.
    """
    digest = hashlib.sha256()
    for cert in snapshot.svid.chain:
        der = cert.public_bytes(serialization.Encoding.DER)
        digest.update(len(der).to_bytes(4, "big") + der)
    digest.update(snapshot.bundles.fingerprint().encode("ascii"))
    return digest.hexdigest()


def describe_snapshot(snapshot: IdentitySnapshot) -> dict[str, object]:
    """Log fields for an identity (public parts only)."""
    svid = snapshot.svid
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": svid.serial_hex,
        "not_after": utc_timestamp(svid.not_after),
        "trust_domains": sorted(str(td) for td in snapshot.bundles.trust_domains),
    }


def utc_timestamp(moment: _dt.datetime) -> str:
    """``2026-01-01T00:00:00Z``: how logs show a certificate's validity bounds."""
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
