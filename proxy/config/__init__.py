"""The sidecar's TOML configuration: parsed once, validated, frozen.

Theory of operation: :func:`load_config` reads the file and
:func:`parse_config` walks the document section by section
(:mod:`~proxy.config.sections`, :mod:`~proxy.config.listeners`,
:mod:`~proxy.config.rules`) with a :class:`~proxy.config.walker.Table` per
table, producing the frozen objects of :mod:`~proxy.config.schema`. Every
problem is a :class:`ConfigError` with one line ``FILE: KEY.PATH: problem``;
parse errors from the domain types (patterns, addresses, durations, SPIFFE
IDs) are re-raised with the key path. The L4 commands build the same
document from their flags (:mod:`proxy.cli.sidecar`), so one validator
serves both. :mod:`proxy.runtime.plan` turns a Config into what runs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config.listeners import check_unique, inbound_section, outbound_section
from proxy.config.schema import (
    DEFAULT_ADMIN,
    DEV_STATE_DIR,
    DEV_TRUST_DOMAIN,
    HTTP_FAMILY,
    LOG_LEVELS,
    XFCC,
    AdminConfig,
    AuditConfig,
    Config,
    ConfigError,
    HttpLimits,
    IdentityConfig,
    InboundConfig,
    OutboundConfig,
    PoolConfig,
    RouteConfig,
)
from proxy.config.sections import (
    admin_section,
    audit_section,
    default_dev_id,
    guard_section,
    identity_section,
    tracing_section,
)
from proxy.config.walker import Ctx, Table
from proxy.policy.evaluate import PolicySet, policy_version
from proxy.policy.quarantine import GuardConfig

if TYPE_CHECKING:
    from proxy.config.summary import summarize

__all__ = [
    "DEFAULT_ADMIN",
    "DEV_STATE_DIR",
    "DEV_TRUST_DOMAIN",
    "HTTP_FAMILY",
    "XFCC",
    "AdminConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "GuardConfig",
    "HttpLimits",
    "IdentityConfig",
    "InboundConfig",
    "OutboundConfig",
    "PoolConfig",
    "RouteConfig",
    "default_dev_id",
    "load_config",
    "parse_config",
    "summarize",
]


def __getattr__(name: str) -> object:
    # check-config's summary, imported when used: ``run`` never needs it.
    if name == "summarize":
        from proxy.config.summary import summarize

        return summarize
    raise AttributeError(f"module 'proxy.config' has no attribute {name!r}")


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a TOML config file; ConfigError on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{source}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: not UTF-8 ({exc.reason})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_config(data, source, base_dir=Path(path).absolute().parent)


def parse_config(
    data: Mapping[str, Any],
    source: str = "<config>",
    *,
    base_dir: Path | None = None,
    key_names: Mapping[str, str] | None = None,
) -> Config:
    """Validate a parsed TOML document. Relative paths resolve against
    ``base_dir`` (the config file's directory; default: the working directory).
    ``key_names`` renames key paths in error messages (the flag front-end
    maps ``inbound[0].listen`` to ``--listen``)."""
    ctx = Ctx(source, (base_dir or Path.cwd()).absolute(), dict(key_names or {}))
    if not isinstance(data, Mapping):
        ctx.fail("", "expected a table at the top level")
    root = Table(ctx, "", data)
    identity = identity_section(root.table("identity"), ctx, root.string("spiffe_id", default=None))
    admin = admin_section(root.table("admin"))
    audit = audit_section(root.table("audit"))
    tracing = tracing_section(root.table("tracing"))
    inbound = tuple(inbound_section(t) for t in root.tables("inbound"))
    outbound = tuple(outbound_section(t) for t in root.tables("outbound"))
    guard = guard_section(root.table("guard"))
    drain = root.duration("drain_timeout", default=15.0, allow_zero=True)
    level = root.string("log_level", default="info").lower()
    if level not in LOG_LEVELS:
        root.fail("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    root.done()
    if not inbound and not outbound:
        ctx.fail("", "no listeners: add an [[inbound]] or [[outbound]] table")
    check_unique(ctx, admin, inbound, outbound)
    return Config(
        source=source,
        identity=identity,
        admin=admin,
        audit=audit,
        inbound=inbound,
        outbound=outbound,
        drain_timeout=drain,
        log_level=level,
        guard=guard,
        tracing=tracing,
        policy_version=config_policy_version(inbound, outbound),
    )


def config_policy_version(
    inbound: tuple[InboundConfig, ...], outbound: tuple[OutboundConfig, ...]
) -> str:
    """The one policy version: SHA-256 over every listener's and route's
    rules. ``check-config`` prints it, audit records and /metrics carry it."""
    sets: dict[str, PolicySet] = {f"inbound.{c.name}": c.guard for c in inbound}
    for out in outbound:
        for route in out.routes:
            if route.policy is not None:
                sets[f"outbound.{out.name}.{route.name}"] = route.policy
    return policy_version(sets)
