"""Setting a route's credential on an upstream request (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.credentials.provider import Credential

Header = tuple[bytes, bytes]


def with_credential(headers: Sequence[Header], credential: Credential) -> list[Header]:
    """``headers`` with every copy of the credential's header the agent sent
    removed, and ours set once. Names are compared lowercase, as h11 and
    llhttp hand them to us; ours is appended, so the order of the others
    stays as the agent sent it."""
    name = credential.header
    out = [(n, v) for n, v in headers if n.lower() != name]
    out.append((name, credential.value))
    return out
