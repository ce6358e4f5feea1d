"""``agent-proxy run --config FILE`` and ``agent-proxy check-config FILE``.

``run`` starts every listener the file names in one process, with one
identity source and the admin endpoint, through the one runtime plan
(:mod:`proxy.runtime.plan`). ``check-config`` builds the same plan without
running it (and, for file identities, checks that the SVID and bundles
load) and prints a summary. Problems are one line naming the key, exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

from proxy import logs
from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.config import load_config
from proxy.runtime.plan import build_plan, check_identity, run_plan

_RUN_FLAGS = (EnvFlag("config", "--config", required=True),)


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run the listeners a config file describes",
        description="Run every inbound and outbound listener in FILE.toml.",
    )
    run.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help=env_help("the configuration file", "--config"),
    )
    run.set_defaults(handler=_run)
    check = sub.add_parser(
        "check-config",
        help="validate a config file and print a summary",
        description="Validate FILE.toml and print what it would run.",
    )
    check.add_argument("file", metavar="FILE.toml")
    check.set_defaults(handler=_check)


def _run(args: argparse.Namespace) -> int:
    fill_from_env(args, _RUN_FLAGS)
    config = load_config(args.config)
    logs.configure(config.log_level)
    plan = build_plan(config, reload=partial(load_config, args.config), watch=Path(args.config))
    return run_plan(plan)


def _check(args: argparse.Namespace) -> int:
    from proxy.config import summarize  # here: ``run`` needs no summary

    plan = build_plan(load_config(args.file))
    check_identity(plan.config)
    sys.stdout.write(summarize(plan.config).rstrip("\n") + "\n")
    return 0
