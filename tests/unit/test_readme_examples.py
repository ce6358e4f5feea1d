"""The README's examples must keep working: its configuration examples are
valid configs, and the quick start's shell block runs as pasted."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.config import parse_config
from tests import support

README = Path(__file__).resolve().parents[2] / "README.md"
IDENTITY = {"source": "files", "cert": "svid.pem", "key": "svid_key.pem", "bundle": "b.pem"}


def _blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)


def test_reference_and_payroll_examples_parse() -> None:
    blocks = _blocks()
    assert len(blocks) >= 3
    reference = tomllib.loads(blocks[0])
    parse_config(reference, "README reference")
    payroll = next(b for b in blocks if "payroll-pays-up-to-10k" in b)
    config = parse_config({"identity": IDENTITY, **tomllib.loads(payroll)}, "README payroll")
    names = [r.name for r in config.inbound[0].guard.rules]
    assert names == [
        "payroll-reads-timesheets",
        "payroll-pays-up-to-10k",
        "payroll-pays-more-with-approval",
        "marketing-own-tools-only",
    ]
    guard = next(b for b in blocks if b.lstrip().startswith("[guard]"))
    parse_config(
        {"identity": IDENTITY, **tomllib.loads(guard), **{"inbound": reference["inbound"]}},
        "README guard",
    )


# -- the quick start's "By hand" block, run as pasted ----------------------------

# Simulates a busy machine: each sidecar takes longer to start than any fixed
# sleep a block could hope for, so only a block that waits for readiness passes.
_SLOW_SIDECAR = """#!/bin/sh
case "$1" in inbound|outbound) sleep 1.5 ;; esac
exec {real} "$@"
"""


def _by_hand_block() -> str:
    text = README.read_text()
    start = text.index("By hand, the L4 sidecar pair")
    return re.findall(r"```sh\n(.*?)```", text[start:], re.S)[0]


def test_by_hand_block_runs_as_pasted(tmp_path: Path) -> None:
    """The block, in bash, in a clean directory holding only ``.venv``.

    Two deviations from a paste, both for a shared test machine: the block's
    fixed ports become free ones (other runs of this suite may hold them),
    and ``agent-proxy inbound|outbound`` start 1.5 s late (see above).
    """
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the project's virtualenv (make venv)")
    real = Path(sys.prefix) / "bin" / "agent-proxy"
    assert real.exists(), "the venv has no agent-proxy entry point: make venv"
    block = _by_hand_block()
    ports = sorted(set(re.findall(r"127\.0\.0\.1:(\d{4,5})", block)) | {"18080"})
    for port in ports:
        block = re.sub(rf"\b{port}\b", str(support.free_port()), block)
    venv = tmp_path / "work" / ".venv" / "bin"
    venv.mkdir(parents=True)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "agent-proxy").write_text(_SLOW_SIDECAR.format(real=real))
    (shim / "agent-proxy").chmod(0o755)
    (venv / "activate").write_text(
        f". {Path(sys.prefix) / 'bin' / 'activate'}\nexport PATH={shim}:$PATH\n"
    )
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_PROXY_")}
    env["TMPDIR"] = str(scratch)
    proc = subprocess.Popen(
        ["bash", "-c", block],
        cwd=tmp_path / "work",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "curl:" not in err, err
    assert "Directory listing for /" in out, (out, err)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(
        r.get("peer_id") == "spiffe://payroll.example/agent/payroll" and r["decision"] == "allow"
        for r in records
    ), out
