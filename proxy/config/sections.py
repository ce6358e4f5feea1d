"""The sections that are not listeners: ``[identity]``, ``[admin]``,
``[audit]`` and ``[guard]``."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from proxy.audit.settings import parse_audit
from proxy.config.schema import (
    DEFAULT_ADMIN,
    DEV_STATE_DIR,
    DEV_TRUST_DOMAIN,
    AdminConfig,
    AuditConfig,
    IdentityConfig,
    IdentitySource,
)
from proxy.config.walker import Ctx, Table
from proxy.identity import SpiffeId, SpiffeIdError, TrustDomain
from proxy.netaddr import AddressError, HostPort
from proxy.policy.quarantine import DenyBurst, GuardConfig, RateSpike
from proxy.tracing.settings import TracingSettings, parse_tracing

# -- identity, admin ----------------------------------------------------------

_IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "files": ("cert", "key", "bundle", "federation"),
    "workload-api": ("endpoint",),
    "dev": ("spiffe_id", "state_dir", "ttl"),
}


def default_dev_id() -> SpiffeId:
    """The ID a dev sidecar issues itself when the config names none."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".") or "localhost"
    return SpiffeId.parse(f"spiffe://{DEV_TRUST_DOMAIN}/sidecar/{host}")


def identity_section(t: Table | None, ctx: Ctx, spiffe_id_text: str | None) -> IdentityConfig:
    if t is None:
        # No identity configured: the embedded dev CA issues us an SVID, for
        # the top-level spiffe_id or a per-host default.
        spiffe_id = _dev_id(ctx, "spiffe_id", spiffe_id_text) if spiffe_id_text else None
        return IdentityConfig(
            "dev",
            spiffe_id=spiffe_id or default_dev_id(),
            state_dir=ctx.base_dir / DEV_STATE_DIR,
        )
    source: IdentitySource = t.choice("source", ("files", "workload-api", "dev"), default="dev")
    elsewhere = {
        key: f'not valid with identity.source = "{source}" (it belongs to source = "{other}")'
        for other, keys in _IDENTITY_KEYS.items()
        if other != source
        for key in keys
    }
    if source == "files":
        cert, key, bundle = t.path_value("cert"), t.path_value("key"), t.path_value("bundle")
        federation: dict[TrustDomain, Path] = {}
        fed = t.table("federation")
        if fed is not None:
            for td_text in fed.data:
                try:
                    td = TrustDomain.parse(td_text)
                except SpiffeIdError as exc:
                    fed.fail(td_text, str(exc))
                if td in federation:
                    fed.fail(td_text, f"trust domain {td} is listed twice")
                federation[td] = fed.path_value(td_text)
        t.done(allowed_elsewhere=elsewhere)
        return IdentityConfig(
            source, cert=cert, key=key, bundle=bundle, federation=MappingProxyType(federation)
        )
    if source == "workload-api":
        endpoint = t.string("endpoint", default=None, nonempty=True)
        if endpoint is not None:
            problem = _endpoint_problem(endpoint)
            if problem:
                t.fail("endpoint", f"invalid Workload API endpoint {endpoint!r}: {problem}")
        t.done(allowed_elsewhere=elsewhere)
        return IdentityConfig(source, endpoint=endpoint)
    id_text = t.string("spiffe_id", default=None)
    if id_text is not None:
        spiffe_id = _dev_id(ctx, t.at("spiffe_id"), id_text)
    elif spiffe_id_text is not None:
        spiffe_id = _dev_id(ctx, "spiffe_id", spiffe_id_text)
    else:
        spiffe_id = default_dev_id()
    state_dir = t.path_value("state_dir", default=ctx.base_dir / DEV_STATE_DIR)
    ttl = t.duration("ttl", default=3600.0)
    t.done(allowed_elsewhere=elsewhere)
    return IdentityConfig(
        source, spiffe_id=spiffe_id, state_dir=state_dir, ttl=timedelta(seconds=ttl)
    )


