"""deploy/Dockerfile and .dockerignore.

There is no container engine here, so the image is never built. Instead the
Dockerfile is parsed, checked, and its ENTRYPOINT + CMD run locally the way
the image would run them: the environment is the final stage's ENV plus what
the manifest sets for the sidecar, the working directory is WORKDIR, the
config is the manifest's ConfigMap, and the pod's mounts are laid out in a
temporary directory. Then the HEALTHCHECK command runs against it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests import support
from tests.deploy.kube import (
    ROOT,
    Stage,
    dockerfile_stages,
    dockerignore_excludes,
    dockerignore_patterns,
    parse_dockerfile,
    variant,
)
from tests.pki import TestCA
from tests.support import LineReader

IMAGE_VENV = "/opt/venv"
# A PEM private key block with real content (not just the marker in code).
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{40,}")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages()


def test_multi_stage_on_slim_official_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.\d+-slim(@sha256:[0-9a-f]{64})?", stage.base), stage.base
    final = stages[-1]
    # The runtime stage takes only the built venv from the build stage.
    builders = {s.name for s in stages[:-1]}
    for ins in final.all("COPY"):
        assert ins.rest.startswith("--from="), f"final stage copies from the context: {ins.rest}"
        assert ins.rest.split()[0].removeprefix("--from=") in builders
    assert not final.all("ADD")
    assert not final.all("RUN"), "the runtime stage runs nothing at build time"


def test_non_root_numeric_user(stages: list[Stage]) -> None:
    user = stages[-1].last("USER").rest
    assert re.fullmatch(r"\d+:\d+", user), f"USER must be numeric UID:GID, got {user!r}"
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    # The manifests run the sidecar as the same user.
    for name in ("spire", "cert-manager", "dev"):
        sc = variant(name).sidecar["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid)


def test_entrypoint_cmd_and_env(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.last("ENTRYPOINT").exec_form() == ["agent-proxy"]
    cmd = final.last("CMD").exec_form()
    assert cmd[:2] == ["run", "--config"]
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root: no .pyc writes
    assert env["PATH"].split(":")[0] == f"{IMAGE_VENV}/bin"


def test_healthcheck_probes_the_admin_endpoint(stages: list[Stage]) -> None:
    options, command = stages[-1].healthcheck()
    assert {"interval", "timeout", "retries"} <= set(options)
    assert command[0] == "python"  # no curl in the slim image
    urls = re.findall(r"http://[^'\"]+", " ".join(command))
    assert len(urls) == 1
    admin = variant("dev").config.admin.listen
    assert admin is not None
    assert urls[0] == f"http://127.0.0.1:{admin.port}/healthz"
    assert stages[-1].last("EXPOSE").rest == str(admin.port)


def test_only_the_package_enters_the_image(stages: list[Stage]) -> None:
    sources: list[str] = []
    for stage in stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            if ins.rest.startswith("--from="):
                continue
            *srcs, _dest = ins.rest.split()
            sources += srcs
    assert sorted(sources) == ["README.md", "proxy", "pyproject.toml"]


def test_dockerignore_keeps_secrets_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "proxy/__init__.py", "proxy/cli/launch.py"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/config",
        "tests/pki.py",
        ".agent-proxy-dev/dev-ca/a.org/ca_key.pem",
        "demo-state/ca/ca_key.pem",
        "proxy/ca_key.pem",
        "proxy/secret.key",
        "proxy/sources/.agent-proxy-dev/dev-ca/x/ca.pem",
        "proxy/__pycache__/config.cpython-311.pyc",
        "deploy/Dockerfile",
    ):
        assert dockerignore_excludes(dropped, patterns), dropped


def test_no_key_material_in_what_is_copied() -> None:
    patterns = dockerignore_patterns()
    for path in [ROOT / "pyproject.toml", ROOT / "README.md", *(ROOT / "proxy").rglob("*")]:
        rel = str(path.relative_to(ROOT))
        if not path.is_file() or dockerignore_excludes(rel, patterns):
            continue
        assert not PEM_KEY.search(path.read_bytes()), f"{rel} holds a private key"


def test_parser_handles_continuations_and_comments() -> None:
    stages = parse_dockerfile(
        "ARG BASE=python:3.11-slim\n# c\nFROM ${BASE} AS b\nRUN a \\\n  # inner\n  b\n"
        'FROM $BASE\nENV A=1 \\\n    B="x y"\nCMD ["c"]\n'
    )
    assert [(s.base, s.name) for s in stages] == [
        ("python:3.11-slim", "b"),
        ("python:3.11-slim", None),
    ]
    assert stages[0].last("RUN").rest == "a  b"
    assert stages[1].env() == {"A": "1", "B": "x y"}


# -- run the image's command -------------------------------------------------------


def _container_env(stage: Stage, manifest_env: dict[str, str]) -> dict[str, str]:
    """The final stage's ENV, with the image's venv mapped to ours, then the
    manifest's env on top (as the kubelet does)."""
    local_bin = str(Path(sys.executable).parent)
    env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for key, value in stage.env().items():
        value = value.replace(f"{IMAGE_VENV}/bin", local_bin)
        value = re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value
        )
        env[key] = value
    env.update(manifest_env)
    return env


