"""Reading deploy/: the Kubernetes manifests and the Dockerfile, for tests.

Plain data in, plain data out: YAML documents as dicts, the sidecar and
agent containers of each variant, the sidecar.toml its ConfigMap carries,
and a small Dockerfile parser (exec-form ENTRYPOINT/CMD/HEALTHCHECK, ENV,
USER, WORKDIR, EXPOSE, COPY) that is enough for the one Dockerfile we ship.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from proxy.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SIDECAR_IMAGE = "agent-mtls-proxy"

# variant -> (file, identity source its sidecar.toml must use)
VARIANTS = {
    "spire": ("spire.yaml", "workload-api"),
    "cert-manager": ("cert-manager.yaml", "files"),
    "dev": ("dev.yaml", "dev"),
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("**/*.yaml")) + sorted(K8S.glob("**/*.yml"))


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@dataclass
class Variant:
    name: str
    path: Path
    source: str
    docs: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.docs = documents(self.path)

    @property
    def deployment(self) -> dict[str, Any]:
        return _one(self.docs, "Deployment")

    @property
    def configmap(self) -> dict[str, Any]:
        return _one(self.docs, "ConfigMap")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    def containers(self) -> list[dict[str, Any]]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    @property
    def sidecar(self) -> dict[str, Any]:
        found = [c for c in self.containers() if c["image"].split(":")[0] == SIDECAR_IMAGE]
        assert len(found) == 1, f"{self.name}: expected one {SIDECAR_IMAGE} container"
        return found[0]

    @property
    def agent(self) -> dict[str, Any]:
        found = [c for c in self.pod["containers"] if c is not self.sidecar]
        assert len(found) == 1, f"{self.name}: expected one agent container"
        return found[0]

    def volume(self, name: str) -> dict[str, Any]:
        found = [v for v in self.pod["volumes"] if v["name"] == name]
        assert len(found) == 1, f"{self.name}: no volume {name!r}"
        return found[0]

    @property
    def config_mount(self) -> dict[str, Any]:
        """The sidecar's mount of the ConfigMap that holds sidecar.toml."""
        cm_name = self.configmap["metadata"]["name"]
        for mount in self.sidecar.get("volumeMounts", []):
            if self.volume(mount["name"]).get("configMap", {}).get("name") == cm_name:
                return dict(mount)
        raise AssertionError(f"{self.name}: the sidecar does not mount ConfigMap {cm_name}")

    @property
    def config_path(self) -> str:
        return f"{self.config_mount['mountPath'].rstrip('/')}/sidecar.toml"

    @property
    def config_text(self) -> str:
        text: str = self.configmap["data"]["sidecar.toml"]
        return text

    @cached_property
    def config(self) -> Config:
        data = tomllib.loads(self.config_text)
        return parse_config(
            data, f"{self.path.name}:sidecar.toml", base_dir=Path(self.config_path).parent
        )

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def variant(name: str) -> Variant:
    file, source = VARIANTS[name]
    return Variant(name, K8S / file, source)


def effective(container: dict[str, Any], pod: dict[str, Any], key: str) -> Any:
    """A securityContext field: the container's, else the pod's."""
    own = container.get("securityContext", {})
    if key in own:
        return own[key]
    return pod.get("securityContext", {}).get(key)


# -- Dockerfile ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    rest: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.rest)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
            f"{self.keyword} must use the exec (JSON array) form: {self.rest}"
        )
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs in order; ``$X``/``${X}`` left for the caller."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for word in shlex.split(ins.rest):
                key, sep, value = word.partition("=")
                assert sep, f"use ENV key=value, not the legacy form: {ins.rest}"
                out[key] = value
        return out

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """HEALTHCHECK's options and its exec-form command."""
        rest = self.last("HEALTHCHECK").rest
        options: dict[str, str] = {}
        while rest.startswith("--"):
            opt, _, rest = rest.partition(" ")
            key, _, value = opt[2:].partition("=")
            options[key] = value
            rest = rest.lstrip()
        keyword, _, command = rest.partition(" ")
        assert keyword.upper() == "CMD", f"HEALTHCHECK must run a CMD: {rest}"
        return options, Instruction("CMD", command.strip()).exec_form()


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (and parser directives); blank lines between instructions
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text
    )


def parse_dockerfile(text: str) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = _substitute(rest, args).split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


def dockerfile_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


# -- .dockerignore --------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its
    parent directories decides; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        regex = _pattern_regex(pattern)
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
