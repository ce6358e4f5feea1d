"""Config for brownfield routes: upstream TLS kind, credentials, inbound JWT-SVIDs.

Theory of operation: each function takes the config walker's
:class:`~proxy.config.walker.Table` of one ``[[outbound.routes]]`` or
``[[inbound]]`` table and reads only the keys it owns (``ROUTE_KEYS``,
``INBOUND_KEYS``), so the caller's ``done()`` still refuses every key
nobody read; the sub-tables it owns (``credential``, ``jwt_svid``) it
checks whole. Every problem is the walker's :class:`ConfigError`, one line
``FILE: KEY.PATH: problem``; paths resolve against the config file's
directory.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from proxy.identity import SpiffeIdError, TrustDomain
from proxy.tls.dns import SYSTEM_TRUST, DnsTlsError, check_server_name

if TYPE_CHECKING:
    # Types only: proxy.config will import this module to parse routes, so a
    # runtime import back would be a cycle.
    from proxy.config.walker import Table

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


def _trust(t: Table, key: str) -> Path | Literal["system"]:
    text = t.string(key, default=SYSTEM_TRUST, nonempty=True)
    if text == SYSTEM_TRUST:
        return SYSTEM_TRUST
    return t.ctx.base_dir / t.expand(key, text)


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
    rt: Table, *, target_host: str | None, route_host: str | None = None
) -> UpstreamTlsConfig:
    """``upstream_tls``, ``ca_file``, ``server_name``, ``client_cert`` of one
    ``[[outbound.routes]]`` table. ``target_host`` is the host of its
    ``target``, ``route_host`` its ``host`` (http-proxy listeners); see
    :func:`default_server_name`."""
    mode = rt.choice("upstream_tls", ("spiffe", "dns"), default="spiffe")
    if mode == "spiffe":
        for key in _DNS_ONLY:
            if rt.has(key):
                rt.fail(
                    key, 'only for upstream_tls = "dns" (a SPIFFE upstream is checked by expect)'
                )
        return UpstreamTlsConfig()
    if rt.has("expect"):
        rt.fail("expect", 'not for upstream_tls = "dns": the server has a DNS name, not an SVID')
    default = default_server_name(target_host, route_host)
    if default is None:
        name: str = rt.string("server_name", nonempty=True).lower()
    else:
        name = rt.string("server_name", default=default, nonempty=True).lower()
    try:
        check_server_name(name)
    except DnsTlsError as exc:
        rt.fail("server_name", str(exc))
    return UpstreamTlsConfig(
        mode="dns",
        ca_file=_trust(rt, "ca_file"),
        server_name=name,
        client_cert=rt.choice("client_cert", ("none", "svid"), default="none"),
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


def _timeout(t: Table) -> float:
    if not t.has("timeout"):
        return 10.0
    value = t.get("timeout")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 300:
        t.fail("timeout", "expected seconds, more than 0 and at most 300")
    return float(value)


def _scope(t: Table) -> tuple[str, ...]:
    if not t.has("scope"):
        return ()
    value = t.get("scope")
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        t.fail("scope", "expected a string or a list of strings")
    for item in items:
        if not _SCOPE.match(item):
            t.fail("scope", f"invalid scope token {item[:60]!r} (RFC 6749 3.3)")
    return tuple(items)


def parse_credential(rt: Table) -> CredentialConfig | None:
    """The ``[outbound.routes.credential]`` table of one route; None if absent."""
    ct = rt.table("credential")
    if ct is None:
        return None
    kind: CredentialType = ct.choice("type", CREDENTIAL_TYPES)
    header = ct.string("header", default="authorization", nonempty=True).lower()
    if not _TOKEN.match(header) or header in _RESERVED:
        ct.fail("header", f"{header[:60]!r} cannot carry a credential")
    fmt = ct.string("format", default="Bearer {secret}")
    if fmt.count("{secret}") != 1 or not _FORMAT_TEXT.match(fmt):
        ct.fail("format", 'must hold "{secret}" once, in printable ASCII (e.g. "Bearer {secret}")')
    out: dict[str, Any] = {"type": kind, "header": header, "format": fmt}
    if kind == "jwt-svid":
        out["audience"] = ct.string("audience", nonempty=True)
    elif kind == "file":
        out["path"] = ct.path_value("path")
    else:
        # Here, not at the top: the token endpoint client (h11, trio, the
        # provider) only for a config with an OAuth credential.
        from proxy.credentials.token_endpoint import parse_token_url

        url = ct.string("token_url", nonempty=True)
        try:
            parse_token_url(url)
        except ValueError as exc:
            ct.fail("token_url", str(exc))
        out.update(
            token_url=url,
            token_ca_file=_trust(ct, "token_ca_file"),
            client_id=ct.string("client_id", default=None, nonempty=True),
            scope=_scope(ct),
            resource=ct.string("resource", default=None, nonempty=True),
            timeout=_timeout(ct),
        )
        if kind == "oauth2-jwt-bearer":
            out["assertion"] = ct.choice("assertion", ("jwt-svid", "svid-key"), default="jwt-svid")
            out["audience"] = ct.string("audience", default=None, nonempty=True)
            if out["assertion"] == "svid-key" and ct.has("audience"):
                ct.fail("audience", 'only for assertion = "jwt-svid" (svid-key uses token_url)')
        elif not out["client_id"]:
            ct.fail("client_id", "required for oauth2-mtls (RFC 8705 2.1: the IdP needs it)")
    elsewhere = {
        key: f'not for type = "{kind}"'
        for keys in _TYPE_KEYS.values()
        for key in keys
        if key not in _TYPE_KEYS[kind]
    }
    ct.done(allowed_elsewhere=elsewhere)
    return CredentialConfig(**out)


def parse_inbound_jwt(t: Table) -> InboundJwtConfig | None:
    """``jwt_svid = { audience = "...", bundles = { "a.org" = "path" } }`` of
    one ``[[inbound]]`` table; None when absent."""
    jt = t.table("jwt_svid")
    if jt is None:
        return None
    audience: str = jt.string("audience", nonempty=True)
    bundles: dict[TrustDomain, Path] = {}
    bt = jt.table("bundles")
    if bt is not None:
        for name in list(bt.data):
            try:
                td = TrustDomain.parse(name)
            except SpiffeIdError as exc:
                bt.fail(name, str(exc))
            bundles[td] = bt.path_value(name)
        bt.done()
    jt.done()
    return InboundJwtConfig(audience, bundles)
