"""Operational logs: structlog on stderr (audit records go elsewhere).

Two renderings of the same events: JSON lines, one object per line, for
machines (the default when stderr is not a terminal: a container's log
collector, a pipe, a file), and structlog's ``ConsoleRenderer`` for people
(the default when stderr is a terminal). ``--log-format json|console``, or
``AGENT_PROXY_LOG_FORMAT``, chooses explicitly on every long-running command.

The CLI entry point calls :func:`select_format` once, from the parsed flag,
before the command's handler runs; the handler later calls :func:`configure`
with the level its config names. Both are process-wide because structlog's
configuration is.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from proxy.errors import UsageError

__all__ = [
    "FORMATS",
    "LOG_FORMAT_ENV",
    "add_format_flag",
    "configure",
    "current_format",
    "render_event",
    "select_format",
]

Format = Literal["json", "console"]
FORMATS: tuple[Format, ...] = ("json", "console")
LOG_FORMAT_ENV = "AGENT_PROXY_LOG_FORMAT"

_chosen: Format | None = None  # None: decide by whether stderr is a terminal


def add_format_flag(parser: argparse.ArgumentParser) -> None:
    """``--log-format json|console`` on a long-running command."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help=(
            "operational logs on stderr: JSON lines, or a console rendering for people "
            f"(default: console on a terminal, JSON otherwise; env {LOG_FORMAT_ENV})"
        ),
    )


def select_format(flag: str | None, environ: Mapping[str, str] | None = None) -> None:
    """Record the format the flag or the environment asks for (flag wins)."""
    global _chosen
    env = os.environ if environ is None else environ
    value = flag if flag is not None else (env.get(LOG_FORMAT_ENV) or "").strip().lower()
    if not value:
        _chosen = None
        return
    if value not in FORMATS:
        raise UsageError(f"{LOG_FORMAT_ENV}={value!r}: expected json or console")
    _chosen = "json" if value == "json" else "console"


def current_format() -> Format:
    """The format :func:`configure` renders with now."""
    if _chosen is not None:
        return _chosen
    try:
        return "console" if sys.stderr.isatty() else "json"
    except (AttributeError, ValueError):  # stderr replaced or closed
        return "json"


def _renderer(fmt: Format) -> Any:
    import structlog  # here, not at the top: ``agent-proxy --help`` needs none of it

    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=_colors())
    return structlog.processors.JSONRenderer()


def _colors() -> bool:
    # https://no-color.org: any value turns colour off.
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def configure(level: str = "info") -> None:
    import logging

    import structlog

    fmt = current_format()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        # The console renderer formats exceptions itself (with rich when present).
        processors.append(structlog.processors.format_exc_info)
    processors.append(_renderer(fmt))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is when it writes.

    Binding the stream at configure time (structlog's WriteLoggerFactory)
    keeps writing to a stream someone has since replaced and closed (a
    supervisor redirecting us, an embedding test harness), and every log
    call then raises. A closed or broken stderr must never take a
    connection down either, so such a write is dropped."""

    def msg(self, message: str) -> None:
        try:
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def render_event(event: Mapping[str, Any]) -> str:
    """One event another process logged as JSON, rendered for the console
    (``launch`` shows its sidecar's logs this way on a terminal)."""
    renderer = _renderer("console")
    fields = dict(event)
    method = str(fields.get("level", "info"))
    return str(renderer(None, method, fields))
