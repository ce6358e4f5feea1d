"""The ``agent-proxy`` command.

Each subcommand lives in its own module, which exposes ``register(sub)`` to
add its parser and sets ``handler`` on it. A handler returns the exit status.
Operator mistakes raise :class:`proxy.errors.UsageError` (or argparse's own
usage error); both end as one line on stderr and exit status 2.

Start-up time matters (Kubernetes restarts the sidecar, ``launch`` waits for
it), so :func:`main` imports only the module of the command it runs: the
table below names each command's module and the one line ``--help`` shows,
and the other commands get a parser with just that line. ``agent-proxy
--help`` imports no command module at all.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from proxy import __version__, logs, notify
from proxy.errors import UsageError

# command: (module that registers it, its line in ``agent-proxy --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "ca": ("proxy.cli.ca", "embedded development CA (init, issue)"),
    "svid": ("proxy.cli.svid", "inspect X509-SVIDs"),
    "inbound": ("proxy.cli.sidecar", "terminate mTLS from peers and relay to a local target"),
    "outbound": (
        "proxy.cli.sidecar",
        "accept plain TCP on loopback and originate mTLS to an upstream",
    ),
    "run": ("proxy.cli.run", "run the listeners a config file describes"),
    "check-config": ("proxy.cli.run", "validate a config file and print a summary"),
    "approve": ("proxy.cli.approve", "mint an approval token for a high-impact action"),
    "launch": ("proxy.cli.launch", "run an agent command beside its sidecar"),
    "audit": ("proxy.cli.audit", "verify and read audit trails"),
}

# Commands that run until stopped: they take --log-format.
LONG_RUNNING = ("run", "inbound", "outbound", "launch")
# Sidecars a supervisor may start: they take --ready-fd.
SIDECARS = ("run", "inbound", "outbound")


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block on errors; we want one line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"agent-proxy: error: {message}\n")
        raise SystemExit(2)


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the top level takes no option values."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = "*") -> argparse.ArgumentParser:
    """The parser; ``only`` names the one command whose module to import
    (None: none of them, "*": all of them)."""
    parser = _Parser(
        prog="agent-proxy",
        description="SPIFFE mTLS sidecar for AI agents",
    )
    parser.add_argument("--version", action="version", version=f"agent-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    wanted = {m for name, (m, _) in COMMANDS.items() if only in ("*", name)}
    for name, (module_name, help_text) in COMMANDS.items():
        if name in sub.choices:
            continue
        if module_name in wanted:
            importlib.import_module(module_name).register(sub)
            wanted.discard(module_name)
        else:
            sub.add_parser(name, help=help_text)
    for name in LONG_RUNNING:
        logs.add_format_flag(sub.choices[name])
    for name in SIDECARS:
        notify.add_flag(sub.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    word = _command_word(args_in)
    if word in COMMANDS:
        logs.import_structlog()  # before the command's modules import it (rich stays out)
    parser = build_parser(word if word in COMMANDS else None)
    args = parser.parse_args(args_in)
    try:
        logs.select_format(getattr(args, "log_format", None))
        notify.select(getattr(args, "ready_fd", None))
        status: int = args.handler(args)
    except UsageError as exc:
        sys.stderr.write(f"agent-proxy: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return status
