"""``agent-proxy approve``: mint an approval token for a high-impact action.

An approver signs with their own X509-SVID (``--cert``/``--key``); the token
binds the requesting SPIFFE ID, the method, the path (HTTP) or tool (MCP),
the SHA-256 of the body (``--body-file``; none is the empty body) or of the
canonical JSON of the arguments (``--args-json``; none is ``{}``), and an
expiry of at most 5 minutes (``--ttl``). The token, and nothing else, goes to
stdout; the agent sends it in the ``Agent-Approval`` header (or, for MCP,
``params._meta["agent-approval"]``). Bad input: one line on stderr, exit 2.
The key is only used to sign; it is never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.cli.svid import _read_file
from proxy.durations import DurationError, parse_duration
from proxy.errors import UsageError
from proxy.identity import SpiffeId, SpiffeIdError, SvidError, check_validity, load_x509_svid
from proxy.policy.approval import MAX_TTL, ApprovalError, body_sha256, canonical_json, mint_approval
from proxy.policy.paths import BadPath, normalize_path, parse_method

FLAGS = (
    EnvFlag("cert", "--cert", required=True),
    EnvFlag("key", "--key", required=True),
    EnvFlag("requester", "--requester", required=True),
    EnvFlag("method", "--method"),
    EnvFlag("path", "--path"),
    EnvFlag("tool", "--tool"),
    EnvFlag("body_file", "--body-file"),
    EnvFlag("args_json", "--args-json"),
    EnvFlag("ttl", "--ttl"),
)
MCP_TOOLS_CALL = "tools/call"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "approve",
        help="mint an approval token for a high-impact action",
        description=(
            "Sign an approval token with your own SVID for one request: the requester, "
            "the method, the path (HTTP) or tool (MCP) and the body or arguments. "
            "Prints the token on stdout."
        ),
    )
    p.add_argument("--cert", default=None, help=env_help("your SVID (PEM, leaf first)", "--cert"))
    p.add_argument("--key", default=None, help=env_help("your SVID's private key", "--key"))
    p.add_argument(
        "--requester", default=None, help=env_help("the SPIFFE ID that will use it", "--requester")
    )
    p.add_argument(
        "--method",
        default=None,
        help=env_help('the HTTP method (default with --tool: "tools/call")', "--method"),
    )
    p.add_argument("--path", default=None, help=env_help("the HTTP path", "--path"))
    p.add_argument("--tool", default=None, help=env_help("the MCP tool name", "--tool"))
    p.add_argument(
        "--body-file", default=None, help=env_help("the exact HTTP request body", "--body-file")
    )
    p.add_argument(
        "--args-json", default=None, help=env_help("the MCP tool arguments (JSON)", "--args-json")
    )
    p.add_argument(
        "--ttl", default=None, help=env_help("validity, at most 5m (default 5m)", "--ttl")
    )
    p.set_defaults(handler=run_approve)


def _target(args: argparse.Namespace) -> tuple[str, str]:
    if (args.path is None) == (args.tool is None):
        raise UsageError("give exactly one of --path (HTTP) or --tool (MCP)")
    if args.tool is not None:
        if not args.tool.strip():
            raise UsageError("--tool must not be empty")
        if args.body_file is not None:
            raise UsageError("--body-file is for --path; an MCP tool call takes --args-json")
        method = args.method or MCP_TOOLS_CALL
        return method, args.tool
    if args.args_json is not None:
        raise UsageError("--args-json is for --tool; an HTTP request takes --body-file")
    if args.method is None:
        raise UsageError("missing --method (or set AGENT_PROXY_METHOD)")
    try:
        method = parse_method(args.method)
    except ValueError as exc:
        raise UsageError(f"--method: {exc}") from None
    if method == "*" or method != method.upper():
        raise UsageError(f"--method {args.method!r}: give one HTTP method, in upper case")
    try:
        path = normalize_path(args.path)
    except BadPath as exc:
        raise UsageError(f"--path {args.path!r}: {exc}") from None
    if path != args.path.split("?", 1)[0]:
        sys.stderr.write(f"agent-proxy: note: the path is bound as {path}\n")
    return method, path


def _body_hash(args: argparse.Namespace) -> str:
    if args.args_json is not None:
        try:
            value = json.loads(args.args_json)
        except ValueError as exc:
            raise UsageError(f"--args-json: not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError("--args-json: the arguments must be a JSON object")
        return body_sha256(canonical_json(value))
    if args.tool is not None:
        return body_sha256(canonical_json({}))
    if args.body_file is not None:
        return body_sha256(_read_file(args.body_file, "--body-file"))
    return body_sha256(b"")


def run_approve(args: argparse.Namespace) -> int:
    fill_from_env(args, FLAGS)
    try:
        requester = SpiffeId.parse(args.requester)
    except SpiffeIdError as exc:
        raise UsageError(f"--requester: {exc}") from None
    if not requester.path:
        raise UsageError("--requester: a workload ID needs a path")
    method, target = _target(args)
    ttl = float(MAX_TTL)
    if args.ttl is not None:
        try:
            ttl = parse_duration(args.ttl).total_seconds()
        except DurationError as exc:
            raise UsageError(f"--ttl: {exc}") from None
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"--ttl {args.ttl!r}: must be more than 0 and at most 5m")
    digest = _body_hash(args)
    cert_data = _read_file(args.cert, "--cert")
    key_data = _read_file(args.key, "--key")
    try:
        svid = load_x509_svid(cert_data, key_data)
    except (SvidError, ValueError) as exc:
        raise UsageError(f"--cert/--key: {exc}") from None
    now = datetime.now(UTC)
    try:
        for cert in svid.chain:
            check_validity(cert, now)
    except SvidError as exc:
        raise UsageError(f"--cert: {exc}") from None
    try:
        token = mint_approval(svid, requester, method, target, digest, now=now, ttl=ttl)
    except ApprovalError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(token + "\n")
    return 0
