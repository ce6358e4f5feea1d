"""From a route's CredentialConfig to its running CredentialProvider."""

from __future__ import annotations

from collections.abc import Callable

from proxy.credentials.config import CredentialConfig
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
from proxy.tls.dns import SYSTEM_TRUST, DnsTlsError, TrustChoice, load_ca_file

__all__ = ["CredentialSetupError", "JwtSvidSource", "build_provider", "jwt_svid_fetcher"]


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


def _trust(cfg: CredentialConfig, route: str) -> TrustChoice:
    if isinstance(cfg.token_ca_file, str):
        return SYSTEM_TRUST
    try:
        return load_ca_file(cfg.token_ca_file)
    except DnsTlsError as exc:
        raise CredentialSetupError(f"route {route}: credential.token_ca_file: {exc}") from None


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
        trust = _trust(cfg, route)
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
