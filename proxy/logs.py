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
from types import ModuleType
from typing import Any, Literal

from proxy.errors import UsageError

__all__ = [
    "FORMATS",
    "LOG_FORMAT_ENV",
    "add_format_flag",
    "configure",
    "current_format",
    "import_structlog",
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


def import_structlog() -> ModuleType:
    """structlog, imported the first time without rich.

    Why: when rich is installed (typer and the CEL package bring it),
    ``import structlog`` imports it for the console renderer's tracebacks:
    some 70 modules, about a tenth of ``run``'s start-up before the first
    listener binds, and JSON logs never use it. So rich is unimportable only while
    structlog is first imported, and importable again right after (a CEL
    condition may still import it). :func:`_exception_formatter` finishes
    structlog's rich support when the console format is chosen, so the
    console renders exactly as it would have. The CLI calls this before it
    imports a command's module; an importer that comes first (a test, the
    demo) gets structlog as it always was."""
    if "structlog" not in sys.modules and "rich" not in sys.modules:
        sys.modules["rich"] = None  # type: ignore[assignment]  # "import rich" raises ImportError
        try:
            import structlog
        finally:
            if sys.modules.get("rich", ...) is None:
                del sys.modules["rich"]
    import structlog

    return structlog


def _renderer(fmt: Format) -> Any:
    # Here, not at the top: ``agent-proxy --help`` needs none of it.
    structlog = import_structlog()
    if fmt == "console":
        colors = _colors()
        return structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=_exception_formatter(colors)
        )
    return structlog.processors.JSONRenderer()


def _exception_formatter(colors: bool) -> Any:
    """The console renderer's default exception formatter: rich's traceback
    when rich is installed, structlog's plain one otherwise."""
    dev = import_structlog().dev
    if dev.rich is None:  # imported without rich: finish that import if rich is there
        try:
            import rich
            from rich.console import Console
            from rich.traceback import Traceback
        except ImportError:
            pass
        else:
            dev.rich, dev.Console, dev.Traceback = rich, Console, Traceback
            # structlog's own defaults with rich: rich_traceback, rich_monochrome_traceback.
            if colors:
                return dev.RichTracebackFormatter()
            return dev.RichTracebackFormatter(color_system=None)
    return dev.default_exception_formatter if colors else dev.default_monochrome_exception_formatter


def _colors() -> bool:
    # https://no-color.org: any value turns colour off.
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def configure(level: str = "info") -> None:
    import logging

    structlog = import_structlog()
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
