"""``make venv`` on a fresh clone says what it is doing: one line before the
install, and pip's own progress on a terminal (``--quiet`` elsewhere).

The recipe runs for real, with ``PYTHON`` pointing at a stand-in interpreter
that records how it was called, so no network or minute-long install."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
from pathlib import Path

from tests import support

ROOT = Path(__file__).resolve().parents[2]

# `python -m venv DIR` makes DIR/bin/python: this same script, which logs its
# arguments (the pip calls) to $CALLS.
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


def _clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    support.require_binary("make")
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "Makefile", clone)
    shutil.copy(ROOT / "pyproject.toml", clone)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "CALLS": str(tmp_path / "calls"), "PYTHON": str(fake)}
    env.pop("MAKEFLAGS", None)
    return clone, env


def _pip_calls(tmp_path: Path) -> list[str]:
    return [c for c in (tmp_path / "calls").read_text().splitlines() if "pip install" in c]


def test_not_a_terminal_one_line_then_quiet_pip(tmp_path: Path) -> None:
    clone, env = _clone(tmp_path)
    out = subprocess.run(
        ["make", "-C", str(clone), "--no-print-directory", "venv", f"PYTHON={env['PYTHON']}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[0] == (
        "installing dependencies into .venv (first run takes about a minute)..."
    )
    calls = _pip_calls(tmp_path)
    assert len(calls) == 2 and all("--quiet" in c for c in calls), calls
    assert (clone / ".venv" / ".installed").exists()


def test_on_a_terminal_pip_shows_its_progress(tmp_path: Path) -> None:
    clone, env = _clone(tmp_path)
    master, replica = pty.openpty()
    try:
        proc = subprocess.run(
            ["make", "-C", str(clone), "--no-print-directory", "venv", f"PYTHON={env['PYTHON']}"],
            env=env,
            stdout=replica,
            stderr=replica,
            timeout=60,
        )
    finally:
        os.close(replica)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.returncode == 0, seen
    assert b"installing dependencies into .venv" in seen
    calls = _pip_calls(tmp_path)
    assert len(calls) == 2 and not any("--quiet" in c for c in calls), calls
