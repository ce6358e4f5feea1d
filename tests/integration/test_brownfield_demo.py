"""``make certs`` output and the demo's brownfield leg, end to end."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from proxy.credentials.certs import write_certs
from proxy.credentials.demo import run_brownfield_leg

README = Path(__file__).resolve().parents[2] / "certs" / "README.md"


def test_certs_are_all_documented_and_keys_private(tmp_path: Path) -> None:
    write_certs(tmp_path)
    documented = README.read_text()
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp_path).as_posix()
        generic = re.sub(r"^svid/[^/]+/", "svid/<name>/", rel)
        assert f"`{generic}`" in documented, f"certs/README.md does not explain {generic}"
        mode = stat.S_IMODE(path.stat().st_mode)
        if "key" in path.name:
            assert mode == 0o600, rel
    ca_before = (tmp_path / "dev-ca" / "ca.pem").read_bytes()
    write_certs(tmp_path)  # again: the CA is kept
    assert (tmp_path / "dev-ca" / "ca.pem").read_bytes() == ca_before


def test_brownfield_leg(tmp_path: Path) -> None:
    write_certs(tmp_path)
    lines: list[str] = []
    assert run_brownfield_leg(tmp_path, out=lines.append), lines
    text = "\n".join(lines)
    assert "refused: upstream_name_mismatch" in text
    assert "the agent's own Authorization reached the bank: no" in text


def test_brownfield_leg_without_certs(tmp_path: Path) -> None:
    lines: list[str] = []
    assert not run_brownfield_leg(tmp_path / "certs", out=lines.append)
    assert "make certs" in lines[0]
    lines.clear()
    assert run_brownfield_leg(tmp_path / "certs", out=lines.append, scratch=tmp_path / "s")
    assert lines[0] == f"   certificates from {tmp_path / 's'}/ (see certs/README.md)"
