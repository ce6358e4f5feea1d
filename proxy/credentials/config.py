"""Config for brownfield routes: upstream TLS kind, credentials, inbound JWT-SVIDs.

Theory of operation: the config walker (proxy/config) hands each function
the raw TOML table and its key path (``outbound[0].routes[1]``); each
function reads only the keys it owns (listed in ``ROUTE_KEYS`` and
``INBOUND_KEYS`` so the walker can mark them read), refuses unknown keys in
the tables it owns outright, and raises :class:`~proxy.config.ConfigError`
with one line ``FILE: KEY.PATH: problem``, the house style. Paths are
resolved against the config file's directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from proxy.config import ConfigError
from proxy.credentials.token_endpoint import parse_token_url
from proxy.identity import SpiffeIdError, TrustDomain
from proxy.tls.dns import SYSTEM_TRUST, DnsTlsError, check_server_name

__all__ = [
    "INBOUND_KEYS",
    "ROUTE_KEYS",
    "CredentialConfig",
    "InboundJwtConfig",
    "UpstreamTlsConfig",
    "default_server_name",
    "parse_credential",
    "parse_inbound_jwt",
    "parse_upstream_tls",
]

CredentialType = Literal["jwt-svid", "oauth2-mtls", "oauth2-jwt-bearer", "file"]
CREDENTIAL_TYPES: tuple[CredentialType, ...] = (
    "jwt-svid",
    "oauth2-mtls",
    "oauth2-jwt-bearer",
    "file",
)
ROUTE_KEYS = ("upstream_tls", "ca_file", "server_name", "client_cert", "credential")
INBOUND_KEYS = ("jwt_svid",)
_DNS_ONLY = ("ca_file", "server_name", "client_cert")

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Fields a credential may not replace: they frame or route the message, or
# carry identity the sidecar sets itself.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
        "x-forwarded-client-cert",
    }
)
_FORMAT_TEXT = re.compile(r"^[\x20-\x7e]*$")
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 3.3 scope-token
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """How the upstream is verified. ``spiffe`` (the default) is the SVID
    check by ``expect``; ``dns`` is a WebPKI name check."""

    mode: Literal["spiffe", "dns"] = "spiffe"
    ca_file: Path | Literal["system"] = SYSTEM_TRUST  # dns
    server_name: str | None = None  # dns: the name to verify and send as SNI
    client_cert: Literal["none", "svid"] = "none"  # dns


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    type: CredentialType
    header: str = "authorization"  # lowercase
    format: str = "Bearer {secret}"
    audience: str | None = None  # jwt-svid; oauth2-jwt-bearer's assertion (default token_url)
    token_url: str | None = None  # oauth2-*
    token_ca_file: Path | Literal["system"] = SYSTEM_TRUST  # oauth2-*
    client_id: str | None = None
    scope: tuple[str, ...] = ()
    resource: str | None = None
    assertion: Literal["jwt-svid", "svid-key"] = "jwt-svid"  # oauth2-jwt-bearer
    path: Path | None = None  # file
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class InboundJwtConfig:
    audience: str
    # JWT bundles by trust domain; empty: the identity source's own.
    bundles: Mapping[TrustDomain, Path]


class _Reader:
    """One table: typed reads with the key path in every error."""

    def __init__(self, data: Mapping[str, Any], path: str, source: str, base_dir: Path) -> None:
        self.data, self.path, self.source, self.base_dir = data, path, source, base_dir
        self.seen: set[str] = set()

    def fail(self, key: str, problem: str) -> NoReturn:
        where = f"{self.path}.{key}" if key else self.path
        raise ConfigError(f"{self.source}: {where}: {problem}")

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key, _MISSING)

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key)
        if value is _MISSING:
            if default is _MISSING:
                self.fail(key, "required")
            return default
        if not isinstance(value, str) or not value:
            self.fail(key, "expected a non-empty string")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.string(key, default)
        if value not in options:
            quoted = ", ".join(f'"{o}"' for o in options)
            self.fail(key, f"expected one of {quoted}, got {value!r}")
        return value

    def trust(self, key: str) -> Path | Literal["system"]:
        text = self.string(key, SYSTEM_TRUST)
        if text == SYSTEM_TRUST:
            return SYSTEM_TRUST
        return self.base_dir / Path(text).expanduser()

    def done(self, allowed_elsewhere: Mapping[str, str]) -> None:
        for key in self.data:
            if key in self.seen:
                continue
            if key in allowed_elsewhere:
                self.fail(key, allowed_elsewhere[key])
            hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{self.source}: unknown key '{self.path}.{key}'{suggestion}")


def _host_only(host: str | None) -> str | None:
    """``bank.example:443`` or ``[::1]:8443`` -> the name part."""
    if host is None:
        return None
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_server_name(target_host: str | None, route_host: str | None) -> str | None:
    """The name a DNS route verifies when ``server_name`` is unset: the
    target's host name (what we connect to, as curl would check), or, when
    the target is an IP address, the route's host (what the agent asked
    for). None when neither names a host."""
    if target_host:
        try:
            ipaddress.ip_address(target_host)
        except ValueError:
            return target_host.lower()
    return _host_only(route_host)


def parse_upstream_tls(
    route: Mapping[str, Any],
    path: str,
    *,
    source: str,
    base_dir: Path,
    target_host: str | None,
    route_host: str | None = None,
) -> UpstreamTlsConfig:
    """``upstream_tls``, ``ca_file``, ``server_name``, ``client_cert`` of one
    ``[[outbound.routes]]`` table. ``target_host`` is the host of its
    ``target``, ``route_host`` its ``host`` (http-proxy listeners); see
    :func:`default_server_name`."""
    r = _Reader(route, path, source, base_dir)
    mode = r.choice("upstream_tls", ("spiffe", "dns"), "spiffe")
    if mode == "spiffe":
        for key in _DNS_ONLY:
            if key in route:
                r.fail(
                    key, 'only for upstream_tls = "dns" (a SPIFFE upstream is checked by expect)'
                )
        return UpstreamTlsConfig()
    if "expect" in route:
        r.fail("expect", 'not for upstream_tls = "dns": the server has a DNS name, not an SVID')
    default = default_server_name(target_host, route_host)
    name = r.string("server_name", _MISSING if default is None else default).lower()
    try:
        check_server_name(name)
    except DnsTlsError as exc:
        r.fail("server_name", str(exc))
    return UpstreamTlsConfig(
        mode="dns",
        ca_file=r.trust("ca_file"),
        server_name=name,
        client_cert=r.choice("client_cert", ("none", "svid"), "none"),
    )


_TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "jwt-svid": ("audience",),
    "oauth2-mtls": ("token_url", "token_ca_file", "client_id", "scope", "resource", "timeout"),
    "oauth2-jwt-bearer": (
        "token_url",
        "token_ca_file",
        "client_id",
        "scope",
        "resource",
        "timeout",
        "assertion",
        "audience",
    ),
    "file": ("path",),
}


def _timeout(r: _Reader) -> float:
    value = r.get("timeout")
    if value is _MISSING:
        return 10.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 300:
        r.fail("timeout", "expected seconds, more than 0 and at most 300")
    return float(value)


def _scope(r: _Reader) -> tuple[str, ...]:
    value = r.get("scope")
    if value is _MISSING:
        return ()
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        r.fail("scope", "expected a string or a list of strings")
    for item in items:
        if not _SCOPE.match(item):
            r.fail("scope", f"invalid scope token {item[:60]!r} (RFC 6749 3.3)")
    return tuple(items)


def parse_credential(
    table: Mapping[str, Any], path: str, *, source: str, base_dir: Path
) -> CredentialConfig:
    """One ``[outbound.routes.credential]`` table (``path`` is its own key path)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {path}: expected a table ([outbound.routes.credential])")
    r = _Reader(table, path, source, base_dir)
    kind: CredentialType = r.choice("type", CREDENTIAL_TYPES)
    header = r.string("header", "authorization").lower()
    if not _TOKEN.match(header) or header in _RESERVED:
        r.fail("header", f"{header[:60]!r} cannot carry a credential")
    fmt = r.string("format", "Bearer {secret}")
    if fmt.count("{secret}") != 1 or not _FORMAT_TEXT.match(fmt):
        r.fail("format", 'must hold "{secret}" once, in printable ASCII (e.g. "Bearer {secret}")')
    out: dict[str, Any] = {"type": kind, "header": header, "format": fmt}
    if kind == "jwt-svid":
        out["audience"] = r.string("audience")
    elif kind == "file":
        out["path"] = base_dir / Path(r.string("path")).expanduser()
    else:
        url = r.string("token_url")
        try:
            parse_token_url(url)
        except ValueError as exc:
            r.fail("token_url", str(exc))
        out.update(
            token_url=url,
            token_ca_file=r.trust("token_ca_file"),
            client_id=r.string("client_id", None),
            scope=_scope(r),
            resource=r.string("resource", None),
            timeout=_timeout(r),
        )
        if kind == "oauth2-jwt-bearer":
            out["assertion"] = r.choice("assertion", ("jwt-svid", "svid-key"), "jwt-svid")
            out["audience"] = r.string("audience", None)
            if out["assertion"] == "svid-key" and "audience" in table:
                r.fail("audience", 'only for assertion = "jwt-svid" (svid-key uses token_url)')
        elif not out["client_id"]:
            r.fail("client_id", "required for oauth2-mtls (RFC 8705 2.1: the IdP needs it)")
    elsewhere = {
        key: f'not for type = "{kind}"'
        for keys in _TYPE_KEYS.values()
        for key in keys
        if key not in _TYPE_KEYS[kind]
    }
    r.done(elsewhere)
    return CredentialConfig(**out)


def parse_inbound_jwt(
    inbound: Mapping[str, Any], path: str, *, source: str, base_dir: Path
) -> InboundJwtConfig | None:
    """``jwt_svid = { audience = "...", bundles = { "a.org" = "path" } }`` of
    one ``[[inbound]]`` table; None when absent."""
    value = inbound.get("jwt_svid", _MISSING)
    if value is _MISSING:
        return None
    where = f"{path}.jwt_svid"
    if not isinstance(value, Mapping):
        raise ConfigError(f'{source}: {where}: expected a table, e.g. {{ audience = "..." }}')
    r = _Reader(value, where, source, base_dir)
    audience = r.string("audience")
    bundles: dict[TrustDomain, Path] = {}
    raw = r.get("bundles")
    if raw is not _MISSING:
        if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
            r.fail("bundles", 'expected a table of trust domain = "path"')
        for name, text in raw.items():
            try:
                td = TrustDomain.parse(name)
            except SpiffeIdError as exc:
                r.fail(f"bundles.{name}", str(exc))
            bundles[td] = base_dir / Path(text).expanduser()
    r.done({})
    return InboundJwtConfig(audience, bundles)
