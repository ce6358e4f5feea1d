"""What the HTTP exchange and the policy package may import (DESIGN.md's
table, for the parts this area owns)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "proxy"
# The adapters that plug an agent protocol in through proxy.http.agent_hook.
AGENT_ADAPTERS = {"mcp_flow.py", "a2a_flow.py"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("path", _modules("http"), ids=lambda p: p.name)
def test_http_never_imports_the_runtime_and_only_adapters_name_protocols(path: Path) -> None:
    found = imports(path)
    assert not [m for m in found if m.startswith("proxy.runtime")], found
    if path.name not in AGENT_ADAPTERS:
        named = [
            m for m in found if m.startswith(("proxy.agent", "proxy.http.mcp", "proxy.http.a2a"))
        ]
        assert not named, f"{path.name} names an agent protocol: {named}"


@pytest.mark.parametrize("path", _modules("policy"), ids=lambda p: p.name)
def test_policy_is_pure(path: Path) -> None:
    found = imports(path)
    io = [
        m
        for m in found
        if m.startswith(("proxy.http", "proxy.runtime", "proxy.tls", "proxy.audit", "proxy.agent"))
        or m.split(".")[0] in {"trio", "h11", "structlog", "socket", "time"}
    ]
    # The gate's default clock is time.monotonic (never a wall-clock read).
    if path.name == "gate.py":
        io = [m for m in io if m != "time"]
    assert not io, f"{path.name} imports {io}"
