"""What the CLI costs before it does anything, and how it talks to people
and to supervisors: lazy command modules, --log-format, --ready-fd."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from proxy import logs, notify
from proxy.cli import COMMANDS, build_parser
from proxy.errors import UsageError

HEAVY = (
    "grpc",
    "google.protobuf",
    "cel",
    "jwt",
    "prometheus_client",
    "structlog",
    "trio",
    "OpenSSL",
    "cryptography",
    "proxy.config",
    "proxy.agent",
    "proxy.http",
)

_PROBE = """
import contextlib, json, sys
from proxy.cli import main
with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(*argv: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out.splitlines()[-1]))


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_help_imports_no_command_module_and_no_heavy_library() -> None:
    modules = _modules_after("--help")
    assert _heavy(modules) == []
    assert not [m for m in modules if m.startswith("proxy.cli.")]


def test_a_command_imports_only_its_own_module() -> None:
    modules = _modules_after("ca", "--help")
    assert "proxy.cli.ca" in modules
    assert not {"proxy.cli.run", "proxy.cli.launch", "proxy.cli.sidecar"} & set(modules)


def test_lazy_help_lines_match_the_commands_own() -> None:
    # The table's one-liners are what `agent-proxy --help` shows: they must
    # be the commands' own, and every command must be in the table.
    assert build_parser(None).format_help() == build_parser("*").format_help()
    full = build_parser("*")
    sub = next(a for a in full._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)  # type: ignore[arg-type]


# -- --log-format ---------------------------------------------------------------


@pytest.fixture
def fresh_logs() -> Iterator[None]:
    yield
    logs.select_format(None, {})
    structlog.reset_defaults()


def test_console_or_json_as_asked(fresh_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.select_format("console", {})
    logs.configure("info")
    structlog.get_logger("t").info("hello there", listener="egress")
    console = capsys.readouterr().err
    assert "hello there" in console and "listener" in console and "egress" in console
    with pytest.raises(ValueError):
        json.loads(console)
    logs.select_format(None, {logs.LOG_FORMAT_ENV: "json"})
    logs.configure("info")
    structlog.get_logger("t").info("hello there", listener="egress")
    record = json.loads(capsys.readouterr().err)
    assert record["event"] == "hello there" and record["listener"] == "egress"


def test_the_flag_wins_over_the_environment(fresh_logs: None) -> None:
    logs.select_format("json", {logs.LOG_FORMAT_ENV: "console"})
    assert logs.current_format() == "json"


def test_a_bad_format_in_the_environment_is_one_line(fresh_logs: None) -> None:
    with pytest.raises(UsageError, match="AGENT_PROXY_LOG_FORMAT='xml'"):
        logs.select_format(None, {logs.LOG_FORMAT_ENV: "xml"})


def test_default_is_console_on_a_terminal_json_elsewhere(
    fresh_logs: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    logs.select_format(None, {})
    master, replica = pty.openpty()
    with os.fdopen(replica, "w") as tty, open(tmp_path / "log", "w") as file:
        monkeypatch.setattr(sys, "stderr", tty)
        assert logs.current_format() == "console"
        monkeypatch.setattr(sys, "stderr", file)
        assert logs.current_format() == "json"
    os.close(master)


def test_every_long_running_command_takes_log_format() -> None:
    parser = build_parser("*")
    for command in ("run", "inbound", "outbound", "launch"):
        args = parser.parse_args([command, "--log-format", "console"])
        assert args.log_format == "console"


# -- --ready-fd ------------------------------------------------------------------


def test_ready_fd_gets_one_ready_line_then_end_of_file() -> None:
    r, w = os.pipe()
    try:
        notify.select(str(w))
        notify.ready()
        notify.ready()  # once only
        assert os.read(r, 64) == notify.READY_LINE
        assert os.read(r, 64) == b""  # the sidecar closed its end
    finally:
        os.close(r)


@pytest.mark.parametrize("value", ["x", "1", "99999"])
def test_bad_ready_fd_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError, match="--ready-fd"):
        notify.select(value)


def test_the_run_command_leaves_grpc_protobuf_jwt_and_cel_for_who_needs_them() -> None:
    # grpc/protobuf: only the Workload API source; PyJWT: only approvals;
    # CEL: only rules with conditions. A small config needs none of them.
    probe = "import json, sys, proxy.cli.run; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    lazy = ("grpc", "google.protobuf", "jwt", "cel")
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in lazy)] == []


# Loaded only by a config (or a command) that uses them; a plain HTTP
# sidecar with files identity and admin off needs none before listening.
NOT_FOR_A_SMALL_RUN = ("rich", "prometheus_client", "grpc", "google.protobuf", "jwt", "cel",
                       "proxy.devca", "proxy.sources.dev", "proxy.agent", "proxy.http.mcp_flow",
                       "proxy.http.a2a_flow", "proxy.credentials.provider",
                       "proxy.credentials.token_endpoint", "proxy.identity.jwt_svid",
                       "proxy.runtime.admin", "proxy.config.summary")  # fmt: skip


def test_the_run_command_imports_no_code_for_features_a_small_config_lacks() -> None:
    modules = _modules_after("run", "--help")
    assert "proxy.cli.run" in modules and "structlog" in modules
    lazy = NOT_FOR_A_SMALL_RUN
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in lazy)] == []


_CONSOLE_TRACEBACK = """
import sys
from proxy import logs
logs.import_structlog()  # as the CLI does: structlog first imported without rich
assert "rich" not in sys.modules
logs.select_format("console", {})
logs.configure("info")
try:
    1 / 0
except ZeroDivisionError:
    logs.import_structlog().get_logger("t").exception("it broke")
"""


def test_the_console_format_still_renders_rich_tracebacks() -> None:
    # structlog was imported with rich hidden; choosing the console format
    # gives the traceback structlog renders with rich, as before.
    done = subprocess.run(
        [sys.executable, "-c", _CONSOLE_TRACEBACK], capture_output=True, text=True, check=True
    )
    assert "it broke" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "╭" in done.stderr
    assert "ZeroDivisionError" in done.stderr
