"""`agent-proxy run` with no [identity] table serves with a dev SVID from an
embedded dev CA it keeps in its state directory (renewal at half-life is
covered with a MockClock in tests/integration/test_sources_dev.py)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509

from proxy.devca import DevCA, write_svid_files
from proxy.identity import SpiffeId, load_certificates
from tests.support import ProxyProcess

TD = "agent-proxy.local"


def test_run_without_identity_serves_with_a_dev_svid(tmp_path: Path, echo: tuple[str, int]) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(f"""
spiffe_id = "spiffe://{TD}/svc/hr"
[admin]
listen = ""
[[inbound]]
name = "hr"
listen = "127.0.0.1:0"
target = "{echo[0]}:{echo[1]}"
protocol = "tcp"
[[inbound.rules]]
peers = ["spiffe://{TD}/agent/*"]
""")
    proc = ProxyProcess(["run", "--config", str(config)])
    try:
        _, port = proc.wait_listener("hr")
        warnings = [ln for ln in proc.logs.all_lines() if "DEVELOPMENT identity" in ln]
        assert warnings, "the dev source must say loudly that it is for development"
        # A client identity from the same dev CA (as a second dev sidecar would get).
        ca = DevCA.load(tmp_path / ".agent-proxy-dev" / "dev-ca" / TD)
        files = write_svid_files(
            tmp_path / "client", ca.issue(SpiffeId.parse(f"spiffe://{TD}/agent/payroll"))
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(files["bundle"]))
        ctx.load_cert_chain(str(files["svid"]), str(files["svid_key"]))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            served = tls.getpeercert(binary_form=True)
            tls.sendall(b"dev identity works")
            assert tls.recv(100) == b"dev identity works"
        [leaf] = load_certificates(served)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/svc/hr"]
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifetime.total_seconds() <= 3600 + 60  # a short SVID, 1 hour by default
    finally:
        assert proc.stop() == 0
