"""Black-box: ``agent-proxy ca`` and ``agent-proxy svid inspect`` as real processes.

Each test runs the command as a subprocess (``python -m proxy``) and looks
only at what an operator sees: exit status, stdout, stderr, files and modes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.devca import DevCA, write_svid_files
from proxy.identity import SpiffeId, TrustDomain

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0

TD = "payroll.example"
AGENT_ID = "spiffe://payroll.example/agent/payroll"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def run(args: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None) -> Result:
    # A clean environment: no AGENT_PROXY_* from the developer's shell.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_PROXY_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", *map(str, args)],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_usage_error(result: Result, *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr_lines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agent-proxy: error: "), lines
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@dataclass
class Pki:
    ca_dir: Path
    out: Path

    @property
    def svid(self) -> Path:
        return self.out / "svid.pem"

    @property
    def key(self) -> Path:
        return self.out / "svid_key.pem"

    @property
    def bundle(self) -> Path:
        return self.out / "bundle.pem"


def make_pki(tmp: Path, name: str, td: str, spiffe_id: str) -> Pki:
    pki = Pki(tmp / f"{name}-ca", tmp / f"{name}-out")
    init = run(["ca", "init", "--trust-domain", td, "--dir", pki.ca_dir], tmp)
    assert init.returncode == 0, init
    issue = run(
        ["ca", "issue", "--dir", pki.ca_dir, "--spiffe-id", spiffe_id, "--out", pki.out], tmp
    )
    assert issue.returncode == 0, issue
    return pki


def other_pki(tmp: Path, name: str, td: str, spiffe_id: str) -> Pki:
    """A second PKI as test input, made in-process (the CLI that makes
    ``payroll`` is what is under test; this one only has to exist)."""
    pki = Pki(tmp / f"{name}-ca", tmp / f"{name}-out")
    ca = DevCA.init(pki.ca_dir, TrustDomain.parse(td))
    write_svid_files(pki.out, ca.issue(SpiffeId.parse(spiffe_id)))
    return pki


@pytest.fixture(scope="module")
def payroll(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One dev CA and SVID for the module's read-only tests (two processes,
    not two per test); a test that changes the CA makes its own."""
    return make_pki(tmp_path_factory.mktemp("payroll"), "payroll", TD, AGENT_ID)


# -- ca init / ca issue ------------------------------------------------------------


