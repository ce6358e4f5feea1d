"""What every contender shares: peer binaries, identities, the nginx backend.

The identities are minted with our own ``agent-proxy ca`` commands, so every
contender presents the same ECDSA P-256 X509-SVIDs (URI SAN only) and trusts
the same bundle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from benchmarks.harness import BenchError, ProcSpec

TRUST_DOMAIN = "bench.example"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/svc/backend"
# Same CA, wrong ID: what the identity self-test presents on one side.
IMPOSTOR_ID = f"spiffe://{TRUST_DOMAIN}/agent/impostor"

# binary -> Debian package; nginx's stream module ships on its own.
PACKAGES = {
    "wrk": "wrk",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "stunnel4": "stunnel4",
    "openssl": "openssl",
    "taskset": "util-linux",
}
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def ensure_packages(log: list[str]) -> None:
    """Install the Debian peers that are missing (root only); record what we did."""
    need = [pkg for binary, pkg in PACKAGES.items() if which(binary) is None]
    if which("nginx") is None or not NGINX_STREAM_MODULE.exists():
        need.append("libnginx-mod-stream")
    need = sorted(set(need))
    if not need:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        log.append(f"missing {', '.join(need)} (not root or no apt-get): those cells error")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need]
    log.append(" ".join(cmd))
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        # A fresh machine has no package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.append(f"apt-get failed: {done.stderr.strip()[-300:]}")


def agent_proxy_argv() -> list[str]:
    script = Path(sys.executable).parent / "agent-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


@dataclass(frozen=True)
class Identity:
    spiffe_id: str
    cert: Path  # leaf then chain, PEM
    key: Path
    bundle: Path
    combined: Path  # cert + key in one PEM (HAProxy's crt)
    sha1: str  # leaf fingerprint, lowercase hex, no colons


def l4_argv(
    direction: str,
    port: int,
    far: int,
    presents: Identity,
    bundle: Path,
    check: list[str],
    audit_log: Path,
) -> list[str]:
    """An L4 sidecar's arguments (after the program): ``direction`` on
    ``port`` in front of ``far``, presenting ``presents``' SVID and trusting
    ``bundle``; ``check`` is its peer rule (``--allow`` or ``--expect``)."""
    return [
        direction, "--name", "bench-" + direction.removesuffix("bound"),
        "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{far}",
        "--cert", str(presents.cert), "--key", str(presents.key), "--bundle", str(bundle),
        *check, "--audit-log", str(audit_log), "--log-level", "warning",
    ]  # fmt: skip


@dataclass(frozen=True)
class Identities:
    ca: Path
    client: Identity
    server: Identity
    impostor: Identity
    # CA + one pinned leaf: stunnel's verifyPeer looks the peer's leaf up here.
    client_pinned_cafile: Path  # used by the server side: CA + client leaf
    server_pinned_cafile: Path  # used by the client side: CA + server leaf
    commands: tuple[str, ...]


def make_identities(root: Path) -> Identities:
    ap = agent_proxy_argv()
    commands = [
        [*ap, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--dir", str(root / "ca")],
        [*ap, "ca", "issue", "--dir", str(root / "ca"), "--spiffe-id", CLIENT_ID,
         "--ttl", "1d", "--out", str(root / "client")],
        [*ap, "ca", "issue", "--dir", str(root / "ca"), "--spiffe-id", SERVER_ID,
         "--ttl", "1d", "--out", str(root / "server")],
        [*ap, "ca", "issue", "--dir", str(root / "ca"), "--spiffe-id", IMPOSTOR_ID,
         "--ttl", "1d", "--out", str(root / "impostor")],
    ]  # fmt: skip
    for cmd in commands:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd[-6:])}: {done.stderr.strip()}")
    client = _identity(root / "client", CLIENT_ID)
    server = _identity(root / "server", SERVER_ID)
    ca_pem = (root / "ca" / "ca.pem").read_bytes()
    client_pinned = root / "ca-plus-client-leaf.pem"
    server_pinned = root / "ca-plus-server-leaf.pem"
    client_pinned.write_bytes(ca_pem + _leaf_pem(client.cert))
    server_pinned.write_bytes(ca_pem + _leaf_pem(server.cert))
    return Identities(
        ca=root / "ca" / "ca.pem",
        client=client,
        server=server,
        impostor=_identity(root / "impostor", IMPOSTOR_ID),
        client_pinned_cafile=client_pinned,
        server_pinned_cafile=server_pinned,
        commands=tuple(" ".join(c) for c in commands),
    )


def _leaf_pem(cert_path: Path) -> bytes:
    leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    return leaf.public_bytes(serialization.Encoding.PEM)


def _identity(d: Path, spiffe_id: str) -> Identity:
    cert, key = d / "svid.pem", d / "svid_key.pem"
    combined = d / "haproxy.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    combined.chmod(0o600)
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    sha1 = hashlib.sha1(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    return Identity(spiffe_id, cert, key, d / "bundle.pem", combined, sha1)


# -- backend ------------------------------------------------------------------

SMALL_PATH, MIB_PATH, GIB_PATH = "/64b", "/1m", "/1g"
MCP_PATH = "/mcp"
# A tools/call and the backend's answer: the same bytes through every pair.
MCP_CALL = (
    '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_timesheet",'
    '"arguments":{"employee":"e-1042","month":"2026-11"}}}'
)
MCP_RESULT = '{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"7.5h"}]}}'
MCP_HEADERS = ("Content-Type: application/json", "Accept: application/json, text/event-stream",
               "MCP-Protocol-Version: 2025-06-18")  # fmt: skip
GIB = 1 << 30


@dataclass(frozen=True)
class Backend:
    port: int
    spec: ProcSpec
    config: str


def nginx_user_line() -> str:
    # Started as root, nginx would switch its worker to "nobody", which cannot
    # read the harness's 0700 temp directory; keep the worker as the caller.
    return "user root root;\n" if os.geteuid() == 0 else ""


def nginx_temp_paths(d: Path) -> str:
    # Debian's default temp paths live under /var/lib/nginx; keep ours private.
    return "".join(
        f"    {kind}_temp_path {d / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def make_backend(root: Path, port: int, cpus: str | None, stream_bytes: int) -> Backend:
    www = root / "www"
    www.mkdir()
    (www / SMALL_PATH[1:]).write_bytes(b"x" * 63 + b"\n")
    (www / MIB_PATH[1:]).write_bytes(os.urandom(1 << 20))
    big = www / GIB_PATH[1:]
    with open(big, "wb") as f:
        # Sparse: it costs no disk, and sendfile keeps the backend cheap.
        f.truncate(stream_bytes)
    # Read it once so its pages are cached: the first reader of a cold sparse
    # file runs at a fraction of the speed of the rest and would be penalised.
    buf = bytearray(1 << 20)
    with open(big, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    nginx = which("nginx")
    if nginx is None:
        raise BenchError("nginx is not installed")
    config = f"""\
{nginx_user_line()}daemon off;
worker_processes 1;
pid {root / "backend.pid"};
error_log {root / "backend-error.log"} warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    # A keep-alive connection relayed by an L4 proxy must not be cut every
    # 1,000 requests (the default), or the keep-alive row would count handshakes.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
{nginx_temp_paths(root)}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = {MCP_PATH} {{
            default_type application/json;
            return 200 '{MCP_RESULT}';
        }}
    }}
}}
"""
    conf = root / "backend.conf"
    conf.write_text(config)
    spec = ProcSpec(
        name="backend-nginx",
        argv=[nginx, "-e", str(root / "backend-error.log"), "-p", str(root), "-c", str(conf)],
        ready_port=port,
        cpus=cpus,
    )
    return Backend(port, spec, config)
