"""From a route's CredentialConfig to its running CredentialProvider."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from proxy.credentials.config import CredentialConfig, UpstreamTlsConfig
from proxy.credentials.devjwt import DevJwtAuthority
from proxy.credentials.fetchers import (
    DevJwtSvidFetcher,
    FileFetcher,
    OAuth2Fetcher,
    WorkloadApiJwtSvidFetcher,
    form_fields,
    svid_key_assertion,
)
from proxy.credentials.provider import Clock, CredentialProvider, Fetcher, utc_now
from proxy.credentials.token_endpoint import parse_token_url
from proxy.errors import UsageError
from proxy.identity import X509Svid
from proxy.tls.dns import (
    SYSTEM_TRUST,
    DnsSide,
    DnsTlsError,
    TrustChoice,
    build_dns_side,
    load_ca_file,
)

__all__ = [
    "CredentialSetupError",
    "JwtSvidSource",
    "build_provider",
    "dns_side_builder",
    "jwt_svid_fetcher",
    "load_trust",
]


class CredentialSetupError(UsageError):
    """A credential cannot be set up with this identity source (exit 2)."""


class JwtSvidSource:
    """Where JWT-SVIDs come from: the Workload API (``target``, as
    parse_endpoint gives it) or the dev CA's JWT authority."""

    def __init__(
        self, *, workload_api: str | None = None, dev: DevJwtAuthority | None = None
    ) -> None:
        if (workload_api is None) == (dev is None):
            raise ValueError("exactly one of workload_api and dev")
        self.workload_api = workload_api
        self.dev = dev


def jwt_svid_fetcher(
    source: JwtSvidSource | None,
    audience: str,
    identity: Callable[[], X509Svid],
    now: Clock,
    route: str,
) -> Fetcher:
    if source is None:
        raise CredentialSetupError(
            f"route {route}: JWT-SVIDs need the workload-api or dev identity source"
        )
    if source.workload_api is not None:
        return WorkloadApiJwtSvidFetcher(source.workload_api, audience, now=now)
    assert source.dev is not None
    return DevJwtSvidFetcher(source.dev.signing, lambda: identity().spiffe_id, audience, now=now)


def load_trust(ca_file: Path | Literal["system"], route: str, key: str) -> TrustChoice:
    """What a DNS route (``ca_file``) or token endpoint (``token_ca_file``)
    trusts, read once when the plan is built; CredentialSetupError (exit 2)
    names the route and key."""
    if isinstance(ca_file, str):
        return SYSTEM_TRUST
    try:
        return load_ca_file(ca_file)
    except DnsTlsError as exc:
        raise CredentialSetupError(f"route {route}: {key}: {exc}") from None


def dns_side_builder(
    route: str, upstream: UpstreamTlsConfig, *, now: Clock = utc_now
) -> Callable[[X509Svid], DnsSide]:
    """For a ``upstream_tls = "dns"`` route: reads the trust now, and returns
    the function that builds the route's client side from each identity
    snapshot's SVID (presented only with ``client_cert = "svid"``)."""
    if upstream.mode != "dns" or upstream.server_name is None:
        raise ValueError(f"route {route} is not a DNS route")
    trust = load_trust(upstream.ca_file, route, "ca_file")
    name = upstream.server_name
    present = upstream.client_cert == "svid"

    def build(svid: X509Svid) -> DnsSide:
        return build_dns_side(name, trust, client_svid=svid if present else None, clock=now)

    return build


def build_provider(
    route: str,
    cfg: CredentialConfig,
    *,
    identity: Callable[[], X509Svid],
    jwt_source: JwtSvidSource | None = None,
    now: Clock = utc_now,
) -> CredentialProvider:
    """``identity`` returns the current SVID (it rotates; we read it per fetch)."""
    fetcher: Fetcher
    if cfg.type == "jwt-svid":
        assert cfg.audience is not None
        fetcher = jwt_svid_fetcher(jwt_source, cfg.audience, identity, now, route)
    elif cfg.type == "file":
        assert cfg.path is not None
        fetcher = FileFetcher(cfg.path, now=now)
    else:
        assert cfg.token_url is not None
        url = parse_token_url(cfg.token_url)
        form = form_fields(cfg.client_id, cfg.scope, cfg.resource)
        trust = load_trust(cfg.token_ca_file, route, "credential.token_ca_file")
        if cfg.type == "oauth2-mtls":
            fetcher = OAuth2Fetcher(
                cfg.type, url, form, trust, client_svid=identity, timeout=cfg.timeout, now=now
            )
        elif cfg.assertion == "svid-key":
            client_id = cfg.client_id

            async def svid_key() -> str:
                svid = identity()
                return svid_key_assertion(
                    svid, client_id or str(svid.spiffe_id), url.url, now=now()
                )

            fetcher = OAuth2Fetcher(
                cfg.type, url, form, trust, assertion=svid_key, timeout=cfg.timeout, now=now
            )
        else:
            inner = jwt_svid_fetcher(jwt_source, cfg.audience or url.url, identity, now, route)

            async def jwt_svid() -> str:
                return (await inner.fetch()).secret

            fetcher = OAuth2Fetcher(
                cfg.type, url, form, trust, assertion=jwt_svid, timeout=cfg.timeout, now=now
            )
    return CredentialProvider(route, fetcher, header=cfg.header, value_format=cfg.format, now=now)
