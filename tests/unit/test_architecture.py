"""Imports follow the table in ARCHITECTURE.md.

Every module under ``proxy/`` (generated ``proxy/sources/proto/`` excepted)
is parsed with :mod:`ast`; every import counts, wherever it stands: module
level, inside a function (a lazy import is still a dependency), under
``if TYPE_CHECKING:``, ``from x import y`` and relative imports alike.

An import is allowed when it is the standard library, the module's own area
(``proxy.http.session`` may import anything in ``proxy.http``), the root
package (``proxy.__version__``), or listed in the importer's row of
:data:`TABLE`. A row names an area (a package or a top-level module under
``proxy/``) or one module (``http.exchange``); a module's own row, when it
has one, replaces its area's row. The ``(any)`` row is what every module
may import. ARCHITECTURE.md carries the same table, checked here, so the
document cannot drift from the test.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "proxy"
DOC = ROOT / "ARCHITECTURE.md"
EXEMPT = ("proxy.sources.proto",)  # generated gRPC/protobuf stubs


@dataclass(frozen=True)
class Row:
    ours: frozenset[str]  # areas (or modules, "sources.proto") of proxy/
    libraries: frozenset[str]  # top-level names of third-party distributions


def row(ours: str = "", libraries: str = "") -> Row:
    return Row(frozenset(ours.split()), frozenset(libraries.split()))


EVERYTHING_BELOW_RUNTIME = (
    "identity sources tls policy agent http audit tracing credentials config metrics devca notify"
)

# The may-import table. Keep in step with ARCHITECTURE.md (a test checks).
TABLE: dict[str, Row] = {
    "(any)": row("errors durations netaddr fileutil"),
    "errors": row(),
    "durations": row(),
    "netaddr": row(),
    "fileutil": row(),
    "logs": row("", "structlog rich"),
    "notify": row(),
    "identity": row("", "cryptography jwt"),
    "devca": row("identity devca_files", "cryptography"),
    "devca_files": row("identity", "cryptography"),
    "metrics": row("identity", "prometheus_client"),
    "sources": row("identity devca", "trio grpc structlog"),
    "tls": row("identity", "OpenSSL cryptography trio"),
    "policy": row("identity", "cryptography jwt cel"),
    "agent": row("policy"),
    "http": row("policy identity tls tracing", "trio httptools"),
    "http.h11_parser": row("", "h11"),
    "http.exchange": row(),
    "http.wire": row(),
    "http.framing": row(),
    "http.mcp_flow": row("policy identity agent"),
    "http.a2a_flow": row("policy identity agent"),
    "audit.settings": row("config.walker"),
    "audit": row("identity metrics", "structlog trio cryptography jwt prometheus_client"),
    "tracing.settings": row("config.walker"),
    "tracing": row("", "opentelemetry structlog prometheus_client"),
    "credentials": row(
        "identity sources tls policy http devca",
        "cryptography jwt grpc h11 trio structlog prometheus_client",
    ),
    "credentials.config": row("identity tls config.walker"),
    "credentials.certs": row("identity devca", "trustme"),
    "config": row("identity policy agent audit tracing credentials"),
    "runtime": row(EVERYTHING_BELOW_RUNTIME, "trio h11 cryptography structlog"),
    "cli": row(EVERYTHING_BELOW_RUNTIME + " runtime logs", "structlog cryptography"),
    "demo": row(EVERYTHING_BELOW_RUNTIME + " runtime cli demo_table"),
    "demo_table": row(),
    "__main__": row("cli"),
}

# Known violations, to be removed (ARCHITECTURE.md, "Known violations"):
# (importing module, imported module prefix) -> why it is wrong and the fix.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

_STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Violation:
    module: str
    imported: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.module} imports {self.imported} (line {self.line}): {self.rule}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def proxy_modules() -> dict[str, tuple[str, bool]]:
    """Every module of proxy/: name -> (source, is a package __init__)."""
    found: dict[str, tuple[str, bool]] = {}
    for path in sorted(PROXY.rglob("*.py")):
        name = module_name(path)
        if not name.startswith(EXEMPT):
            found[name] = (path.read_text(encoding="utf-8"), path.name == "__init__.py")
    return found


def _is_module(name: str, known: set[str]) -> bool:
    if name in known:
        return True
    relative = Path(*name.split("."))
    return (ROOT / relative).is_dir() or (ROOT / relative).with_suffix(".py").is_file()


def imports_of(
    module: str, source: str, is_package: bool, known: set[str]
) -> list[tuple[str, int]]:
    """(imported module, line) for every import anywhere in ``source``.
    ``from a import b`` names ``a.b`` when that is a module of ours."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                candidate = f"{parent}.{alias.name}"
                ours = parent.split(".")[0] == "proxy"
                target = candidate if ours and _is_module(candidate, known) else parent
                found.append((target, node.lineno))
    return found


