"""``agent-proxy ca``: the embedded development CA.

``ca init`` creates a root for one trust domain in a directory; ``ca issue``
mints an X509-SVID from it and writes ``svid.pem``, ``svid_key.pem`` and
``bundle.pem`` (the layout spiffe-helper uses) into an output directory.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.devca import DEFAULT_CA_TTL, DEFAULT_SVID_TTL, DevCA, write_svid_files
from proxy.durations import DurationError, format_duration, parse_duration
from proxy.errors import UsageError
from proxy.identity import SpiffeId, TrustDomain

INIT_FLAGS = (
    EnvFlag("trust_domain", "--trust-domain", required=True),
    EnvFlag("dir", "--dir", required=True),
    EnvFlag("ttl", "--ttl"),
    EnvFlag("force", "--force", boolean=True),
)

ISSUE_FLAGS = (
    EnvFlag("dir", "--dir", required=True),
    EnvFlag("spiffe_id", "--spiffe-id", required=True),
    EnvFlag("ttl", "--ttl"),
    EnvFlag("out", "--out", required=True),
)


def register(sub: Any) -> None:
    ca = sub.add_parser(
        "ca",
        help="embedded development CA (init, issue)",
        description="An embedded development CA. For production, use SPIRE.",
    )
    actions = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    actions.required = True

    init = actions.add_parser(
        "init",
        help="create a dev CA for a trust domain",
        description="Create a self-signed ECDSA P-256 root for one trust domain.",
    )
    init.add_argument(
        "--trust-domain",
        metavar="TD",
        default=None,
        help=env_help("trust domain, e.g. payroll.example", "--trust-domain"),
    )
    init.add_argument(
        "--dir",
        metavar="DIR",
        default=None,
        help=env_help("directory for ca.pem and ca_key.pem (created 0700)", "--dir"),
    )
    init.add_argument(
        "--ttl",
        metavar="DURATION",
        default=None,
        help=env_help(f"CA lifetime (default {format_duration(DEFAULT_CA_TTL)})", "--ttl"),
    )
    init.add_argument(
        "--force",
        action="store_true",
        default=None,
        help=env_help("replace an existing CA", "--force"),
    )
    init.set_defaults(handler=run_init)

    issue = actions.add_parser(
        "issue",
        help="issue an X509-SVID from the dev CA",
        description="Issue an X509-SVID and write svid.pem, svid_key.pem and bundle.pem.",
    )
    issue.add_argument(
        "--dir", metavar="DIR", default=None, help=env_help("dev CA directory", "--dir")
    )
    issue.add_argument(
        "--spiffe-id",
        metavar="ID",
        default=None,
        help=env_help("SPIFFE ID, e.g. spiffe://payroll.example/agent/payroll", "--spiffe-id"),
    )
    issue.add_argument(
        "--ttl",
        metavar="DURATION",
        default=None,
        help=env_help(f"SVID lifetime (default {format_duration(DEFAULT_SVID_TTL)})", "--ttl"),
    )
    issue.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help=env_help("output directory (created 0700)", "--out"),
    )
    issue.set_defaults(handler=run_issue)


def _ttl(text: str | None, default: timedelta) -> timedelta:
    if text is None:
        return default
    try:
        ttl = parse_duration(text)
    except DurationError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if ttl <= timedelta(0):
        raise UsageError(f"--ttl {text!r}: must be positive")
    return ttl


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_init(args: argparse.Namespace) -> int:
    fill_from_env(args, INIT_FLAGS)
    try:
        td = TrustDomain.parse(args.trust_domain)
    except ValueError as exc:
        raise UsageError(f"--trust-domain: {exc}") from None
    ttl = _ttl(args.ttl, DEFAULT_CA_TTL)
    ca = DevCA.init(Path(args.dir), td, ttl=ttl, force=bool(args.force))
    out = sys.stdout
    out.write(f"dev CA for spiffe://{td.name}\n")
    out.write(f"  not_after   {_rfc3339(ca.not_after)}\n")
    out.write(f"  cert        {ca.cert_path}\n")
    out.write(f"  key         {ca.key_path} (0600)\n")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    fill_from_env(args, ISSUE_FLAGS)
    try:
        spiffe_id = SpiffeId.parse(args.spiffe_id)
    except ValueError as exc:
        raise UsageError(f"--spiffe-id: {exc}") from None
    ttl = _ttl(args.ttl, DEFAULT_SVID_TTL)
    ca = DevCA.load(Path(args.dir))
    issued = ca.issue(spiffe_id, ttl=ttl)
    paths = write_svid_files(Path(args.out), issued)
    out = sys.stdout
    out.write(f"issued {issued.spiffe_id}\n")
    out.write(f"  serial      {issued.serial_hex}\n")
    out.write(f"  not_after   {_rfc3339(issued.not_after)}\n")
    out.write(f"  cert        {paths['svid']}\n")
    out.write(f"  key         {paths['svid_key']} (0600)\n")
    out.write(f"  bundle      {paths['bundle']}\n")
    return 0
