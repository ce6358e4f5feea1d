"""SPIFFE identity: IDs, X509-SVIDs, trust bundles, peer verification, and
the identity snapshot that rotation swaps.

Pure code: nothing here does I/O except :meth:`TrustBundle.load`, and the
only dependency is ``cryptography``.
"""

from proxy.identity.bundle import BundleError, TrustBundle, TrustBundleSet
from proxy.identity.snapshot import (
    IdentityLoadError,
    IdentitySnapshot,
    build_snapshot,
    describe_snapshot,
    snapshot_fingerprint,
)
from proxy.identity.spiffe_id import SpiffeId, SpiffeIdError, TrustDomain
from proxy.identity.state import IdentityState, SideCache
from proxy.identity.svid import (
    SvidError,
    SvidPrivateKey,
    X509Svid,
    check_validity,
    load_certificates,
    load_private_key,
    load_x509_svid,
    validate_leaf,
    validate_signing_cert,
)
from proxy.identity.verify import (
    ChainError,
    VerifiedSvid,
    accept_verified_path,
    verify_x509_svid,
)

__all__ = [
    "BundleError",
    "ChainError",
    "IdentityLoadError",
    "IdentitySnapshot",
    "IdentityState",
    "SideCache",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "SvidPrivateKey",
    "TrustBundle",
    "TrustBundleSet",
    "TrustDomain",
    "VerifiedSvid",
    "X509Svid",
    "accept_verified_path",
    "build_snapshot",
    "check_validity",
    "describe_snapshot",
    "load_certificates",
    "load_private_key",
    "load_x509_svid",
    "snapshot_fingerprint",
    "validate_leaf",
    "validate_signing_cert",
    "verify_x509_svid",
]
