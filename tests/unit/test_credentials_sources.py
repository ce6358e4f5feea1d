"""Which JWT-SVID issuer and JWT bundles each identity source gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.config.schema import IdentityConfig
from proxy.credentials.build import CredentialSetupError
from proxy.credentials.config import InboundJwtConfig
from proxy.credentials.sources import inbound_jwt_bundles, jwt_svid_source
from proxy.devca import DevCA
from proxy.identity import SpiffeId, TrustDomain
from proxy.identity.jwt_svid import mint_jwt_svid, validate_jwt_svid

ID = SpiffeId.parse("spiffe://dev.example/agent/payroll")


def dev(tmp_path: Path) -> IdentityConfig:
    return IdentityConfig(source="dev", spiffe_id=ID, state_dir=tmp_path / "state")


def test_dev_issues_and_publishes(tmp_path: Path) -> None:
    identity = dev(tmp_path)
    ca_dir = tmp_path / "state" / "dev-ca" / "dev.example"
    DevCA.init(ca_dir, ID.trust_domain)
    source = jwt_svid_source(identity)
    assert source is not None and source.dev is not None
    assert (ca_dir / "jwt_key.pem").stat().st_mode & 0o777 == 0o600
    published = json.loads((ca_dir / "bundle.spiffe.json").read_text())
    assert sorted(k["use"] for k in published["keys"]) == ["jwt-svid", "x509-svid"]
    # The same key on the next start: what peers trust keeps verifying.
    again = jwt_svid_source(identity)
    assert again is not None and again.dev is not None
    assert again.dev.signing.kid == source.dev.signing.kid
    now = datetime.now(UTC)
    token = mint_jwt_svid(source.dev.signing, ID, ["hr"], now=now).token
    bundles = inbound_jwt_bundles(InboundJwtConfig("hr", {}), identity)
    assert validate_jwt_svid(token, bundles.current(), "hr", now).spiffe_id == ID
    assert bundles.run is None


def test_files_source(tmp_path: Path) -> None:
    files = IdentityConfig(source="files")
    assert jwt_svid_source(files) is None
    with pytest.raises(CredentialSetupError, match="files source has no JWT bundles"):
        inbound_jwt_bundles(InboundJwtConfig("hr", {}), files)
    with pytest.raises(CredentialSetupError, match="cannot read JWT bundle"):
        inbound_jwt_bundles(
            InboundJwtConfig("hr", {TrustDomain.parse("a.org"): tmp_path / "none.json"}), files
        )


def test_workload_api_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(CredentialSetupError, match="JWT-SVIDs: Workload API endpoint is empty"):
        jwt_svid_source(IdentityConfig(source="workload-api"))
    wl = IdentityConfig(source="workload-api", endpoint="unix:///run/spire/agent.sock")
    source = jwt_svid_source(wl)
    assert source is not None and source.workload_api == "unix:///run/spire/agent.sock"
    bundles = inbound_jwt_bundles(InboundJwtConfig("hr", {}), wl)
    assert bundles.run is not None and len(bundles.current()) == 0
