"""Which JWT-SVID issuer and which JWT bundles an identity source gives.

The egress mints JWT-SVIDs with the Workload API (``FetchJWTSVID``) or, with
the dev source, the dev CA's JWT key; inbound ``jwt_svid`` validates against
the configured bundle files, else the Workload API's ``FetchJWTBundles``,
else the dev CA's published bundle. The files source issues no JWT-SVIDs.
Called once the identity source has started (the dev CA exists by then);
errors are :class:`CredentialSetupError`: one line, exit 2.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.credentials.build import CredentialSetupError, JwtSvidSource
from proxy.credentials.config import InboundJwtConfig
from proxy.credentials.devjwt import DevJwtAuthority, DevJwtError
from proxy.credentials.jwt_bundles import JwtBundleWatcher, load_jwt_bundles
from proxy.devca import CA_CERT_FILE, DevCA, DevCAError
from proxy.identity import BundleError, SpiffeId
from proxy.identity.jwt_svid import JwtBundleSet


class IdentityConfig(Protocol):
    """What this module reads of the sidecar's identity settings (config's
    IdentityConfig has these): credentials depend on values, not on config."""

    @property
    def source(self) -> str: ...

    @property
    def endpoint(self) -> str | None: ...

    @property
    def state_dir(self) -> Path | None: ...

    @property
    def spiffe_id(self) -> SpiffeId | None: ...


__all__ = ["InboundJwtBundles", "inbound_jwt_bundles", "jwt_svid_source"]

_ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


def _workload_api_target(identity: IdentityConfig) -> str:
    from proxy.sources import IdentityLoadError
    from proxy.sources.workload_api import parse_endpoint

    text = identity.endpoint or os.environ.get(_ENDPOINT_ENV, "")
    try:
        return parse_endpoint(text)
    except IdentityLoadError as exc:
        raise CredentialSetupError(f"JWT-SVIDs: {exc}") from None


def _dev_authority(identity: IdentityConfig) -> DevJwtAuthority:
    assert identity.state_dir is not None and identity.spiffe_id is not None
    td = identity.spiffe_id.trust_domain
    ca_dir = identity.state_dir / "dev-ca" / td.name
    try:
        ca = DevCA.load(ca_dir) if (ca_dir / CA_CERT_FILE).exists() else None
        return DevJwtAuthority.load_or_create(ca_dir, td, ca.certificate if ca else None)
    except (DevCAError, DevJwtError) as exc:
        raise CredentialSetupError(f"dev JWT-SVID issuer: {exc}") from None


def jwt_svid_source(identity: IdentityConfig) -> JwtSvidSource | None:
    """Where this identity source's JWT-SVIDs come from; None for files."""
    if identity.source == "workload-api":
        return JwtSvidSource(workload_api=_workload_api_target(identity))
    if identity.source == "dev":
        return JwtSvidSource(dev=_dev_authority(identity))
    return None


@dataclass(frozen=True)
class InboundJwtBundles:
    """The bundles an inbound listener validates with, read per request, and
    the background task (if any) that keeps them current."""

    current: Callable[[], JwtBundleSet]
    run: Callable[[], Awaitable[None]] | None = None


def inbound_jwt_bundles(cfg: InboundJwtConfig, identity: IdentityConfig) -> InboundJwtBundles:
    if cfg.bundles:
        try:
            loaded = load_jwt_bundles(cfg.bundles)
        except BundleError as exc:
            raise CredentialSetupError(f"jwt_svid.bundles: {exc}") from None
        return InboundJwtBundles(lambda: loaded)
    if identity.source == "workload-api":
        watcher = JwtBundleWatcher(_workload_api_target(identity))
        return InboundJwtBundles(lambda: watcher.current, watcher.run)
    if identity.source == "dev":
        own = JwtBundleSet([_dev_authority(identity).bundle])
        return InboundJwtBundles(lambda: own)
    raise CredentialSetupError(
        'jwt_svid: the files source has no JWT bundles; set bundles = { "<trust domain>" = "FILE" }'
    )
