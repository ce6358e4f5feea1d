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
