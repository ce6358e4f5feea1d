"""``agent-proxy inbound`` and ``agent-proxy outbound``: the L4 sidecar pair.

A flag front-end and nothing more: the flags become the same document a
config file holds (one ``protocol = "tcp"`` listener, a ``files`` identity),
validated by the same parser and run by the same plan as ``agent-proxy
run``. So the L4 commands rotate (the files source polls cert, key and
bundles), reload identity on SIGHUP, warn when 20% of the SVID's lifetime
is left, fail closed at expiry, and serve ``/healthz``, ``/readyz`` and
``/metrics`` with ``--admin HOST:PORT`` (ghostunnel's ``--status``).
Errors name the flag (``--listen``), not the key it became; any problem
is one line and exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from proxy import logs
from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.config import Config, parse_config
from proxy.errors import UsageError
from proxy.runtime.plan import build_plan, run_plan

_COMMON = (
    EnvFlag("name", "--name"),
    EnvFlag("listen", "--listen", required=True),
    EnvFlag("target", "--target", required=True),
    EnvFlag("cert", "--cert", required=True),
    EnvFlag("key", "--key", required=True),
    EnvFlag("bundle", "--bundle", required=True),
    EnvFlag("federate", "--federate", multi=True),
    EnvFlag("handshake_timeout", "--handshake-timeout"),
    EnvFlag("connect_timeout", "--connect-timeout"),
    EnvFlag("write_timeout", "--write-timeout"),
    EnvFlag("max_connection_lifetime", "--max-connection-lifetime"),
    EnvFlag("drain_timeout", "--drain-timeout"),
    EnvFlag("max_connections", "--max-connections"),
    EnvFlag("min_tls", "--min-tls"),
    EnvFlag("audit_log", "--audit-log"),
    EnvFlag("log_level", "--log-level"),
    EnvFlag("admin", "--admin"),
)
_INBOUND = (
    *_COMMON,
    EnvFlag("allow", "--allow", multi=True, required=True),
    EnvFlag("allow_remote_target", "--allow-remote-target", boolean=True),
)
_OUTBOUND = (
    *_COMMON,
    EnvFlag("expect", "--expect", multi=True, required=True),
    EnvFlag("allow_public_listen", "--allow-public-listen", boolean=True),
)


def register(sub: Any) -> None:
    inbound = sub.add_parser(
        "inbound",
        help="terminate mTLS from peers and relay to a local target",
        description="Terminate mutual TLS, admit only allowed SPIFFE IDs, relay to --target.",
    )
    _common_flags(inbound)
    inbound.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="PATTERN",
        help=env_help("peer SPIFFE ID pattern to admit (repeatable)", "--allow"),
    )
    inbound.add_argument(
        "--allow-remote-target",
        action="store_true",
        default=None,
        help=env_help("let --target be a non-loopback address", "--allow-remote-target"),
    )
    inbound.set_defaults(handler=_run_inbound)

    outbound = sub.add_parser(
        "outbound",
        help="accept plain TCP on loopback and originate mTLS to an upstream",
        description="Accept plain TCP on loopback, open mutual TLS to --target, and refuse "
        "any upstream whose SPIFFE ID does not match --expect.",
    )
    _common_flags(outbound)
    outbound.add_argument(
        "--expect",
        action="append",
        default=None,
        metavar="PATTERN",
        help=env_help("expected upstream SPIFFE ID pattern (repeatable)", "--expect"),
    )
    outbound.add_argument(
        "--allow-public-listen",
        action="store_true",
        default=None,
        help=env_help(
            "let the plaintext --listen be a non-loopback address", "--allow-public-listen"
        ),
    )
    outbound.set_defaults(handler=_run_outbound)


def _common_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--name", default=None, help=env_help("listener name in logs and audit records", "--name"))
    add(
        "--listen",
        metavar="HOST:PORT",
        default=None,
        help=env_help("address to listen on", "--listen"),
    )
    add(
        "--target",
        metavar="HOST:PORT",
        default=None,
        help=env_help("where to relay to", "--target"),
    )
    add(
        "--cert",
        metavar="FILE",
        default=None,
        help=env_help("our X509-SVID, PEM, leaf first then intermediates", "--cert"),
    )
    add("--key", metavar="FILE", default=None, help=env_help("our SVID's private key", "--key"))
    add(
        "--bundle",
        metavar="FILE",
        default=None,
        help=env_help("trust bundle of our own trust domain (PEM, DER or SPIFFE JWKS)", "--bundle"),
    )
    add(
        "--federate",
        metavar="TD=FILE",
        action="append",
        default=None,
        help=env_help("another trust domain's bundle (repeatable)", "--federate"),
    )
    add(
        "--handshake-timeout",
        metavar="DURATION",
        default=None,
        help=env_help("TLS handshake deadline (default 10s)", "--handshake-timeout"),
    )
    add(
        "--connect-timeout",
        metavar="DURATION",
        default=None,
        help=env_help("deadline to connect to --target (default 10s)", "--connect-timeout"),
    )
    add(
        "--write-timeout",
        metavar="DURATION",
        default=None,
        help=env_help(
            "cut a connection whose receiver reads nothing this long (default 60s)",
            "--write-timeout",
        ),
    )
    add(
        "--max-connection-lifetime",
        metavar="DURATION",
        default=None,
        help=env_help(
            "close connections older than this (default: no limit)", "--max-connection-lifetime"
        ),
    )
    add(
        "--drain-timeout",
        metavar="DURATION",
        default=None,
        help=env_help(
            "on SIGTERM/SIGINT, how long open connections may finish (default 15s)",
            "--drain-timeout",
        ),
    )
    add(
        "--max-connections",
        metavar="N",
        default=None,
        help=env_help("cap on concurrent connections (default 4096)", "--max-connections"),
    )
    add(
        "--min-tls",
        metavar="1.2|1.3",
        default=None,
        help=env_help("minimum TLS version (default 1.3)", "--min-tls"),
    )
    add(
        "--audit-log",
        metavar="PATH|-",
        default=None,
        help=env_help(
            "audit records as JSON lines: a file, or - for stdout (default)", "--audit-log"
        ),
    )
    add(
        "--admin",
        metavar="HOST:PORT",
        default=None,
        help=env_help(
            "serve /healthz, /readyz and /metrics here (loopback; default: off)", "--admin"
        ),
    )
    add(
        "--log-level",
        metavar="LEVEL",
        default=None,
        help=env_help("operational log level on stderr (default info)", "--log-level"),
    )


# -- flags -> the config document ----------------------------------------------


def _federation(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        td, sep, path = item.partition("=")
        if not sep or not td or not path:
            raise UsageError(f"--federate {item!r}: expected TRUST_DOMAIN=FILE")
        if td in out:
            raise UsageError(f"--federate {item!r}: {td} is given twice")
        out[td] = path
    return out


def _integer(value: str, flag: str) -> int:
    if not value.strip().isdigit():
        raise UsageError(f"{flag}: expected a positive integer, got {value!r}")
    return int(value)


def flags_document(
    args: argparse.Namespace, direction: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config document the flags describe, and the flag for each key path."""
    where = f"{direction}[0]"
    listener: dict[str, Any] = {
        "name": args.name or direction,
        "listen": args.listen,
        "protocol": "tcp",
    }
    names = {
        f"{where}.name": "--name",
        f"{where}.listen": "--listen",
        "identity.cert": "--cert",
        "identity.key": "--key",
        "identity.bundle": "--bundle",
        "identity.federation": "--federate",
        "admin.listen": "--admin",
        "audit.path": "--audit-log",
        "drain_timeout": "--drain-timeout",
        "log_level": "--log-level",
    }
    for dest, flag in (
        ("handshake_timeout", "--handshake-timeout"),
        ("connect_timeout", "--connect-timeout"),
        ("write_timeout", "--write-timeout"),
        ("max_connection_lifetime", "--max-connection-lifetime"),
        ("min_tls", "--min-tls"),
    ):
        names[f"{where}.{dest}"] = flag
        if getattr(args, dest) is not None:
            listener[dest] = getattr(args, dest)
    if args.max_connections is not None:
        listener["max_connections"] = _integer(args.max_connections, "--max-connections")
    if direction == "inbound":
        listener["target"] = args.target
        listener["allow_remote_target"] = bool(args.allow_remote_target)
        listener["rules"] = [{"name": "allow", "peers": list(args.allow)}]
        names[f"{where}.target"] = "--target"
        names[f"{where}.rules[0].peers"] = "--allow"
        names["allow_remote_target"] = "--allow-remote-target"
    else:
        listener["allow_public_listen"] = bool(args.allow_public_listen)
        listener["routes"] = [{"name": "upstream", "target": args.target, "expect": args.expect}]
        names[f"{where}.routes[0].target"] = "--target"
        names[f"{where}.routes[0].expect"] = "--expect"
        names["allow_public_listen"] = "--allow-public-listen"
    identity: dict[str, Any] = {
        "source": "files",
        "cert": args.cert,
        "key": args.key,
        "bundle": args.bundle,
    }
    if args.federate:
        identity["federation"] = _federation(args.federate)
    doc: dict[str, Any] = {
        "identity": identity,
        "admin": {"listen": args.admin} if args.admin else {"enabled": False},
        "audit": {"path": args.audit_log or "-"},
        "log_level": args.log_level or "info",
        direction: [listener],
    }
    if args.drain_timeout is not None:
        doc["drain_timeout"] = args.drain_timeout
    return doc, names


def flags_config(args: argparse.Namespace, direction: str) -> Config:
    """The one-listener Config the flags describe (relative paths: the
    working directory); UsageError naming the flag on any problem."""
    doc, names = flags_document(args, direction)
    return parse_config(doc, "", key_names=names)


def _run(args: argparse.Namespace, direction: str) -> int:
    fill_from_env(args, _INBOUND if direction == "inbound" else _OUTBOUND)
    config = flags_config(args, direction)
    logs.configure(config.log_level)
    name = config.inbound[0].name if config.inbound else config.outbound[0].name
    plan = build_plan(config, origins={name: "--listen", "admin": "--admin"})
    return run_plan(plan)


def _run_inbound(args: argparse.Namespace) -> int:
    return _run(args, "inbound")


def _run_outbound(args: argparse.Namespace) -> int:
    return _run(args, "outbound")
