"""``make certs`` output and the demo's brownfield leg, end to end."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from proxy.credentials.certs import write_certs
from proxy.credentials.demo import BrownfieldBank

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


def test_brownfield_bank_starts_from_certs_or_scratch(tmp_path: Path) -> None:
    """The leg itself runs through ``agent-proxy run`` in test_demo.py."""
    assert BrownfieldBank.start(tmp_path / "certs", tmp_path / "ca.pem") is None
    write_certs(tmp_path / "s")
    client_ca = tmp_path / "s" / "dev-ca" / "ca.pem"
    bank = BrownfieldBank.start(tmp_path / "certs", client_ca, scratch=tmp_path / "s")
    assert bank is not None
    try:
        assert bank.certs == tmp_path / "s"
        routes = bank.routes()
        assert 'upstream_tls = "dns"' in routes and 'type = "oauth2-mtls"' in routes
        assert f"127.0.0.1:{bank.bank.port}" in routes
        assert "tokens issued: 0" in bank.summary()
    finally:
        bank.stop()
