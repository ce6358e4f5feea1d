"""Credentials the sidecar mints per route, so the agent never holds one.

See provider.py for how they are cached and refreshed, fetchers.py for
where each type comes from, headers.py for how one is set on a request.

Seams for the runtime (each a plain call):

- config: :func:`~proxy.credentials.config.parse_upstream_tls`,
  :func:`~proxy.credentials.config.parse_credential` (per route table) and
  :func:`~proxy.credentials.config.parse_inbound_jwt` (per inbound table).
- start-up: :func:`~proxy.credentials.build.dns_side_builder` (a DNS
  route's TLS side per identity snapshot),
  :func:`~proxy.credentials.sources.jwt_svid_source` and
  :func:`~proxy.credentials.build.build_provider` (start ``provider.run``),
  :func:`~proxy.credentials.sources.inbound_jwt_bundles`.
- per request: ``provider.current()`` (or CredentialUnavailable: 503
  ``credential_unavailable``), :func:`with_credential`,
  ``Credential.audit_fields()``; inbound
  :func:`~proxy.identity.jwt_svid.authenticate_bearer`.
- metrics: :class:`~proxy.credentials.metrics.CredentialCollector`.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.credentials.headers import with_credential
    from proxy.credentials.provider import (
        REASON,
        Credential,
        CredentialFetchError,
        CredentialProvider,
        CredentialUnavailable,
    )

__all__ = [
    "REASON",
    "Credential",
    "CredentialFetchError",
    "CredentialProvider",
    "CredentialUnavailable",
    "with_credential",
]

# Imported on first use, not with the package: the config parser imports
# proxy.credentials.config, and a sidecar without credentials should not
# load the provider (trio, structlog, JWT-SVIDs) for it before listening.
_PROVIDER = frozenset(__all__) - {"with_credential"}


def __getattr__(name: str) -> object:
    if name == "with_credential":
        from proxy.credentials import headers

        return headers.with_credential
    if name in _PROVIDER:
        from proxy.credentials import provider

        return getattr(provider, name)
    raise AttributeError(f"module 'proxy.credentials' has no attribute {name!r}")
