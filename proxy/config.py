"""The sidecar's TOML configuration: parsed once, validated, frozen.

Theory of operation: :func:`parse_config` walks the TOML document with a
:class:`_Table` per table. Each ``_Table`` knows its key path
(``inbound[0].rules[1]``), hands out typed values, and at the end refuses any
key nobody asked for, so a typo is an error instead of a silently ignored
setting. Every problem is a :class:`ConfigError` with one line
``FILE: KEY.PATH: problem``. Parse errors from the domain types
(:class:`~proxy.policy.PatternError`, :class:`~proxy.http.policy.PathPatternError`,
:class:`~proxy.netaddr.AddressError`, :class:`~proxy.durations.DurationError`,
:class:`~proxy.identity.SpiffeIdError`) are re-raised with the key path.

Security choices enforced here (invariant 4): plaintext listeners (the
outbound listeners and the admin endpoint) bind loopback, and inbound
targets are loopback, unless the configuration says otherwise in so many
words (``allow_public_listen``, ``allow_public``, ``allow_remote_target``).
Least privilege: HTTP rules and routes must name their methods and paths;
there is no implicit "everything".
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from proxy.agent.a2a import normalize_method as normalize_a2a_method
from proxy.durations import DurationError, format_duration, parse_duration
from proxy.errors import UsageError
from proxy.guard.conditions import SCHEMA, ConditionError, compile_condition
from proxy.guard.policy import GuardRule, HighImpact, PolicySet, policy_version
from proxy.guard.quarantine import DenyBurst, GuardConfig, RateSpike
from proxy.guard.ratelimit import Rate, RateError
from proxy.http.policy import HttpRule, PathPattern, PathPatternError, parse_method
from proxy.identity import SpiffeId, SpiffeIdError, TrustDomain
from proxy.netaddr import AddressError, HostPort
from proxy.policy import PatternError, SpiffePattern

__all__ = [
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
    "load_config",
    "parse_config",
    "summarize",
]

T = TypeVar("T")
IdentitySource = Literal["files", "workload-api", "dev"]
MinTls = Literal["1.2", "1.3"]
XFCC = "x-forwarded-client-cert"
DEFAULT_ADMIN = HostPort("127.0.0.1", 15000)
DEV_STATE_DIR = ".agent-proxy-dev"
DEV_TRUST_DOMAIN = "agent-proxy.local"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
InboundProtocol = Literal["tcp", "http", "mcp", "a2a"]
RouteProtocol = Literal["tcp", "http", "mcp", "a2a"]
HTTP_FAMILY = ("http", "mcp", "a2a")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


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


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = "-"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    idle_timeout: float = 60.0
    request_timeout: float = 30.0
    response_timeout: float = 60.0
    max_connection_lifetime: float | None = None
    write_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class InboundConfig:
    name: str
    listen: HostPort
    target: HostPort
    protocol: InboundProtocol
    # The relay's view before the guard: only plain enforced allow rules (no
    # condition, scope, rate, step-up, deny or dry-run), on "http" listeners.
    rules: tuple[HttpRule, ...]
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connections: int = 4096
    min_tls: MinTls = "1.3"
    allow_remote_target: bool = False
    identity_headers: tuple[str, ...] = (XFCC,)
    limits: HttpLimits = HttpLimits()
    # Every rule of the listener, for the guard (proxy.guard.policy).
    guard: PolicySet = field(default_factory=PolicySet, compare=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # mcp/a2a: JSON-RPC bodies we parse


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    host: str | None  # http-proxy: the (lowercased) host the agent asks for
    target: HostPort
    expect: tuple[SpiffePattern, ...]
    # http/http-proxy: what the agent may do, when it is a plain enforced allow
    # rule; tcp, and routes only the guard can judge: None.
    rule: HttpRule | None
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
    # SHA-256 over every listener's and route's policy version.
    policy_version: str = field(default="", compare=False)


# -- entry points -----------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a TOML config file; ConfigError on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: {exc.strerror or exc}") from None
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
    data: Mapping[str, Any], source: str = "<config>", *, base_dir: Path | None = None
) -> Config:
    """Validate a parsed TOML document. Relative paths resolve against
    ``base_dir`` (the config file's directory; default: the working directory)."""
    ctx = _Ctx(source, (base_dir or Path.cwd()).absolute())
    if not isinstance(data, Mapping):
        ctx.fail("", "expected a table at the top level")
    root = _Table(ctx, "", data)
    identity = _identity(root.table("identity"), ctx, root.string("spiffe_id", default=None))
    admin = _admin(root.table("admin"))
    audit_table = root.table("audit")
    audit = AuditConfig()
    if audit_table is not None:
        audit_path = audit_table.string("path", default="-", nonempty=True)
        if audit_path != "-":
            audit_path = str(ctx.base_dir / Path(audit_path).expanduser())
        audit = AuditConfig(audit_path)
        audit_table.done()
    inbound = tuple(_inbound(t) for t in root.tables("inbound"))
    outbound = tuple(_outbound(t) for t in root.tables("outbound"))
    guard = _guard(root.table("guard"))
    drain = root.duration("drain_timeout", default=15.0, allow_zero=True)
    level = root.string("log_level", default="info").lower()
    if level not in LOG_LEVELS:
        root.fail("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    root.done()
    if not inbound and not outbound:
        ctx.fail("", "no listeners: add an [[inbound]] or [[outbound]] table")
    _check_unique(ctx, admin, inbound, outbound)
    sets: dict[str, PolicySet] = {f"inbound.{c.name}": c.guard for c in inbound}
    for out in outbound:
        for route in out.routes:
            if route.policy is not None:
                sets[f"outbound.{out.name}.{route.name}"] = route.policy
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
        policy_version=policy_version(sets),
    )


# -- the walker ---------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    source: str
    base_dir: Path

    def fail(self, path: str, problem: str) -> NoReturn:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{self.source}: {where}{problem}")


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _key_part(key: str) -> str:
    return key if _BARE_KEY.match(key) else '"' + key.replace('"', '\\"') + '"'


def _generic(path: str) -> str:
    """``inbound[0].rules`` as TOML spells the table header: ``inbound.rules``."""
    return re.sub(r"\[\d+\]", "", path)


_MISSING: Any = object()


class _Table:
    """One TOML table, its key path, and which of its keys were read."""

    def __init__(self, ctx: _Ctx, path: str, data: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.path = path
        self.data = data
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        part = _key_part(key)
        return f"{self.path}.{part}" if self.path else part

    def fail(self, key: str, problem: str) -> NoReturn:
        self.ctx.fail(self.at(key), problem)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key, _MISSING)

    def done(self, *, allowed_elsewhere: Mapping[str, str] | None = None) -> None:
        """Refuse keys nobody read. ``allowed_elsewhere`` maps keys that are
        valid in other settings to why they are not valid here."""
        for key in self.data:
            if key in self.seen:
                continue
            if allowed_elsewhere and key in allowed_elsewhere:
                self.fail(key, allowed_elsewhere[key])
            hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.ctx.fail("", f"unknown key {self.at(key)!r}{suggestion}")

    def _typed(self, key: str, value: Any, check: Callable[[Any], bool], what: str) -> Any:
        if not check(value):
            self.fail(key, f"expected {what}, got {_type_name(value)}")
        return value

    def string(self, key: str, *, default: Any = _MISSING, nonempty: bool = False) -> Any:
        value = self.get(key)
        if value is _MISSING:
            if default is _MISSING:
                self.fail(key, "required")
            return default
        self._typed(key, value, lambda v: isinstance(v, str), "a string")
        if nonempty and not value:
            self.fail(key, "must not be empty")
        return value

    def boolean(self, key: str, *, default: bool = False) -> bool:
        value = self.get(key)
        if value is _MISSING:
            return default
        return bool(self._typed(key, value, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, key: str, *, default: int, minimum: int = 1) -> int:
        value = self.get(key)
        if value is _MISSING:
            return default
        self._typed(
            key, value, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )
        if value < minimum:
            self.fail(key, f"must be at least {minimum}, got {value}")
        return int(value)

    def duration(self, key: str, *, default: T, allow_zero: bool = False) -> float | T:
        """A number of seconds or a duration string such as ``"30s"``."""
        value = self.get(key)
        if value is _MISSING:
            return default
        if isinstance(value, str):
            try:
                seconds = parse_duration(value).total_seconds()
            except DurationError as exc:
                self.fail(key, str(exc))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                self.fail(key, f"expected a non-negative number of seconds, got {value}")
        else:
            self.fail(key, f'expected seconds or a duration such as "30s", got {_type_name(value)}')
        if seconds == 0 and not allow_zero:
            self.fail(key, "must be greater than zero")
        return seconds

    def strings(self, key: str, *, required: bool = True, nonempty: bool = True) -> list[str]:
        value = self.get(key)
        if value is _MISSING:
            if required:
                self.fail(key, "required")
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, "expected a list of strings")
        if nonempty and not value:
            self.fail(key, "must not be empty")
        return list(value)

    def parsed_list(
        self, key: str, parse: Callable[[str], T], errors: tuple[type[Exception], ...]
    ) -> tuple[T, ...]:
        out: list[T] = []
        for i, text in enumerate(self.strings(key)):
            try:
                out.append(parse(text))
            except errors as exc:
                self.ctx.fail(f"{self.at(key)}[{i}]", str(exc))
        return tuple(out)

    def address(self, key: str, *, zero_port: bool, default: Any = _MISSING) -> Any:
        text = self.string(key, default=default)
        if text is default and default is not _MISSING:
            return default
        try:
            return HostPort.parse(text, allow_zero_port=zero_port)
        except AddressError as exc:
            self.fail(key, str(exc))

    def path_value(self, key: str, *, default: Any = _MISSING) -> Any:
        text = self.string(key, default=default, nonempty=True)
        if text is default and default is not _MISSING:
            return default
        return self.ctx.base_dir / Path(text).expanduser()

    def table(self, key: str) -> _Table | None:
        value = self.get(key)
        if value is _MISSING:
            return None
        if not isinstance(value, Mapping):
            self.fail(
                key, f"expected a table ([{_generic(self.at(key))}]), got {_type_name(value)}"
            )
        return _Table(self.ctx, self.at(key), value)

    def tables(self, key: str) -> list[_Table]:
        value = self.get(key)
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.fail(key, f"expected an array of tables ([[{_generic(self.at(key))}]])")
        return [_Table(self.ctx, f"{self.at(key)}[{i}]", v) for i, v in enumerate(value)]

    def choice(
        self, key: str, options: Sequence[str], *, default: Any = _MISSING, more: str = ""
    ) -> Any:
        value = self.string(key, default=default)
        if value not in options:
            quoted = ", ".join(f'"{o}"' for o in options)
            self.fail(key, f"expected one of {quoted}, got {value!r}{more}")
        return value

    def number(self, key: str, *, default: float, minimum: float) -> float:
        value = self.get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value) or value < minimum:
            self.fail(key, f"must be at least {minimum:g}, got {value}")
        return float(value)

    def name(self, key: str = "name", *, default: Any = _MISSING) -> Any:
        value = self.string(key, default=default)
        if value is default:
            return value
        if not _NAME.match(value):
            self.fail(
                key,
                f"invalid name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        return value


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


def _identity(t: _Table | None, ctx: _Ctx, spiffe_id_text: str | None) -> IdentityConfig:
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


def _dev_id(ctx: _Ctx, key: str, text: str) -> SpiffeId:
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


def _admin(t: _Table | None) -> AdminConfig:
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
            listen = HostPort.parse(text, allow_zero_port=True)
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


def _guard(t: _Table | None) -> GuardConfig:
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


# -- listeners ----------------------------------------------------------------

_LIMIT_KEYS = (
    "max_header_bytes",
    "max_headers",
    "idle_timeout",
    "request_timeout",
    "response_timeout",
    "write_timeout",
)


def _limits(t: _Table) -> HttpLimits:
    d = HttpLimits()
    return HttpLimits(
        max_header_bytes=t.integer("max_header_bytes", default=d.max_header_bytes, minimum=1024),
        max_headers=t.integer("max_headers", default=d.max_headers),
        idle_timeout=t.duration("idle_timeout", default=d.idle_timeout),
        request_timeout=t.duration("request_timeout", default=d.request_timeout),
        response_timeout=t.duration("response_timeout", default=d.response_timeout),
        write_timeout=t.duration("write_timeout", default=d.write_timeout),
        max_connection_lifetime=_lifetime(t),
    )


def _lifetime(t: _Table) -> float | None:
    # Continuous authentication applies to every protocol, TCP included.
    return t.duration("max_connection_lifetime", default=None)


def _common(t: _Table) -> dict[str, Any]:
    min_tls = t.get("min_tls")
    if min_tls is _MISSING:
        min_tls = "1.3"
    elif isinstance(min_tls, float) and min_tls in (1.2, 1.3):
        min_tls = str(min_tls)  # min_tls = 1.3 (unquoted) means what it says
    if min_tls not in ("1.2", "1.3"):
        t.fail("min_tls", f'expected "1.2" or "1.3", got {min_tls!r}')
    return {
        "handshake_timeout": t.duration("handshake_timeout", default=10.0),
        "connect_timeout": t.duration("connect_timeout", default=10.0),
        "max_connections": t.integer("max_connections", default=4096),
        "min_tls": min_tls,
    }


def _http_only(protocol: str, keys: Sequence[str]) -> dict[str, str]:
    return {k: f'only valid for HTTP listeners, not protocol = "{protocol}"' for k in keys}


def _methods(t: _Table) -> frozenset[str]:
    methods = t.parsed_list("methods", parse_method, (PathPatternError,))
    for i, method in enumerate(methods):
        if method != method.upper():
            t.ctx.fail(
                f"{t.at('methods')}[{i}]",
                f"HTTP methods are case-sensitive: write {method.upper()!r}, not {method!r}",
            )
    return frozenset(methods)


def _paths(t: _Table) -> tuple[PathPattern, ...]:
    return t.parsed_list("paths", PathPattern.parse, (PathPatternError,))


def _patterns(t: _Table, key: str) -> tuple[SpiffePattern, ...]:
    return t.parsed_list(key, SpiffePattern.parse, (PatternError,))


_GUARD_KEYS = (
    "when",
    "action",
    "mode",
    "rate",
    "high_impact",
    "tools",
    "resources",
    "prompts",
    "log_args",
    "push_url_allowlist",
    "max_body_bytes",
)
_MCP_ONLY = ("tools", "resources", "prompts", "log_args")
_A2A_ONLY = ("push_url_allowlist", "a2a_methods")


def _only_for(protocol: str, keys: Sequence[str], needed: str) -> dict[str, str]:
    return {k: f'only valid for protocol = "{needed}", not protocol = "{protocol}"' for k in keys}


def _globs(t: _Table, key: str) -> tuple[str, ...]:
    values = t.strings(key, required=False)
    for i, value in enumerate(values):
        if not value.strip() or any(c in value for c in "\r\n\x00"):
            t.ctx.fail(f"{t.at(key)}[{i}]", f"invalid name or pattern {value!r}")
    return tuple(values)


def _rate(t: _Table) -> Rate | None:
    text = t.string("rate", default=None)
    if text is None:
        return None
    try:
        return Rate.parse(text)
    except RateError as exc:
        t.fail("rate", str(exc))


def _high_impact(t: _Table) -> HighImpact | None:
    ht = t.table("high_impact")
    if ht is None:
        return None
    age = ht.duration("max_svid_age", default=None)
    approvers: tuple[SpiffePattern, ...] = ()
    if ht.has("approvers"):
        approvers = _patterns(ht, "approvers")
    ht.done()
    if age is None and not approvers:
        t.fail(
            "high_impact",
            "needs max_svid_age (a fresh SVID), approvers (an approval token), or both",
        )
    return HighImpact(max_svid_age=age, approvers=approvers)


def _push_urls(t: _Table) -> tuple[str, ...]:
    values = t.strings("push_url_allowlist", required=False, nonempty=False)
    for i, value in enumerate(values):
        url = urlsplit(value.replace("*", "x"))
        if url.scheme not in ("https", "http") or not url.netloc:
            t.ctx.fail(
                f"{t.at('push_url_allowlist')}[{i}]",
                f"invalid URL pattern {value!r}: expected https://host/path ('*' allowed)",
            )
    return tuple(values)


def _guard_rule(
    rt: _Table,
    name: str,
    protocol: str,
    peers: tuple[SpiffePattern, ...],
    roots: frozenset[str],
) -> GuardRule:
    """The guard keys of an [[inbound.rules]] or [[outbound.routes]] table."""
    if protocol == "http":
        methods, paths = _methods(rt), _paths(rt)
    else:  # mcp, a2a: one endpoint; any method and path unless narrowed
        methods = _methods(rt) if rt.has("methods") else frozenset({"*"})
        paths = _paths(rt) if rt.has("paths") else ()
    action = rt.choice("action", ("allow", "deny"), default="allow")
    mode = rt.choice("mode", ("enforce", "dry-run"), default="enforce")
    when = None
    text = rt.string("when", default=None)
    if protocol == "a2a" and rt.has("a2a_methods"):
        # Method allowlists name v0.3 or v1.0 methods; both normalise to the
        # v1.0 name the relay puts in mcp.method, so one list covers both.
        names = []
        for i, name in enumerate(rt.strings("a2a_methods")):
            normal = normalize_a2a_method(name)
            if normal is None:
                rt.ctx.fail(f"{rt.at('a2a_methods')}[{i}]", f"unknown A2A method {name!r}")
            names.append(normal[0])
        listed = "mcp.method in [" + ", ".join(repr(n) for n in sorted(set(names))) + "]"
        text = listed if text is None else f"({text}) && {listed}"
    if text is not None:
        try:
            when = compile_condition(text, roots)
        except ConditionError as exc:
            rt.fail("when", str(exc))
    rate, high_impact = _rate(rt), _high_impact(rt)
    for key, value in (("rate", rate), ("high_impact", high_impact)):
        if value is not None and (action != "allow" or mode != "enforce"):
            rt.fail(key, 'only enforced allow rules take it (action = "allow", mode = "enforce")')
    empty: tuple[str, ...] = ()
    tools = resources = prompts = log_args = push = empty
    if protocol == "mcp":
        tools, resources = _globs(rt, "tools"), _globs(rt, "resources")
        prompts = _globs(rt, "prompts")
        log_args = tuple(rt.strings("log_args", required=False, nonempty=False))
    if protocol == "a2a":
        push = _push_urls(rt)
    return GuardRule(
        name=name,
        peers=peers,
        methods=methods,
        paths=paths,
        tools=tools,
        resources=resources,
        prompts=prompts,
        when=when,
        action=action,
        mode=mode,
        rate=rate,
        high_impact=high_impact,
        allow_upgrade=rt.boolean("allow_upgrade"),
        log_args=log_args,
        push_url_allowlist=push,
    )


def _guard_elsewhere(protocol: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if protocol != "mcp":
        out.update(_only_for(protocol, _MCP_ONLY, "mcp"))
    if protocol != "a2a":
        out.update(_only_for(protocol, _A2A_ONLY, "a2a"))
    return out


def _plain(rule: GuardRule) -> HttpRule | None:
    """The relay's pre-guard view of a rule, when it has one (see InboundConfig.rules)."""
    if (
        rule.action != "allow"
        or rule.mode != "enforce"
        or rule.when is not None
        or rule.scoped
        or rule.rate is not None
        or rule.high_impact is not None
        or not rule.paths
    ):
        return None
    return HttpRule(rule.name, rule.peers, rule.methods, rule.paths, rule.allow_upgrade)


def _max_body(t: _Table) -> int:
    return t.integer("max_body_bytes", default=DEFAULT_MAX_BODY_BYTES, minimum=1024)


def _inbound(t: _Table) -> InboundConfig:
    name = t.name()
    listen = t.address("listen", zero_port=True)
    target = t.address("target", zero_port=False)
    protocol: InboundProtocol = t.get("protocol")
    if protocol not in ("mcp", "a2a"):
        protocol = t.choice(
            "protocol", ("tcp", "http"), more=' (or an agent protocol over HTTP: "mcp", "a2a")'
        )
    allow_remote = t.boolean("allow_remote_target")
    # Invariant 4: what we relay to the target is plaintext.
    if not target.is_loopback() and not allow_remote:
        t.fail(
            "target",
            f"{target} is not a loopback address; traffic to the target is plaintext "
            "(set allow_remote_target = true to relay off this host)",
        )
    common = _common(t)
    http_family = protocol in HTTP_FAMILY
    # A2A decisions read the JSON-RPC method as mcp.method (v1.0 names).
    roots = frozenset(r for r in SCHEMA if r != "mcp" or protocol in ("mcp", "a2a"))
    rules: list[HttpRule] = []
    guard_rules: list[GuardRule] = []
    for i, rt in enumerate(t.tables("rules")):
        rule_name = rt.name(default=f"{name}.rules[{i}]")
        peers = _patterns(rt, "peers")
        if any(r.name == rule_name for r in guard_rules):
            rt.fail("name", f"rule name {rule_name!r} is used twice in this listener")
        if http_family:
            guard_rule = _guard_rule(rt, rule_name, protocol, peers, roots)
            guard_rules.append(guard_rule)
            plain = _plain(guard_rule) if protocol == "http" else None
            if plain is not None:
                rules.append(plain)
            elsewhere = _guard_elsewhere(protocol)
        else:
            rule = HttpRule(rule_name, peers, frozenset({"*"}), (PathPattern.parse("/**"),))
            rules.append(rule)
            guard_rules.append(GuardRule(rule_name, peers))
            elsewhere = _http_only(protocol, ("methods", "paths", "allow_upgrade", *_GUARD_KEYS))
        rt.done(allowed_elsewhere=elsewhere)
    if not guard_rules:
        t.fail("rules", "at least one [[inbound.rules]] table is required (no rule, no traffic)")
    limits = HttpLimits(max_connection_lifetime=_lifetime(t))
    headers_t: tuple[str, ...] = (XFCC,)
    max_body = DEFAULT_MAX_BODY_BYTES
    if http_family:
        limits = _limits(t)
        extra = t.strings("identity_headers", required=False, nonempty=False)
        for i, header in enumerate(extra):
            if not _TOKEN.match(header):
                t.ctx.fail(f"{t.at('identity_headers')}[{i}]", f"invalid header name {header!r}")
        headers_t = tuple(dict.fromkeys([XFCC, *(h.lower() for h in extra)]))
        max_body = _max_body(t)
    t.done(
        allowed_elsewhere=_http_only(protocol, (*_LIMIT_KEYS, "identity_headers", "max_body_bytes"))
    )
    return InboundConfig(
        name=name,
        listen=listen,
        target=target,
        protocol=protocol,
        rules=tuple(rules),
        allow_remote_target=allow_remote,
        identity_headers=headers_t,
        limits=limits,
        guard=PolicySet(guard_rules),
        max_body_bytes=max_body,
        **common,
    )


def _route_host(t: _Table) -> str:
    text: str = t.string("host", nonempty=True)
    host = text.lower()
    port = ""
    if host.startswith("["):
        end = host.find("]")
        inner, rest = host[1:end], host[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            t.fail("host", f"invalid host {text!r}: expected [IPv6] or [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            t.fail("host", f"invalid host {text!r}: {inner!r} is not an IPv6 address")
        port = rest[1:] if rest else ""
        name_ok = True
    else:
        name, sep, port = host.partition(":")
        if sep and not port:
            t.fail("host", f"invalid host {text!r}: empty port")
        name_ok = bool(_HOSTNAME.match(name)) and len(name) <= 253
    if not name_ok:
        t.fail("host", f"invalid host {text!r}: expected a host name or IP, optionally :PORT")
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        t.fail("host", f"invalid host {text!r}: port must be 1-65535")
    return host


def _outbound(t: _Table) -> OutboundConfig:
    name = t.name()
    listen = t.address("listen", zero_port=True)
    protocol: Literal["tcp", "http", "http-proxy"] = t.choice(
        "protocol", ("tcp", "http", "http-proxy")
    )
    allow_public = t.boolean("allow_public_listen")
    # Invariant 4: the agent talks plaintext to this listener.
    if not listen.is_loopback() and not allow_public:
        t.fail(
            "listen",
            f"{listen} is not a loopback address; this listener is plaintext "
            "(set allow_public_listen = true to expose it)",
        )
    common = _common(t)
    routes: list[RouteConfig] = []
    hosts: set[str] = set()
    for i, rt in enumerate(t.tables("routes")):
        route_name = rt.name(default=f"{name}.routes[{i}]")
        host: str | None = None
        if protocol == "http-proxy":
            host = _route_host(rt)
            if host in hosts:
                rt.fail("host", f"host {host!r} has two routes in this listener")
            hosts.add(host)
        target = rt.address("target", zero_port=False)
        expect = _patterns(rt, "expect")
        if any(r.name == route_name for r in routes):
            rt.fail("name", f"route name {route_name!r} is used twice in this listener")
        if protocol != "tcp":
            route_protocol: RouteProtocol = rt.choice("protocol", HTTP_FAMILY, default="http")
            # The agent is the only client of an outbound listener: no peer selectors,
            # and no "peer" in conditions (the upstream is checked by expect).
            roots = frozenset(
                r for r in SCHEMA if r != "peer" and (r != "mcp" or route_protocol == "mcp")
            )
            guard_rule = _guard_rule(rt, route_name, route_protocol, (), roots)
            rule = _plain(guard_rule) if route_protocol == "http" else None
            routes.append(
                RouteConfig(
                    route_name,
                    host,
                    target,
                    expect,
                    rule,
                    protocol=route_protocol,
                    guard_rule=guard_rule,
                    policy=PolicySet((guard_rule,)),
                    max_body_bytes=_max_body(rt),
                )
            )
            elsewhere = _guard_elsewhere(route_protocol)
        else:
            routes.append(RouteConfig(route_name, host, target, expect, None, protocol="tcp"))
            elsewhere = _http_only(
                protocol, ("methods", "paths", "allow_upgrade", "protocol", *_GUARD_KEYS)
            )
        if protocol != "http-proxy":
            elsewhere["host"] = (
                f'only for protocol = "http-proxy"; a "{protocol}" listener has one fixed target'
            )
        rt.done(allowed_elsewhere=elsewhere)
    if not routes:
        t.fail(
            "routes",
            "at least one [[outbound.routes]] table is required (egress is deny by default)",
        )
    if protocol != "http-proxy" and len(routes) > 1:
        t.fail(
            "routes",
            f'protocol = "{protocol}" takes exactly one route, got {len(routes)} '
            '(use protocol = "http-proxy" to route by host)',
        )
    limits, pool = HttpLimits(max_connection_lifetime=_lifetime(t)), PoolConfig()
    if protocol != "tcp":
        limits = _limits(t)
        pt = t.table("pool")
        if pt is not None:
            d = PoolConfig()
            pool = PoolConfig(
                max_idle_per_route=pt.integer(
                    "max_idle_per_route", default=d.max_idle_per_route, minimum=0
                ),
                idle_timeout=pt.duration("idle_timeout", default=d.idle_timeout),
                max_per_route=pt.integer("max_per_route", default=d.max_per_route),
            )
            pt.done()
    t.done(allowed_elsewhere=_http_only(protocol, (*_LIMIT_KEYS, "pool")))
    return OutboundConfig(
        name=name,
        listen=listen,
        protocol=protocol,
        routes=tuple(routes),
        allow_public_listen=allow_public,
        limits=limits,
        pool=pool,
        **common,
    )


def _check_unique(
    ctx: _Ctx,
    admin: AdminConfig,
    inbound: Sequence[InboundConfig],
    outbound: Sequence[OutboundConfig],
) -> None:
    names: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    if admin.listen is not None and admin.listen.port:
        addresses[(admin.listen.host.lower(), admin.listen.port)] = "admin.listen"
    listeners: list[tuple[str, InboundConfig | OutboundConfig]] = [
        *((f"inbound[{i}]", c) for i, c in enumerate(inbound)),
        *((f"outbound[{i}]", c) for i, c in enumerate(outbound)),
    ]
    for where, cfg in listeners:
        if cfg.name in names:
            ctx.fail(
                f"{where}.name", f"listener name {cfg.name!r} is also used by {names[cfg.name]}"
            )
        names[cfg.name] = where
        key = (cfg.listen.host.lower(), cfg.listen.port)
        if cfg.listen.port and key in addresses:
            ctx.fail(f"{where}.listen", f"{cfg.listen} is also used by {addresses[key]}")
        addresses[key] = f"{where}.listen"


# -- summary ------------------------------------------------------------------


def _seconds(value: float) -> str:
    return format_duration(timedelta(seconds=value))


def _rule_lines(rule: HttpRule | GuardRule, protocol: str, head: str) -> list[str]:
    parts = [head]
    if isinstance(rule, GuardRule) and (rule.action != "allow" or rule.mode != "enforce"):
        parts.append(rule.action + (" (dry-run)" if rule.mode == "dry-run" else ""))
    if rule.peers:
        parts.append("peers " + ", ".join(p.text for p in rule.peers))
    if protocol != "tcp":
        parts.append("methods " + ",".join(sorted(rule.methods)))
        parts.append("paths " + (", ".join(p.text for p in rule.paths) or "any"))
        if rule.allow_upgrade:
            parts.append("upgrade allowed")
    if isinstance(rule, GuardRule):
        for key, values in (
            ("tools", rule.tools),
            ("resources", rule.resources),
            ("prompts", rule.prompts),
            ("logs args", rule.log_args),
            ("push URLs", rule.push_url_allowlist),
        ):
            if values:
                parts.append(f"{key} " + ", ".join(values))
        if rule.when is not None:
            parts.append(f"when {rule.when.text}")
        if rule.rate is not None:
            parts.append(f"rate {rule.rate}")
        hi = rule.high_impact
        if hi is not None:
            need = []
            if hi.max_svid_age is not None:
                need.append(f"SVID younger than {_seconds(hi.max_svid_age)}")
            if hi.approvers:
                need.append("approval by " + ", ".join(p.text for p in hi.approvers))
            parts.append("high impact: " + " and ".join(need))
    return [parts[0] + " " + "; ".join(parts[1:])]


def _guard_summary(guard: GuardConfig) -> str:
    trips = []
    if guard.deny_burst is not None:
        b = guard.deny_burst
        trips.append(f"{b.count} denials in {_seconds(b.window)}")
    if guard.rate_spike is not None:
        r = guard.rate_spike
        trips.append(
            f"rate over {r.factor:g}x baseline (min {r.min_requests} per {_seconds(r.interval)})"
        )
    if guard.new_tool:
        trips.append("new tool")
    if guard.new_path:
        trips.append("new path")
    if not trips:
        return "guard: no tripwire"
    return (
        f"guard: quarantine {_seconds(guard.quarantine_for)} on "
        + ", ".join(trips)
        + f" (learning period {_seconds(guard.learning_period)})"
    )


def summarize(config: Config) -> str:
    """A human-readable account of a config, for ``agent-proxy check-config``."""
    ident = config.identity
    lines = [f"config {config.source}: OK", f"identity: source {ident.source}"]
    if ident.source == "files":
        lines += [f"  cert {ident.cert}", f"  key {ident.key}", f"  bundle {ident.bundle}"]
        lines += [
            f"  federation {td} {path}"
            for td, path in sorted(ident.federation.items(), key=lambda kv: kv[0].name)
        ]
    elif ident.source == "workload-api":
        lines.append(f"  endpoint {ident.endpoint or '$SPIFFE_ENDPOINT_SOCKET'}")
    else:
        lines += [
            f"  spiffe_id {ident.spiffe_id}",
            f"  state_dir {ident.state_dir}",
            f"  ttl {format_duration(ident.ttl)}",
        ]
    admin = config.admin.listen
    lines.append(f"admin: {'http://' + str(admin) if admin else 'disabled'}")
    lines.append(f"audit: {'stdout' if config.audit.path == '-' else config.audit.path}")
    lines.append(f"log level: {config.log_level}; drain timeout {_seconds(config.drain_timeout)}")
    lines.append(_guard_summary(config.guard))
    lines.append(f"policy version: {config.policy_version}")
    for inb in config.inbound:
        lines.append(
            f"inbound {inb.name} ({inb.protocol}): {inb.listen} -> {inb.target}"
            f" [min TLS {inb.min_tls}, max {inb.max_connections} connections]"
        )
        if inb.protocol in HTTP_FAMILY and inb.identity_headers != (XFCC,):
            lines.append(f"  strips identity headers {', '.join(inb.identity_headers)}")
        if inb.protocol in ("mcp", "a2a"):
            lines.append(f"  max body {inb.max_body_bytes} bytes")
        count = len(inb.guard)
        lines.append(f"  {count} rule{'s' if count != 1 else ''}:")
        for grule in inb.guard.rules:
            lines += _rule_lines(grule, inb.protocol, f"    - {grule.name}:")
    for out in config.outbound:
        lines.append(
            f"outbound {out.name} ({out.protocol}): {out.listen}"
            f" [min TLS {out.min_tls}, max {out.max_connections} connections]"
        )
        lines.append(f"  {len(out.routes)} route{'s' if len(out.routes) != 1 else ''}:")
        for route in out.routes:
            head = f"{route.host} -> " if route.host else "-> "
            lines.append(
                f"    - {route.name}: {head}{route.target} expecting "
                + ", ".join(p.text for p in route.expect)
            )
            if route.guard_rule is not None:
                verb = "      allows" if route.protocol == "http" else f"      {route.protocol}:"
                lines += _rule_lines(route.guard_rule, out.protocol, verb)
    return "\n".join(lines)