def _dev_id(ctx: Ctx, key: str, text: str) -> SpiffeId:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        ctx.fail(key, str(exc))
    if not spiffe_id.path:
        ctx.fail(key, f"{text!r} is a trust domain; a workload ID needs a path")
    return spiffe_id


def _endpoint_problem(text: str) -> str | None:
    """SPIFFE Workload Endpoint addresses: ``unix:///abs/path`` or ``tcp://IP:PORT``."""
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        return str(exc)
    if url.query or url.fragment or url.username or url.password:
        return "no user info, query or fragment allowed"
    if url.scheme == "unix":
        if url.netloc:
            return "a unix URI has no authority: use unix:///absolute/path"
        if not url.path.startswith("/"):
            return "the socket path must be absolute: use unix:///absolute/path"
        return None
    if url.scheme == "tcp":
        if url.path not in ("",):
            return "a tcp URI has no path: use tcp://IP:PORT"
        try:
            ipaddress.ip_address(url.hostname or "")
        except ValueError:
            return "the host must be an IP address, not a name: use tcp://IP:PORT"
        if port is None:
            return "a port is required: use tcp://IP:PORT"
        return None
    return "expected unix:///absolute/path or tcp://IP:PORT"


def audit_section(t: Table | None) -> AuditConfig:
    if t is None:
        return AuditConfig()
    settings = parse_audit(t.data, t.path, source=t.ctx.source)
    if settings.path == "-":
        return settings
    return replace(settings, path=str(t.ctx.base_dir / t.expand("path", settings.path)))


def tracing_section(t: Table | None) -> TracingSettings:
    return TracingSettings() if t is None else parse_tracing(t.data, t.path, source=t.ctx.source)


def admin_section(t: Table | None) -> AdminConfig:
    if t is None:
        return AdminConfig()
    enabled = t.boolean("enabled", default=True)
    text = t.string("listen", default=None)
    allow_public = t.boolean("allow_public")
    t.done()
    if not enabled or text == "":
        return AdminConfig(listen=None)
    listen = DEFAULT_ADMIN
    if text is not None:
        try:
            listen = HostPort.parse(text, allow_zero_port=True, allow_any_host=True)
        except AddressError as exc:
            t.fail("listen", str(exc))
    # Invariant 4: the admin endpoint is plaintext and unauthenticated.
    if not listen.is_loopback() and not allow_public:
        t.fail(
            "listen",
            f"{listen} is not a loopback address; the admin endpoint is plaintext and "
            "unauthenticated (set admin.allow_public = true to expose it)",
        )
    return AdminConfig(listen=listen)


# -- guard --------------------------------------------------------------------


def guard_section(t: Table | None) -> GuardConfig:
    """``[guard]``: the anomaly tripwire, the quarantine and table sizes."""
    d = GuardConfig()
    if t is None:
        return d
    deny_burst = rate_spike = None
    bt = t.table("deny_burst")
    if bt is not None:
        deny_burst = DenyBurst(
            count=bt.integer("count", default=DenyBurst().count),
            window=bt.duration("window", default=DenyBurst().window),
        )
        bt.done()
    st = t.table("rate_spike")
    if st is not None:
        r = RateSpike()
        rate_spike = RateSpike(
            factor=st.number("factor", default=r.factor, minimum=1.0),
            min_requests=st.integer("min_requests", default=r.min_requests),
            interval=st.duration("interval", default=r.interval),
            warmup=st.integer("warmup", default=r.warmup),
        )
        st.done()
    guard = GuardConfig(
        quarantine_for=t.duration("quarantine_for", default=d.quarantine_for),
        deny_burst=deny_burst,
        rate_spike=rate_spike,
        new_tool=t.boolean("new_tool"),
        new_path=t.boolean("new_path"),
        learning_period=t.duration("learning_period", default=d.learning_period, allow_zero=True),
        max_identities=t.integer("max_identities", default=d.max_identities, minimum=16),
        rate_table_size=t.integer("rate_table_size", default=d.rate_table_size, minimum=16),
        replay_cache_size=t.integer("replay_cache_size", default=d.replay_cache_size, minimum=16),
    )
    t.done()
    return guard
