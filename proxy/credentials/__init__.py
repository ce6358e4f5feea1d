"""Credentials the sidecar mints per route, so the agent never holds one.

See provider.py for how they are cached and refreshed, fetchers.py for
where each type comes from, headers.py for how one is set on a request.
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
