"""Black-box: ``agent-proxy approve`` as a real process mints a token that
``verify_approval`` accepts; bad input is one line and exit status 2 (those
cases run the same CLI entry point in-process: fifteen fewer processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.identity import SpiffeId, TrustBundle, TrustBundleSet, TrustDomain
from proxy.policy import SpiffePattern
from proxy.policy.approval import ReplayCache, body_sha256, canonical_json, verify_approval
from tests.pki import TestCA

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
REQUESTER = "spiffe://payroll.example/agent/payroll"


def run(
    args: Sequence[str | Path], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_PROXY_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "approve", *map(str, args)],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(
    args: Sequence[str | Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Outcome:
    """``main(["approve", ...])`` as ``python -m proxy`` would run it."""
    for name in [k for k in os.environ if k.startswith("AGENT_PROXY_")]:
        monkeypatch.delenv(name)
    capsys.readouterr()
    try:
        code = main(["approve", *map(str, args)])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrustBundleSet]:
    ca = TestCA.create("payroll.example")
    cert, key = ca.issue("spiffe://payroll.example/approver/alice").write(
        tmp_path_factory.mktemp("alice")
    )
    bundle = TrustBundle.from_pem(TrustDomain("payroll.example"), ca.bundle_pem())
    bundles = TrustBundleSet([bundle])
    return cert, key, bundles


def check(token: str, bundles: TrustBundleSet, method: str, target: str, digest: str) -> str:
    result = verify_approval(
        token,
        bundles=bundles,
        approvers=(SpiffePattern.parse("spiffe://payroll.example/approver/*"),),
        requester=SpiffeId.parse(REQUESTER),
        method=method,
        target=target,
        body_hash=digest,
        now=datetime.now(UTC),
        replay=ReplayCache(),
    )
    return result.reason


def test_mcp_tool_token(world: tuple[Path, Path, TrustBundleSet]) -> None:
    cert, key, bundles = world
    args = '{"payee": "ACME", "amount": 1200}'
    proc = run(
        [
            "--cert",
            cert,
            "--key",
            key,
            "--requester",
            REQUESTER,
            "--tool",
            "bank.transfer",
            "--args-json",
            args,
            "--ttl",
            "2m",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].count(".") == 2  # the token, nothing else
    digest = body_sha256(canonical_json({"amount": 1200, "payee": "ACME"}))
    assert check(lines[0], bundles, "tools/call", "bank.transfer", digest) == "approved"
    other = body_sha256(canonical_json({"amount": 99999, "payee": "ACME"}))
    assert check(lines[0], bundles, "tools/call", "bank.transfer", other) == "approval_mismatch"
    assert "PRIVATE" not in proc.stdout + proc.stderr


def test_http_token_from_the_environment(
    world: tuple[Path, Path, TrustBundleSet], tmp_path: Path
) -> None:
    cert, key, bundles = world
    body = tmp_path / "body.json"
    body.write_bytes(b'{"amount": 1200}')
    env = {
        "AGENT_PROXY_CERT": str(cert),
        "AGENT_PROXY_KEY": str(key),
        "AGENT_PROXY_REQUESTER": REQUESTER,
    }
    proc = run(["--method", "POST", "--path", "/payments", "--body-file", body], env=env)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    digest = body_sha256(body.read_bytes())
    assert check(token, bundles, "POST", "/payments", digest) == "approved"
    assert check(token, bundles, "POST", "/refunds", digest) == "approval_mismatch"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tool", "x", "--path", "/x"], "exactly one of --path"),
        (["--path", "/x"], "missing --method"),
        (["--method", "post", "--path", "/x"], "upper case"),
        (["--method", "POST", "--path", "/a/../b"], "dot segment"),
        (["--tool", "x", "--args-json", "{"], "--args-json: not JSON"),
        (["--tool", "x", "--args-json", "[1]"], "must be a JSON object"),
        (["--tool", "x", "--ttl", "10m"], "at most 5m"),
        (["--tool", "x", "--ttl", "soon"], "--ttl"),
        (["--tool", "x", "--body-file", "/etc/hostname"], "--body-file is for --path"),
        (["--method", "POST", "--path", "/x", "--body-file", "/nonexistent/b"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    world: tuple[Path, Path, TrustBundleSet],
    extra: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key, _ = world
    proc = run_in_process(
        ["--cert", cert, "--key", key, "--requester", REQUESTER, *extra], capsys, monkeypatch
    )
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_missing_flags_and_bad_files(
    world: tuple[Path, Path, TrustBundleSet],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key, _ = world
    for args, needle in [
        ([], "missing --cert"),
        (["--cert", cert, "--key", key, "--requester", "not-an-id", "--tool", "x"], "--requester"),
        (["--cert", key, "--key", key, "--requester", REQUESTER, "--tool", "x"], "--cert/--key"),
        (["--cert", cert, "--key", cert, "--requester", REQUESTER, "--tool", "x"], "--cert/--key"),
        (["--nope"], "unrecognized arguments"),
    ]:
        proc = run_in_process(args, capsys, monkeypatch)
        assert proc.returncode == 2, (args, proc)
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert needle in proc.stderr, proc.stderr