@pytest.mark.parametrize("name", ["dev", "cert-manager"])
def test_image_command_gives_a_ready_sidecar(
    name: str, stages: list[Stage], tmp_path: Path, ca_a: TestCA
) -> None:
    v = variant(name)
    final = stages[-1]
    env = _container_env(final, v.env(v.sidecar))
    argv = [*final.last("ENTRYPOINT").exec_form(), *final.last("CMD").exec_form()]
    exe = shutil.which(argv[0], path=env["PATH"])
    assert exe is not None, f"{argv[0]} is not on the image's PATH"
    argv[0] = exe

    # The pod's mounts, under tmp_path; the ports moved to free ones.
    admin_port, egress_port = support.free_port(), support.free_port()
    text = v.config_text
    for mount in v.sidecar.get("volumeMounts", []):
        local = tmp_path / "pod" / mount["name"]
        local.mkdir(parents=True)
        text = text.replace(mount["mountPath"], str(local))
    assert v.config.admin.listen is not None
    old_admin = str(v.config.admin.listen)
    assert text.count(old_admin) == 1
    text = text.replace(old_admin, f"127.0.0.1:{admin_port}")
    old_egress = str(v.config.outbound[0].listen)
    assert text.count(old_egress) == 1
    text = text.replace(old_egress, f"127.0.0.1:{egress_port}")
    config = tmp_path / "pod" / v.config_mount["name"] / "sidecar.toml"
    config.write_text(text)
    if v.config.identity.source == "files":
        spiffe = tmp_path / "pod" / "spiffe"
        svid = ca_a.issue("spiffe://a.org/ns/payroll/sa/payroll-agent")
        svid.write(spiffe)
        (spiffe / "svid.pem").rename(spiffe / "tls.crt")
        (spiffe / "svid_key.pem").rename(spiffe / "tls.key")
        (spiffe / "ca.crt").write_bytes(ca_a.bundle_pem())
    assert argv.count(v.config_path) == 1
    argv[argv.index(v.config_path)] = str(config)

    workdir = tmp_path / "workdir"  # stands in for WORKDIR /, which we must not write
    workdir.mkdir()
    assert final.last("WORKDIR").rest == "/"
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = LineReader(proc.stderr)
    try:
        logs.wait_json(event="ready")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        # The HEALTHCHECK, as Docker would run it inside the container.
        _, health = final.healthcheck()
        health = [part.replace(":7070/", f":{admin_port}/") for part in health]
        done = subprocess.run(health, env=env, cwd=workdir, capture_output=True, timeout=10)
        assert done.returncode == 0, done.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=v.config.drain_timeout + 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Nothing was written outside the mounted volumes.
    assert list(workdir.iterdir()) == []
