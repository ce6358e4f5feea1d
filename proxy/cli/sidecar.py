"""``agent-proxy inbound`` and ``agent-proxy outbound``: the L4 sidecar pair.

Everything the operator gives is validated before a socket is opened: files
are read, our SVID is checked (leaf rules, key match, validity, and that it
chains to our own bundle), patterns are parsed. Any problem is one line and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import resource
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from proxy import logs
from proxy.audit import AuditSink, rfc3339
from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.errors import UsageError, find_exception
from proxy.identity import (
    SpiffeIdError,
    TrustDomain,
)
from proxy.netaddr import AddressError, HostPort
from proxy.policy import PatternError, parse_patterns
from proxy.runtime.identity_state import IdentitySnapshot, IdentityState
from proxy.runtime.l4 import L4Config, L4Listener
from proxy.runtime.serve import run_until_signalled
from proxy.sources.base import IdentityLoadError
from proxy.sources.files import load_snapshot_from_files

log = structlog.get_logger("agent_proxy")

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
    EnvFlag("drain_timeout", "--drain-timeout"),
    EnvFlag("max_connections", "--max-connections"),
    EnvFlag("min_tls", "--min-tls"),
    EnvFlag("audit_log", "--audit-log"),
    EnvFlag("log_level", "--log-level"),
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
        metavar="SECONDS",
        default=None,
        help=env_help("TLS handshake deadline (default 10)", "--handshake-timeout"),
    )
    add(
        "--connect-timeout",
        metavar="SECONDS",
        default=None,
        help=env_help("deadline to connect to --target (default 10)", "--connect-timeout"),
    )
    add(
        "--drain-timeout",
        metavar="SECONDS",
        default=None,
        help=env_help(
            "on SIGTERM/SIGINT, how long open connections may finish (default 15)",
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
        "--log-level",
        metavar="LEVEL",
        default=None,
        help=env_help("operational log level on stderr (default info)", "--log-level"),
    )


# -- validation ------------------------------------------------------------


def _seconds(value: str | None, flag: str, default: float) -> float:
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"{flag}: expected a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise UsageError(f"{flag}: must be a positive number of seconds, got {value!r}")
    return seconds


def _address(value: str, flag: str, *, zero_port: bool = False) -> HostPort:
    try:
        return HostPort.parse(value, allow_zero_port=zero_port)
    except AddressError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def load_identity(
    cert: str,
    key: str,
    bundle: str,
    federate: Sequence[str],
    now: _dt.datetime | None = None,
) -> IdentitySnapshot:
    """Read and check our SVID and every bundle (the files source's loader);
    UsageError on any problem."""
    federation: dict[TrustDomain, Path] = {}
    for item in federate:
        td_text, sep, path = item.partition("=")
        if not sep or not td_text or not path:
            raise UsageError(f"--federate {item!r}: expected TRUST_DOMAIN=FILE")
        try:
            td = TrustDomain.parse(td_text)
        except SpiffeIdError as exc:
            raise UsageError(f"--federate {item!r}: {exc}") from None
        if td in federation:
            raise UsageError(f"--federate {item!r}: {td} is given twice")
        federation[td] = Path(path)
    try:
        return load_snapshot_from_files(
            Path(cert), Path(key), Path(bundle), federation, now or _dt.datetime.now(_dt.UTC)
        )
    except IdentityLoadError as exc:
        raise UsageError(str(exc)) from None


def _config(args: argparse.Namespace, direction: str) -> tuple[L4Config, float]:
    listen = _address(args.listen, "--listen", zero_port=True)
    target = _address(args.target, "--target")
    texts = args.allow if direction == "inbound" else args.expect
    flag = "--allow" if direction == "inbound" else "--expect"
    try:
        patterns = parse_patterns(texts)
    except PatternError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    # Invariant 4: plaintext stays on loopback unless the operator says otherwise.
    if direction == "inbound" and not target.is_loopback() and not args.allow_remote_target:
        raise UsageError(
            f"--target {target}: not a loopback address "
            "(pass --allow-remote-target to relay plaintext off this host)"
        )
    if direction == "outbound" and not listen.is_loopback() and not args.allow_public_listen:
        raise UsageError(
            f"--listen {listen}: the plaintext listener must be loopback "
            "(pass --allow-public-listen to override)"
        )
    min_tls = args.min_tls or "1.3"
    if min_tls not in ("1.2", "1.3"):
        raise UsageError(f"--min-tls: expected 1.2 or 1.3, got {min_tls!r}")
    max_conn_text = args.max_connections or "4096"
    if not max_conn_text.isdigit() or int(max_conn_text) < 1:
        raise UsageError(f"--max-connections: expected a positive integer, got {max_conn_text!r}")
    config = L4Config(
        name=args.name or direction,
        direction="inbound" if direction == "inbound" else "outbound",
        listen=listen,
        target=target,
        patterns=patterns,
        handshake_timeout=_seconds(args.handshake_timeout, "--handshake-timeout", 10.0),
        connect_timeout=_seconds(args.connect_timeout, "--connect-timeout", 10.0),
        max_connections=int(max_conn_text),
        min_tls="1.2" if min_tls == "1.2" else "1.3",
    )
    return config, _seconds(args.drain_timeout, "--drain-timeout", 15.0)


def raise_fd_limit() -> None:
    # Each relayed connection holds two descriptors; the default soft limit
    # (often 1024) would cap us far below --max-connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _run(args: argparse.Namespace, direction: str) -> int:
    fill_from_env(args, _INBOUND if direction == "inbound" else _OUTBOUND)
    level = (args.log_level or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise UsageError(f"--log-level: expected debug, info, warning or error, got {level!r}")
    logs.configure(level)
    config, drain = _config(args, direction)
    snapshot = load_identity(args.cert, args.key, args.bundle, args.federate or [])
    audit = AuditSink.open(args.audit_log or "-")
    audit.signer = lambda: (snapshot.svid.private_key, snapshot.svid.chain)
    raise_fd_limit()
    listener = L4Listener(config, IdentityState(snapshot), audit)
    log.info(
        "identity loaded",
        spiffe_id=snapshot.local_id,
        serial=snapshot.svid.serial_hex,
        not_after=rfc3339(snapshot.svid.not_after),
        trust_domains=sorted(str(td) for td in snapshot.bundles.trust_domains),
    )
    try:
        trio.run(
            partial(
                run_until_signalled,
                [listener],
                drain_timeout=drain,
                background=[audit.flush_forever],
            )
        )
    except BaseException as exc:
        bind_error = find_exception(exc, OSError)
        if bind_error is None:
            raise
        raise UsageError(f"--listen {config.listen}: {bind_error.strerror or bind_error}") from None
    finally:
        audit.close()
    return 0


def _run_inbound(args: argparse.Namespace) -> int:
    return _run(args, "inbound")


def _run_outbound(args: argparse.Namespace) -> int:
    return _run(args, "outbound")
