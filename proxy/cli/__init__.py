"""The ``agent-proxy`` command.

Each subcommand lives in its own module, which exposes ``register(sub)`` to
add its parser and sets ``handler`` on it. A handler returns the exit status.
Operator mistakes raise :class:`proxy.errors.UsageError` (or argparse's own
usage error); both end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block on errors; we want one line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"agent-proxy: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from proxy.cli import approve, audit, ca, launch, run, sidecar, svid

    parser = _Parser(
        prog="agent-proxy",
        description="SPIFFE mTLS sidecar for AI agents",
    )
    parser.add_argument("--version", action="version", version=f"agent-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    ca.register(sub)
    svid.register(sub)
    sidecar.register(sub)
    run.register(sub)
    approve.register(sub)
    launch.register(sub)
    audit.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except UsageError as exc:
        sys.stderr.write(f"agent-proxy: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return status
