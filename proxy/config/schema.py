"""The frozen configuration: what :func:`proxy.config.parse_config` returns.

Every value here is immutable and already validated; the runtime plan
(:mod:`proxy.runtime.plan`) is built from these and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from proxy.audit.settings import AuditSettings
from proxy.errors import UsageError
from proxy.identity import SpiffeId, TrustDomain
from proxy.netaddr import HostPort
from proxy.policy import SpiffePattern
from proxy.policy.evaluate import PolicySet
from proxy.policy.quarantine import GuardConfig
from proxy.policy.rules import GuardRule
from proxy.tracing.settings import TracingSettings

IdentitySource = Literal["files", "workload-api", "dev"]
MinTls = Literal["1.2", "1.3"]
XFCC = "x-forwarded-client-cert"
# Off the ports other sidecars take: Envoy/Istio 15000-15090 and 9901,
# Linkerd 4140-4191, Consul's Envoy 19000 and 21000+, Dapr 3500/50001.
DEFAULT_ADMIN = HostPort("127.0.0.1", 7070)
DEFAULT_EGRESS_PORT = 7071  # the documented egress (http-proxy) port
DEV_STATE_DIR = ".agent-proxy-dev"
DEV_TRUST_DOMAIN = "agent-proxy.local"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
InboundProtocol = Literal["tcp", "http", "mcp", "a2a"]
RouteProtocol = Literal["tcp", "http", "mcp", "a2a"]
HTTP_FAMILY = ("http", "mcp", "a2a")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOSTNAME_RE = re.compile(rf"^{HOST_LABEL}(?:\.{HOST_LABEL})*$")
BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(UsageError):
    """A bad configuration file: one line naming the file, the key and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


# -- the frozen configuration ---------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    source: IdentitySource
    cert: Path | None = None
    key: Path | None = None
    bundle: Path | None = None
    federation: Mapping[TrustDomain, Path] = field(default_factory=lambda: MappingProxyType({}))
    endpoint: str | None = None  # workload-api; None: SPIFFE_ENDPOINT_SOCKET at run time
    spiffe_id: SpiffeId | None = None  # dev
    state_dir: Path | None = None  # dev
    ttl: timedelta = timedelta(hours=1)  # dev


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort | None = DEFAULT_ADMIN  # None: no admin endpoint


AuditConfig = AuditSettings  # [audit]: parsed by proxy.audit.settings


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    idle_timeout: float = 60.0
    request_timeout: float = 30.0
    response_timeout: float = 60.0
    max_connection_lifetime: float | None = None


@dataclass(frozen=True, slots=True)
class InboundConfig:
    name: str
    listen: HostPort
    target: HostPort
    protocol: InboundProtocol
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connections: int = 4096
    min_tls: MinTls = "1.3"
    write_timeout: float = 60.0
    allow_remote_target: bool = False
    identity_headers: tuple[str, ...] = (XFCC,)
    limits: HttpLimits = HttpLimits()
    # Every rule of the listener, for the guard (proxy.policy.evaluate).
    guard: PolicySet = field(default_factory=PolicySet, compare=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # mcp/a2a: JSON-RPC bodies we parse


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    host: str | None  # http-proxy: the (lowercased) host the agent asks for
    target: HostPort
    expect: tuple[SpiffePattern, ...]
    protocol: RouteProtocol = "http"
    guard_rule: GuardRule | None = field(default=None, compare=False)
    policy: PolicySet | None = field(default=None, compare=False)  # (guard_rule,)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_idle_per_route: int = 32
    idle_timeout: float = 30.0
    max_per_route: int = 512


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    name: str
    listen: HostPort
    protocol: Literal["tcp", "http", "http-proxy"]
    routes: tuple[RouteConfig, ...]
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connections: int = 4096
    min_tls: MinTls = "1.3"
    write_timeout: float = 60.0
    allow_public_listen: bool = False
    limits: HttpLimits = HttpLimits()
    pool: PoolConfig = PoolConfig()


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    identity: IdentityConfig
    admin: AdminConfig
    audit: AuditConfig
    inbound: tuple[InboundConfig, ...]
    outbound: tuple[OutboundConfig, ...]
    drain_timeout: float = 15.0
    log_level: str = "info"
    guard: GuardConfig = field(default_factory=GuardConfig)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    # SHA-256 over every listener's and route's policy version.
    policy_version: str = field(default="", compare=False)