def area_of(module: str) -> str:
    """``proxy.http.session`` -> ``http``; ``proxy.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def row_for(module: str, table: dict[str, Row]) -> tuple[str, Row]:
    if module == "proxy":
        return "(any)", table["(any)"]  # the root package: its version, nothing else
    dotted = module.removeprefix("proxy.")
    for key in (dotted, area_of(module)):
        if key in table:
            return key, table[key]
    raise KeyError(f"{module} has no row in the import table (add its area to ARCHITECTURE.md)")


def _permits(names: frozenset[str], imported: str) -> bool:
    dotted = imported.removeprefix("proxy.")
    return any(dotted == n or dotted.startswith(n + ".") for n in names)


def violations(
    modules: dict[str, tuple[str, bool]],
    table: dict[str, Row] = TABLE,
    known: dict[tuple[str, str], str] | None = None,
) -> list[Violation]:
    names = set(modules)
    known = KNOWN_VIOLATIONS if known is None else known
    anywhere = table["(any)"]
    out: list[Violation] = []
    for module, (source, is_package) in sorted(modules.items()):
        try:
            key, allowed = row_for(module, table)
        except KeyError:
            rule = "its area has no row: add one to TABLE and ARCHITECTURE.md"
            out.append(Violation(module, "anything", 0, rule))
            continue
        for imported, line in imports_of(module, source, is_package, names):
            top = imported.split(".")[0]
            if top == "proxy":
                if imported == "proxy" or area_of(imported) == area_of(module):
                    continue
                if _permits(allowed.ours | anywhere.ours, imported):
                    continue
                shown = ", ".join(sorted(allowed.ours)) or "nothing of ours"
                rule = f"'{key}' may import {shown} (plus the (any) row)"
            else:
                if top in _STDLIB or top in allowed.libraries | anywhere.libraries:
                    continue
                shown = ", ".join(sorted(allowed.libraries)) or "no third-party library"
                rule = f"'{key}' may import {shown} of the libraries"
            if any(module == m and (imported + ".").startswith(p + ".") for m, p in known):
                continue
            out.append(Violation(module, imported, line, rule + " (ARCHITECTURE.md)"))
    return out


# -- the project --------------------------------------------------------------


def test_every_module_imports_by_the_table() -> None:
    found = violations(proxy_modules())
    assert not found, "imports against the table:\n" + "\n".join(map(str, found))


def test_known_violations_still_exist() -> None:
    """A fixed violation leaves the allow-list, so it cannot come back unseen."""
    modules = proxy_modules()
    names = set(modules)
    stale = []
    for module, prefix in KNOWN_VIOLATIONS:
        source, is_package = modules.get(module, ("", False))
        targets = [t for t, _ in imports_of(module, source, is_package, names)]
        if not any((t + ".").startswith(prefix + ".") for t in targets):
            stale.append(f"{module} -> {prefix}")
    assert not stale, "fixed; remove from KNOWN_VIOLATIONS and ARCHITECTURE.md: " + ", ".join(stale)


def test_every_area_has_a_row() -> None:
    for module in proxy_modules():
        row_for(module, TABLE)  # KeyError names the module


def _doc_section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"ARCHITECTURE.md has no <!-- {name}:begin/end --> markers"
    return match.group(1)


def _names(cell: str) -> frozenset[str]:
    cell = cell.replace("`", "").strip()
    if cell in ("", "—", "-"):
        return frozenset()
    return frozenset(n.strip() for n in cell.split(",") if n.strip())


def doc_table() -> dict[str, Row]:
    table: dict[str, Row] = {}
    for line in _doc_section(DOC.read_text(encoding="utf-8"), "import-table").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue  # header, separator
        area = cells[0].replace("`", "")
        table[area] = Row(_names(cells[1]), _names(cells[2]))
    return table


def test_architecture_md_table_matches_the_test() -> None:
    doc = doc_table()
    for area in sorted(set(doc) | set(TABLE)):
        assert area in doc, f"ARCHITECTURE.md's import table lacks the row '{area}'"
        assert area in TABLE, f"ARCHITECTURE.md's row '{area}' is not in the test's TABLE"
        assert doc[area] == TABLE[area], (
            f"row '{area}': ARCHITECTURE.md says {doc[area]}, the test says {TABLE[area]}"
        )


def test_architecture_md_lists_the_known_violations() -> None:
    section = _doc_section(DOC.read_text(encoding="utf-8"), "known-violations")
    listed = set(re.findall(r"`([\w.]+)` → `([\w.]+)`", section))
    assert listed == set(KNOWN_VIOLATIONS), (
        f"ARCHITECTURE.md lists {sorted(listed)}, the test allows {sorted(KNOWN_VIOLATIONS)}"
    )


# -- the checker itself ---------------------------------------------------------


def _synthetic(name: str, source: str, package: bool = False) -> list[Violation]:
    return violations({name: (source, package)}, known={})


@pytest.mark.parametrize(
    ("name", "source", "imported"),
    [
        ("proxy.identity.fake", "import trio\n", "trio"),
        ("proxy.identity.fake", "from proxy.tls import build_side\n", "proxy.tls"),
        ("proxy.tls.fake", "from proxy.policy.peers import decide_peer\n", "proxy.policy.peers"),
        ("proxy.policy.fake", "def f():\n    import proxy.http.conn\n", "proxy.http.conn"),
        ("proxy.policy.fake", "from ..agent import mcp\n", "proxy.agent.mcp"),
        ("proxy.http.fake", "from proxy.runtime.listener import Conn\n", "proxy.runtime.listener"),
        ("proxy.http.session", "from proxy.agent import mcp\n", "proxy.agent.mcp"),
        ("proxy.http.exchange", "import trio\n", "trio"),
        (
            "proxy.audit.fake",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from proxy.cli import main\n",
            "proxy.cli",
        ),
        ("proxy.config", "from .. import runtime\n", "proxy.runtime"),
    ],
)
def test_a_violating_import_is_reported(name: str, source: str, imported: str) -> None:
    found = _synthetic(name, source, package=name == "proxy.config")
    assert [v.imported for v in found] == [imported], found
    message = str(found[0])
    assert name in message and imported in message and "may import" in message


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("proxy.identity.fake", "import json\nfrom cryptography import x509\n"),
        (
            "proxy.identity.fake",
            "from proxy.identity.svid import X509Svid\nfrom . import spiffe_id\n",
        ),
        ("proxy.tls.fake", "from proxy.identity import TrustBundleSet\nfrom OpenSSL import SSL\n"),
        ("proxy.http.mcp_flow", "from proxy.agent import mcp\n"),
        (
            "proxy.policy.fake",
            "from proxy import __version__\nfrom proxy.errors import UsageError\n",
        ),
    ],
)
def test_an_allowed_import_passes(name: str, source: str) -> None:
    assert _synthetic(name, source) == []


def test_a_known_violation_is_allowed_only_for_its_module() -> None:
    source = "def f():\n    from proxy.config import ConfigError\n"
    known = {("proxy.audit.settings", "proxy.config"): "test"}
    assert violations({"proxy.audit.settings": (source, False)}, known=known) == []
    found = violations({"proxy.audit.sink": (source, False)}, known=known)
    assert [v.imported for v in found] == ["proxy.config"]


# -- module size -----------------------------------------------------------------

MAX_LINES = 450  # the house says ~400; this is the hard stop


def test_no_module_is_over_the_size_limit() -> None:
    over = {}
    for path in sorted(PROXY.rglob("*.py")):
        if module_name(path).startswith(EXEMPT):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            over[str(path.relative_to(ROOT))] = lines
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"
