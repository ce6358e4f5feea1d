"""deploy/kubernetes: schema validation and the semantic checks a schema
cannot make (ports, grace period, non-root, where identity may go)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from kubernetes_validate import utils as kv

from proxy.config import load_config
from tests.deploy.kube import (
    K8S,
    ROOT,
    VARIANTS,
    Variant,
    dockerfile_stages,
    documents,
    effective,
    manifest_files,
    variant,
)
from tests.pki import TestCA

# The oldest Kubernetes with native sidecar containers on by default, and the
# newest the installed kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.29", kv.latest_version())
ALL_VARIANTS = sorted(VARIANTS)

IDENTITY_DRIVERS = {"spire": "csi.spiffe.io", "cert-manager": "spiffe.csi.cert-manager.io"}


def _all_documents() -> list[tuple[str, int, dict[str, Any]]]:
    return [
        (str(path.relative_to(ROOT)), i, doc)
        for path in manifest_files()
        for i, doc in enumerate(documents(path))
    ]


def _doc_id(item: tuple[str, int, dict[str, Any]]) -> str:
    path, i, doc = item
    return f"{path}#{i}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def test_manifests_exist() -> None:
    names = {p.name for p in manifest_files()}
    assert {"spire.yaml", "cert-manager.yaml", "dev.yaml", "networkpolicy.yaml"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", _all_documents(), ids=_doc_id)
def test_every_manifest_validates(item: tuple[str, int, dict[str, Any]], version: str) -> None:
    path, _, doc = item
    # strict: unknown fields (a typo such as "readOnlyRootFileSystem") fail too.
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{path}: {where}: {exc.message} (Kubernetes {exc.version})")
    except kv.SchemaNotFoundError as exc:
        pytest.fail(f"{path}: {exc.message}: only built-in kinds belong in these manifests")


def test_the_validator_rejects_an_unknown_field() -> None:
    doc = variant("dev").deployment
    doc["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.fixture(params=ALL_VARIANTS)
def v(request: pytest.FixtureRequest) -> Variant:
    return variant(request.param)


# -- the sidecar.toml in each ConfigMap ------------------------------------------


def test_sidecar_toml_is_a_valid_config(v: Variant) -> None:
    config = v.config  # parse_config: every key known, every value valid
    assert config.identity.source == v.source
    assert config.admin.listen is not None
    assert [o.protocol for o in config.outbound] == ["http-proxy"]


def test_check_config_accepts_it(v: Variant, tmp_path: Path, ca_a: TestCA) -> None:
    """``agent-proxy check-config`` on the ConfigMap's file, with each of the
    sidecar's mounts laid out under tmp_path as the pod would have it (and,
    for the files source, an SVID where the CSI driver would put one)."""
    text = v.config_text
    for mount in v.sidecar.get("volumeMounts", []):
        local = tmp_path / mount["name"]
        local.mkdir()
        text = text.replace(mount["mountPath"], str(local))
    config = tmp_path / "sidecar.toml"
    config.write_text(text)
    ident = load_config(config).identity
    if ident.source == "files":
        assert ident.cert and ident.key and ident.bundle
        assert all(_under(str(p), str(tmp_path)) for p in (ident.cert, ident.key, ident.bundle))
        svid = ca_a.issue("spiffe://a.org/ns/payroll/sa/payroll-agent")
        ident.cert.write_bytes(svid.cert_pem())
        ident.key.write_bytes(svid.key_pem())
        ident.bundle.write_bytes(ca_a.bundle_pem())
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_variants_differ_only_in_identity(v: Variant) -> None:
    """Three plain files instead of overlays: keep them from drifting."""
    dev = variant("dev")

    def without_identity(text: str) -> dict[str, Any]:
        data = tomllib.loads(text)
        data.pop("identity")
        return data

    assert without_identity(v.config_text) == without_identity(dev.config_text)

    def shape(x: Variant) -> dict[str, Any]:
        pod = dict(x.pod)
        pod.pop("volumes")
        containers = []
        for c in x.containers():
            c = dict(c)
            c.pop("volumeMounts", None)
            containers.append(c)
        pod.pop("initContainers", None)
        pod["containers"] = containers
        return pod

    assert shape(v) == shape(dev)


# -- ports and probes --------------------------------------------------------------


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return int(named[0])


def test_probe_and_container_ports_match_the_config(v: Variant) -> None:
    config, sidecar = v.config, v.sidecar
    admin = config.admin.listen
    assert admin is not None
    # The kubelet probes the pod IP: the admin endpoint must not be loopback-only.
    assert admin.host in ("0.0.0.0", "::"), "the kubelet cannot reach a loopback admin endpoint"
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    assert set(kinds) <= set(sidecar), "the sidecar needs startup, readiness and liveness probes"
    probes = {k: sidecar[k] for k in kinds}
    for kind, probe in probes.items():
        port = _port_number(sidecar, probe["httpGet"]["port"])
        assert port == admin.port, f"{kind} probes {port}, admin listens on {admin.port}"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    # Declared ports are exactly the ones reachable from outside the pod.
    reachable = {admin.port} | {i.listen.port for i in config.inbound}
    declared = {p["containerPort"] for p in sidecar.get("ports", [])}
    assert declared == reachable
    # The agent's proxy variables point at the egress listener, on loopback.
    egress = config.outbound[0]
    assert egress.listen.is_loopback()
    agent_env = v.env(v.agent)
    expected = f"http://{egress.listen}"
    assert agent_env["HTTP_PROXY"] == agent_env["http_proxy"] == expected


def test_admin_exposure_is_explicit(v: Variant) -> None:
    data = tomllib.loads(v.config_text)
    assert data["admin"]["allow_public"] is True


def test_grace_period_is_longer_than_the_drain(v: Variant) -> None:
    grace = v.pod["terminationGracePeriodSeconds"]
    assert grace > v.config.drain_timeout, (
        f"terminationGracePeriodSeconds {grace} must exceed drain_timeout "
        f"{v.config.drain_timeout:g}s"
    )


def test_sidecar_is_a_native_sidecar(v: Variant) -> None:
    """Starts (and passes its startup probe) before the agent, stops after it."""
    assert v.sidecar in v.pod.get("initContainers", [])
    assert v.sidecar.get("restartPolicy") == "Always"
    assert "startupProbe" in v.sidecar


# -- security context ------------------------------------------------------------


def test_every_container_runs_as_non_root(v: Variant) -> None:
    for c in v.containers():
        assert effective(c, v.pod, "runAsNonRoot") is True, c["name"]
        assert effective(c, v.pod, "runAsUser") not in (0, None), c["name"]
        assert effective(c, v.pod, "runAsGroup") not in (0, None), c["name"]


def test_every_container_is_locked_down(v: Variant) -> None:
    for c in v.containers():
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert not sc.get("capabilities", {}).get("add"), c["name"]
        assert sc.get("privileged") in (None, False), c["name"]
        seccomp = effective(c, v.pod, "seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}, c["name"]
    # The sidecar's own context says it all, whatever the pod's says.
    sc = v.sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_agent_and_sidecar_are_different_users(v: Variant) -> None:
    def ids(c: dict[str, Any]) -> tuple[Any, Any]:
        return effective(c, v.pod, "runAsUser"), effective(c, v.pod, "runAsGroup")

    sidecar_uid, sidecar_gid = ids(v.sidecar)
    agent_uid, agent_gid = ids(v.agent)
    assert sidecar_uid != agent_uid
    assert sidecar_gid != agent_gid


def test_every_container_has_requests_and_limits(v: Variant) -> None:
    for c in v.containers():
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (
                f"{c['name']}: resources.{kind}"
            )


def test_no_service_account_token(v: Variant) -> None:
    assert v.pod.get("automountServiceAccountToken") is False


# -- where the identity goes --------------------------------------------------------


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def test_identity_reaches_only_the_sidecar(v: Variant) -> None:
    ident = v.config.identity
    mounts = {m["name"]: m for m in v.sidecar.get("volumeMounts", [])}
    if v.name in IDENTITY_DRIVERS:
        csi = [vol for vol in v.pod["volumes"] if "csi" in vol]
        assert len(csi) == 1
        vol = csi[0]
        assert vol["csi"]["driver"] == IDENTITY_DRIVERS[v.name]
        assert vol["csi"].get("readOnly") is True
        mount = mounts[vol["name"]]
        assert mount.get("readOnly") is True
        if v.name == "spire":
            assert ident.endpoint == f"unix://{mount['mountPath']}/spire-agent.sock"
            identity_files = [ident.endpoint.removeprefix("unix://")]
        else:
            attrs = vol["csi"]["volumeAttributes"]
            # The key is group-readable by the sidecar's group only.
            assert attrs["spiffe.csi.cert-manager.io/fs-group"] == str(
                effective(v.sidecar, v.pod, "runAsGroup")
            )
            assert ident.cert and ident.key and ident.bundle
            identity_files = [str(ident.cert), str(ident.key), str(ident.bundle)]
            assert [Path(p).name for p in identity_files] == ["tls.crt", "tls.key", "ca.crt"]
    else:
        assert ident.state_dir is not None
        owner = [m for m in mounts.values() if _under(str(ident.state_dir), m["mountPath"])]
        assert len(owner) == 1, "the dev CA's state_dir must be on a volume"
        vol = v.volume(owner[0]["name"])
        assert "emptyDir" in vol
        identity_files = [str(ident.state_dir)]
        mount = owner[0]
    for path in identity_files:
        assert _under(path, mount["mountPath"]), f"{path} is not on the identity volume"
    # The agent mounts nothing of the sidecar's, and no env value names it.
    agent_mounts = {m["name"] for m in v.agent.get("volumeMounts", [])}
    assert mount["name"] not in agent_mounts
    for value in v.env(v.agent).values():
        assert mount["mountPath"] not in value
    # Other CSI volumes or hostPath would be another route to a key.
    assert not any("hostPath" in vol for vol in v.pod["volumes"])


def test_writes_land_on_volumes(v: Variant) -> None:
    """readOnlyRootFilesystem: whatever the sidecar writes is on a writable mount."""
    writable = [m["mountPath"] for m in v.sidecar.get("volumeMounts", []) if not m.get("readOnly")]
    config = v.config
    written: list[str] = []
    if config.identity.source == "dev":
        assert config.identity.state_dir is not None
        written.append(str(config.identity.state_dir))
    if config.audit.path != "-":
        written.append(config.audit.path)
    for path in written:
        assert any(_under(path, m) for m in writable), f"{path} is on the read-only root"


def test_config_is_mounted_where_the_image_reads_it(v: Variant) -> None:
    final = dockerfile_stages()[-1]
    cmd = final.last("CMD").exec_form()
    config_arg = cmd[cmd.index("--config") + 1]
    # The manifest runs the image's ENTRYPOINT and CMD as they are.
    assert "command" not in v.sidecar and "args" not in v.sidecar
    assert v.config_path == config_arg
    assert v.config_mount.get("readOnly") is True
    assert "sidecar.toml" in v.configmap["data"]


def test_sidecar_image_is_this_version(v: Variant) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert v.sidecar["image"] == f"agent-mtls-proxy:{project['version']}"


# -- NetworkPolicy ------------------------------------------------------------------


def test_networkpolicy_fits_the_pod(v: Variant) -> None:
    policy = documents(K8S / "networkpolicy.yaml")[0]
    assert policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["namespace"] == v.deployment["metadata"]["namespace"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    labels = v.deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    admin = v.config.admin.listen
    assert admin is not None
    assert ingress_ports == {admin.port}
    egress_ports = {
        (p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]
    }
    for out in v.config.outbound:
        for route in out.routes:
            assert ("TCP", route.target.port) in egress_ports, route.name
    assert ("UDP", 53) in egress_ports
    # Nothing else: no rule without ports, no CIDR blocks to the world.
    for rule in policy["spec"]["egress"]:
        assert rule.get("ports")
        assert all("ipBlock" not in peer for peer in rule.get("to", []))