def test_ca_init_and_issue(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    init = run(["ca", "init", "--trust-domain", TD, "--dir", ca_dir, "--ttl", "30d"], tmp_path)
    assert init.returncode == 0, init
    assert "spiffe://payroll.example" in init.stdout
    assert init.stderr == ""
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca_key.pem") == 0o600
    assert mode(ca_dir / "ca.pem") == 0o644

    out = tmp_path / "out"
    issue = run(
        ["ca", "issue", "--dir", ca_dir, "--spiffe-id", AGENT_ID, "--ttl", "15m", "--out", out],
        tmp_path,
    )
    assert issue.returncode == 0, issue
    assert AGENT_ID in issue.stdout
    assert "serial" in issue.stdout and "not_after" in issue.stdout
    assert "PRIVATE KEY" not in issue.stdout + issue.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "svid.pem", "svid_key.pem"]
    assert mode(out / "svid_key.pem") == 0o600
    assert mode(out / "bundle.pem") == 0o644
    assert (out / "bundle.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()


def test_ca_init_refuses_overwrite(tmp_path: Path) -> None:
    payroll = make_pki(tmp_path, "payroll", TD, AGENT_ID)  # this test replaces the CA
    before = (payroll.ca_dir / "ca_key.pem").read_bytes()
    again = run(["ca", "init", "--trust-domain", TD, "--dir", payroll.ca_dir], tmp_path)
    assert_usage_error(again, "already exists", "--force")
    assert (payroll.ca_dir / "ca_key.pem").read_bytes() == before
    forced = run(["ca", "init", "--trust-domain", TD, "--dir", payroll.ca_dir, "--force"], tmp_path)
    assert forced.returncode == 0, forced
    assert (payroll.ca_dir / "ca_key.pem").read_bytes() != before
    assert mode(payroll.ca_dir / "ca_key.pem") == 0o600


def test_ca_init_trust_domain_from_env(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    result = run(
        ["ca", "init"],
        tmp_path,
        env={"AGENT_PROXY_TRUST_DOMAIN": TD, "AGENT_PROXY_DIR": str(ca_dir)},
    )
    assert result.returncode == 0, result
    assert "spiffe://payroll.example" in result.stdout
    assert mode(ca_dir / "ca_key.pem") == 0o600


def test_flag_wins_over_env(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    result = run(
        ["ca", "init", "--trust-domain", "flag.example", "--dir", ca_dir],
        tmp_path,
        env={"AGENT_PROXY_TRUST_DOMAIN": "env.example"},
    )
    assert result.returncode == 0, result
    assert "spiffe://flag.example" in result.stdout


def test_ca_init_takes_the_spiffe_id_form(tmp_path: Path) -> None:
    """--trust-domain reads a SPIFFE ID as its trust domain, as go-spiffe does."""
    ca_dir = tmp_path / "ca"
    result = run(
        ["ca", "init", "--trust-domain", "spiffe://payroll.example/ns/prod", "--dir", ca_dir],
        tmp_path,
    )
    assert result.returncode == 0, result
    assert DevCA.load(ca_dir).trust_domain == TrustDomain.parse(TD)


def test_ca_init_missing_trust_domain(tmp_path: Path) -> None:
    result = run(["ca", "init", "--dir", tmp_path / "ca"], tmp_path)
    assert_usage_error(result, "--trust-domain", "AGENT_PROXY_TRUST_DOMAIN")


def test_ca_init_bad_trust_domain(tmp_path: Path) -> None:
    result = run(["ca", "init", "--trust-domain", "Payroll.Example", "--dir", tmp_path], tmp_path)
    assert_usage_error(result, "uppercase")


@pytest.mark.parametrize(
    ("spiffe_id", "rule"),
    [
        ("spiffe://payroll.example/a//b", "empty path segment"),
        ("https://payroll.example/agent", "scheme must be spiffe"),
        ("spiffe://payroll.example/agent/", "trailing slash"),
        ("spiffe://payroll.example:443/agent", "port is not allowed"),
    ],
)
def test_ca_issue_bad_spiffe_id(tmp_path: Path, payroll: Pki, spiffe_id: str, rule: str) -> None:
    result = run(
        ["ca", "issue", "--dir", payroll.ca_dir, "--spiffe-id", spiffe_id, "--out", tmp_path / "x"],
        tmp_path,
    )
    assert_usage_error(result, rule)
    assert not (tmp_path / "x").exists()


def test_ca_issue_id_outside_trust_domain(tmp_path: Path, payroll: Pki) -> None:
    result = run(
        [
            "ca", "issue", "--dir", payroll.ca_dir,
            "--spiffe-id", "spiffe://marketing.example/agent/ads", "--out", tmp_path / "x",
        ],
        tmp_path,
    )  # fmt: skip
    assert_usage_error(result, "trust domain payroll.example")


@pytest.mark.parametrize("ttl", ["5x", "-1h", "0s", "soon"])
def test_ca_issue_bad_ttl(tmp_path: Path, payroll: Pki, ttl: str) -> None:
    result = run(
        [
            "ca", "issue", "--dir", payroll.ca_dir, "--spiffe-id", AGENT_ID,
            "--out", tmp_path / "x", "--ttl", ttl,
        ],
        tmp_path,
    )  # fmt: skip
    assert_usage_error(result, "--ttl")


def test_ca_issue_without_ca(tmp_path: Path) -> None:
    result = run(
        ["ca", "issue", "--dir", tmp_path / "none", "--spiffe-id", AGENT_ID, "--out", tmp_path],
        tmp_path,
    )
    assert_usage_error(result, "ca init")


# -- svid inspect ------------------------------------------------------------------


def test_inspect_valid(tmp_path: Path, payroll: Pki) -> None:
    result = run(
        [
            "svid", "inspect", payroll.svid, "--key", payroll.key,
            "--bundle", f"{TD}={payroll.bundle}",
        ],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result
    assert AGENT_ID in result.stdout
    assert "not_after" in result.stdout
    assert "PRIVATE" not in result.stdout + result.stderr
    assert result.stderr == ""


def test_inspect_json(tmp_path: Path, payroll: Pki) -> None:
    result = run(
        ["svid", "inspect", payroll.svid, "--bundle", f"{TD}={payroll.bundle}", "--json"],
        tmp_path,
    )
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["spiffe_id"] == AGENT_ID
    assert report["valid"] is True
    assert report["error"] is None
    assert report["not_before"].endswith("Z") and report["not_after"].endswith("Z")
    assert isinstance(report["serial"], str)
    assert len(report["chain"]) == 1
    entry = report["chain"][0]
    assert set(entry) == {"subject", "issuer", "serial", "not_before", "not_after"}
    assert entry["serial"] == report["serial"]


def test_inspect_without_bundle_checks_leaf_only(tmp_path: Path, payroll: Pki) -> None:
    result = run(["svid", "inspect", payroll.svid], tmp_path)
    assert result.returncode == 0, result


def test_inspect_bundle_of_another_ca_for_the_same_td(tmp_path: Path, payroll: Pki) -> None:
    impostor = other_pki(tmp_path, "impostor", TD, AGENT_ID)
    result = run(["svid", "inspect", payroll.svid, "--bundle", f"{TD}={impostor.bundle}"], tmp_path)
    assert result.returncode == 1, result
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("invalid: "), lines
    assert "Traceback" not in result.stderr


def test_inspect_bundle_only_for_another_td(tmp_path: Path, payroll: Pki) -> None:
    # A bundle of a different trust domain (even a CA that did sign nothing
    # of ours) never anchors our SVID: trust is scoped per trust domain.
    other = other_pki(tmp_path, "marketing", "marketing.example", "spiffe://marketing.example/a")
    result = run(
        ["svid", "inspect", payroll.svid, "--bundle", f"marketing.example={other.bundle}"],
        tmp_path,
    )
    assert result.returncode == 1, result
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("invalid: "), lines
    assert "payroll.example" in lines[0]


def test_inspect_own_ca_filed_under_another_td(tmp_path: Path, payroll: Pki) -> None:
    # The right CA, but declared as another trust domain's: still refused.
    result = run(
        ["svid", "inspect", payroll.svid, "--bundle", f"marketing.example={payroll.bundle}"],
        tmp_path,
    )
    assert result.returncode == 1, result


def test_inspect_invalid_json(tmp_path: Path, payroll: Pki) -> None:
    other = other_pki(tmp_path, "other", TD, AGENT_ID)
    result = run(
        ["svid", "inspect", payroll.svid, "--bundle", f"{TD}={other.bundle}", "--json"], tmp_path
    )
    assert result.returncode == 1, result
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert report["error"]
    assert report["spiffe_id"] == AGENT_ID


def test_inspect_key_of_another_svid(tmp_path: Path, payroll: Pki) -> None:
    other = other_pki(tmp_path, "other", TD, "spiffe://payroll.example/agent/other")
    result = run(["svid", "inspect", payroll.svid, "--key", other.key], tmp_path)
    assert result.returncode == 1, result
    lines = result.stderr_lines()
    assert lines == ["invalid: private key does not match the certificate"], lines
    assert "PRIVATE KEY" not in result.stdout + result.stderr


def test_inspect_key_file_as_cert(tmp_path: Path, payroll: Pki) -> None:
    result = run(["svid", "inspect", payroll.key], tmp_path)
    assert result.returncode == 1, result
    key_body = payroll.key.read_text().splitlines()[1]
    assert key_body not in result.stdout + result.stderr
    assert len(result.stderr_lines()) == 1


def test_inspect_ca_cert_is_not_an_svid(tmp_path: Path, payroll: Pki) -> None:
    result = run(["svid", "inspect", payroll.bundle], tmp_path)
    assert result.returncode == 1, result
    assert result.stderr_lines()[0].startswith("invalid: ")


def test_inspect_missing_file(tmp_path: Path) -> None:
    result = run(["svid", "inspect", tmp_path / "nope.pem"], tmp_path)
    assert_usage_error(result, "nope.pem")


def test_inspect_missing_key_file(tmp_path: Path, payroll: Pki) -> None:
    result = run(["svid", "inspect", payroll.svid, "--key", tmp_path / "nokey.pem"], tmp_path)
    assert_usage_error(result, "nokey.pem")


@pytest.mark.parametrize(
    "value",
    ["no-equals-sign", "=bundle.pem", f"{TD}=", "Bad_TD!=bundle.pem"],
)
def test_inspect_malformed_bundle_flag(tmp_path: Path, payroll: Pki, value: str) -> None:
    result = run(["svid", "inspect", payroll.svid, "--bundle", value], tmp_path)
    assert_usage_error(result, "--bundle")


def test_inspect_missing_bundle_file(tmp_path: Path, payroll: Pki) -> None:
    result = run(
        ["svid", "inspect", payroll.svid, "--bundle", f"{TD}={tmp_path / 'gone.pem'}"], tmp_path
    )
    assert_usage_error(result, "gone.pem")


def test_inspect_bundle_from_env(tmp_path: Path, payroll: Pki) -> None:
    other = other_pki(tmp_path, "other", "other.example", "spiffe://other.example/x")
    value = f"other.example={other.bundle},{TD}={payroll.bundle}"
    ok = run(["svid", "inspect", payroll.svid], tmp_path, env={"AGENT_PROXY_BUNDLE": value})
    assert ok.returncode == 0, ok
    bad = run(
        ["svid", "inspect", payroll.svid],
        tmp_path,
        env={"AGENT_PROXY_BUNDLE": f"other.example={other.bundle}"},
    )
    assert bad.returncode == 1, bad


def test_ca_issue_from_env(tmp_path: Path, payroll: Pki) -> None:
    out = tmp_path / "env-out"
    result = run(
        ["ca", "issue"],
        tmp_path,
        env={
            "AGENT_PROXY_DIR": str(payroll.ca_dir),
            "AGENT_PROXY_SPIFFE_ID": "spiffe://payroll.example/agent/env",
            "AGENT_PROXY_TTL": "90s",
            "AGENT_PROXY_OUT": str(out),
        },
    )
    assert result.returncode == 0, result
    inspect = run(["svid", "inspect", out / "svid.pem", "--json"], tmp_path)
    report = json.loads(inspect.stdout)
    assert report["spiffe_id"] == "spiffe://payroll.example/agent/env"
    lifetime = datetime.fromisoformat(report["not_after"]) - datetime.fromisoformat(
        report["not_before"]
    )
    # 90s plus the 30s backdating for clock skew.
    assert lifetime == timedelta(seconds=120)


def test_inspect_expired_svid(tmp_path: Path, payroll: Pki) -> None:
    past = datetime.now(UTC) - timedelta(hours=3)
    ca = DevCA.init(tmp_path / "old-ca", TrustDomain.parse(TD), now=past - timedelta(days=1))
    expired = ca.issue(SpiffeId.parse(AGENT_ID), ttl=timedelta(hours=1), now=past)
    files = write_svid_files(tmp_path / "expired", expired)
    result = run(["svid", "inspect", files["svid"], "--key", files["svid_key"]], tmp_path)
    assert result.returncode == 1, result
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("invalid: certificate expired"), lines
    as_json = run(["svid", "inspect", files["svid"], "--json"], tmp_path)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["reason"] == "certificate_expired"
