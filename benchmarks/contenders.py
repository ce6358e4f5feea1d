"""The contenders: each is a small record of how to start a sidecar pair.

Every pair has the same shape: a client-side proxy that accepts plain HTTP
on loopback and originates mTLS (TLS 1.3, ECDSA P-256 SVIDs) to a
server-side proxy, which terminates mTLS and relays to the nginx backend.
``Deployment.procs`` is in start order (server side first), ``client_port``
is where the load client connects and ``inbound_port`` is the mTLS port that
``openssl s_time`` hammers.

Fairness choices, the same for every pair unless its ``identity`` says
otherwise: one worker process or thread per proxy; TLS 1.3 only; session
resumption off on the client side (ours never resumes, so nobody does);
session tickets off on the server side where the peer has a switch for it;
one log line per connection (TCP) or request (HTTP) written to a file,
like our audit log.
"""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fixtures import (
    CLIENT_ID,
    NGINX_STREAM_MODULE,
    SERVER_ID,
    Identities,
    Identity,
    agent_proxy_argv,
    l4_argv,
    nginx_temp_paths,
    nginx_user_line,
    which,
)
from benchmarks.harness import BenchError, Pinning, ProcSpec, free_port


@dataclass(frozen=True)
class Context:
    """What a contender needs to lay out one deployment."""

    root: Path  # a fresh directory for this contender and repetition
    ids: Identities
    backend_port: int
    pinning: Pinning
    # The SVIDs each side presents: normally ids.client / ids.server; the
    # identity self-test swaps one for an impostor while every allow list,
    # expectation and pin still names the real peer.
    client_presents: Identity
    server_presents: Identity


@dataclass
class Deployment:
    procs: list[ProcSpec]
    client_port: int
    inbound_port: int | None
    configs: dict[str, str] = field(default_factory=dict)
    # Where MCP tools/call requests go (ours: a pair of mcp listeners that
    # judge each call; the peers relay them as plain HTTP): None = client_port.
    mcp_port: int | None = None
    startup_s: float | None = None  # spawn of the first process to the last one ready


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    mode: str  # "tcp", "http" or "direct"
    identity: str  # how each side checks its peer, for the report
    notes: str
    build: Callable[[Context], Deployment]
    # None when it can run here, else why not (the cell then says so).
    unavailable: Callable[[], str | None]
    is_peer: bool = True  # counts toward "best peer"
    is_ours: bool = False


def _needs(*binaries: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [b for b in binaries if which(b) is None]
        return f"n/a ({', '.join(missing)} not installed)" if missing else None

    return check


def _write(ctx: Context, name: str, text: str, dep: Deployment) -> Path:
    path = ctx.root / name
    path.write_text(text)
    dep.configs[name] = text
    return path


# -- direct ---------------------------------------------------------------------


def _direct(ctx: Context) -> Deployment:
    return Deployment(procs=[], client_port=ctx.backend_port, inbound_port=None)


# -- ours -----------------------------------------------------------------------


def _connection_cap() -> int:
    """Our listeners' max_connections here: HAProxy's maxconn budget (two
    descriptors per relayed connection within the file limit), so the
    10,000-idle row measures memory, not our default cap of 4,096."""
    return min(12000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64) // 2)


def _ours_tcp(ctx: Context) -> Deployment:
    ap = agent_proxy_argv()
    ids, p_in, p_out = ctx.ids, free_port(), free_port()
    cap = ["--max-connections", str(_connection_cap())]
    inbound = [
        *ap,
        *l4_argv("inbound", p_in, ctx.backend_port, ctx.server_presents, ids.server.bundle,
                 ["--allow", CLIENT_ID], ctx.root / "inbound-audit.jsonl"),
        *cap,
    ]  # fmt: skip
    outbound = [
        *ap,
        *l4_argv("outbound", p_out, p_in, ctx.client_presents, ids.client.bundle,
                 ["--expect", SERVER_ID], ctx.root / "outbound-audit.jsonl"),
        *cap,
    ]  # fmt: skip
    cpus = ctx.pinning.proxy
    return Deployment(
        procs=[
            ProcSpec("ours-inbound", inbound, ready_port=p_in, cpus=cpus),
            ProcSpec("ours-outbound", outbound, ready_port=p_out, cpus=cpus),
        ],
        client_port=p_out,
        inbound_port=p_in,
    )


def _ours_http_available() -> str | None:
    done = subprocess.run(
        [*agent_proxy_argv(), "run", "--help"], capture_output=True, check=False, timeout=30
    )
    return None if done.returncode == 0 else "n/a (not built)"


def _ours_http(ctx: Context) -> Deployment:
    # The shape of proxy/config.py: one file per side, identity from files,
    # the admin endpoint off (both sides would want its default port, and the
    # peers run no stats endpoint either), pool settings left at their defaults.
    ap = agent_proxy_argv()
    p_in, p_out, m_in, m_out = free_port(), free_port(), free_port(), free_port()
    dep = Deployment(procs=[], client_port=p_out, inbound_port=p_in, mcp_port=m_out)

    def head(side: Identity, audit: str) -> str:
        return f"""\
log_level = "warning"

[identity]
source = "files"
cert = "{side.cert}"
key = "{side.key}"
bundle = "{side.bundle}"

[admin]
enabled = false

[audit]
path = "{ctx.root / audit}"
"""

    cap = _connection_cap()
    server_toml = f"""{head(ctx.server_presents, "inbound-audit.jsonl")}
[[inbound]]
name = "bench-in"
protocol = "http"
listen = "127.0.0.1:{p_in}"
target = "127.0.0.1:{ctx.backend_port}"
max_connections = {cap}

[[inbound.rules]]
peers = ["{CLIENT_ID}"]
methods = ["GET"]
paths = ["/**"]

[[inbound]]
name = "bench-mcp-in"
protocol = "mcp"
listen = "127.0.0.1:{m_in}"
target = "127.0.0.1:{ctx.backend_port}"

[[inbound.rules]]
peers = ["{CLIENT_ID}"]
tools = ["read_*"]
"""
    client_toml = f"""{head(ctx.client_presents, "outbound-audit.jsonl")}
[[outbound]]
name = "bench-out"
protocol = "http"
listen = "127.0.0.1:{p_out}"
max_connections = {cap}

[[outbound.routes]]
target = "127.0.0.1:{p_in}"
expect = ["{SERVER_ID}"]
methods = ["GET"]
paths = ["/**"]

[[outbound]]
name = "bench-mcp-out"
protocol = "http"
listen = "127.0.0.1:{m_out}"

[[outbound.routes]]
target = "127.0.0.1:{m_in}"
expect = ["{SERVER_ID}"]
protocol = "mcp"
tools = ["read_*"]
"""
    server_cfg = _write(ctx, "ours-server.toml", server_toml, dep)
    client_cfg = _write(ctx, "ours-client.toml", client_toml, dep)
    cpus = ctx.pinning.proxy
    dep.procs = [
        ProcSpec("ours-http-server", [*ap, "run", "--config", str(server_cfg)], p_in, cpus=cpus),
        ProcSpec("ours-http-client", [*ap, "run", "--config", str(client_cfg)], p_out, cpus=cpus),
    ]
    return dep


# -- stunnel --------------------------------------------------------------------


def _stunnel_binary() -> str:
    binary = which("stunnel4") or which("stunnel")
    if binary is None:
        raise BenchError("stunnel is not installed")
    return binary


def _stunnel(ctx: Context) -> Deployment:
    ids, p_in, p_out = ctx.ids, free_port(), free_port()
    dep = Deployment(procs=[], client_port=p_out, inbound_port=p_in)
    # verifyChain checks the chain against the CA; verifyPeer additionally
    # requires the peer's leaf to be the one in CAfile (certificate pinning),
    # stunnel's closest equivalent of matching one SPIFFE ID.
    common = "foreground = yes\nsyslog = no\npid =\ndebug = notice\n"
    server = f"""{common}output = {ctx.root / "stunnel-server.log"}
[inbound]
accept = 127.0.0.1:{p_in}
connect = 127.0.0.1:{ctx.backend_port}
cert = {ctx.server_presents.cert}
key = {ctx.server_presents.key}
CAfile = {ids.client_pinned_cafile}
verifyChain = yes
verifyPeer = yes
requireCert = yes
sslVersionMin = TLSv1.3
options = NO_TICKET
"""
    client = f"""{common}output = {ctx.root / "stunnel-client.log"}
[outbound]
client = yes
accept = 127.0.0.1:{p_out}
connect = 127.0.0.1:{p_in}
cert = {ctx.client_presents.cert}
key = {ctx.client_presents.key}
CAfile = {ids.server_pinned_cafile}
verifyChain = yes
verifyPeer = yes
sslVersionMin = TLSv1.3
sessionResume = no
"""
    binary, cpus = _stunnel_binary(), ctx.pinning.proxy
    server_cfg = _write(ctx, "stunnel-server.conf", server, dep)
    client_cfg = _write(ctx, "stunnel-client.conf", client, dep)
    dep.procs = [
        ProcSpec("stunnel-server", [binary, str(server_cfg)], p_in, cpus=cpus),
        ProcSpec("stunnel-client", [binary, str(client_cfg)], p_out, cpus=cpus),
    ]
    return dep


# -- HAProxy --------------------------------------------------------------------


def _haproxy(mode: str) -> Callable[[Context], Deployment]:
    def build(ctx: Context) -> Deployment:
        binary = which("haproxy")
        if binary is None:
            raise BenchError("haproxy is not installed")
        ids, p_in, p_out = ctx.ids, free_port(), free_port()
        dep = Deployment(procs=[], client_port=p_out, inbound_port=p_in)
        log_option = "option httplog" if mode == "http" else "option tcplog"
        # HAProxy refuses to start unless 2 x maxconn + a few fit the file limit.
        maxconn = min(12000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64) // 2)
        head = f"""\
global
    nbthread 1
    maxconn {maxconn}
    log stdout format raw local0 info
    # Fail loudly on a port clash instead of sharing the port with a stranger.
    noreuseport
defaults
    mode {mode}
    log global
    {log_option}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
"""
        # HAProxy 2.6 has no fetch for a URI SAN, so after the chain check the
        # peer's leaf is pinned by its SHA-1 fingerprint (ssl_c_sha1/ssl_s_sha1).
        server = f"""{head}
frontend inbound
    bind 127.0.0.1:{p_in} ssl crt {ctx.server_presents.combined} ca-file {ids.server.bundle} \
verify required ssl-min-ver TLSv1.3 no-tls-tickets
    tcp-request session reject unless {{ ssl_c_sha1,hex -m str -i {ids.client.sha1} }}
    default_backend target
backend target
    server backend 127.0.0.1:{ctx.backend_port}
"""
        if mode == "http":
            # http-reuse always: idle mTLS connections to the server side are
            # shared by every agent connection, HAProxy's best case here.
            upstream_check = (
                f"    http-reuse always\n"
                f"    http-response deny unless {{ ssl_s_sha1,hex -m str -i {ids.server.sha1} }}\n"
            )
        else:
            upstream_check = (
                f"    tcp-response content reject unless "
                f"{{ ssl_s_sha1,hex -m str -i {ids.server.sha1} }}\n"
            )
        client = f"""{head}
frontend outbound
    bind 127.0.0.1:{p_out}
    default_backend upstream
backend upstream
{upstream_check}    server inbound 127.0.0.1:{p_in} ssl crt {ctx.client_presents.combined} \
ca-file {ids.client.bundle} verify required ssl-min-ver TLSv1.3 no-ssl-reuse no-tls-tickets
"""
        server_cfg = _write(ctx, f"haproxy-{mode}-server.cfg", server, dep)
        client_cfg = _write(ctx, f"haproxy-{mode}-client.cfg", client, dep)
        cpus = ctx.pinning.proxy
        dep.procs = [
            ProcSpec("haproxy-server", [binary, "-db", "-f", str(server_cfg)], p_in, cpus=cpus),
            ProcSpec("haproxy-client", [binary, "-db", "-f", str(client_cfg)], p_out, cpus=cpus),
        ]
        return dep

    return build


# -- nginx ----------------------------------------------------------------------


def _nginx_main(ctx: Context, name: str, body: str, stream: bool) -> str:
    load = f"load_module {NGINX_STREAM_MODULE};\n" if stream else ""
    return f"""\
{load}{nginx_user_line()}daemon off;
worker_processes 1;
pid {ctx.root / f"{name}.pid"};
error_log {ctx.root / f"{name}-error.log"} warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 32768; }}
{body}"""


def _nginx(mode: str) -> Callable[[Context], Deployment]:
    def build(ctx: Context) -> Deployment:
        binary = which("nginx")
        if binary is None:
            raise BenchError("nginx is not installed")
        if mode == "stream" and not NGINX_STREAM_MODULE.exists():
            raise BenchError("nginx stream module (libnginx-mod-stream) is not installed")
        ids, p_in, p_out, b = ctx.ids, free_port(), free_port(), ctx.backend_port
        dep = Deployment(procs=[], client_port=p_out, inbound_port=p_in)
        tls_server = f"""\
        ssl_certificate {ctx.server_presents.cert};
        ssl_certificate_key {ctx.server_presents.key};
        ssl_client_certificate {ids.server.bundle};
        ssl_verify_client on;
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
"""
        # proxy_ssl_verify would also check a DNS name or CN, which a
        # URI-SAN-only SVID does not have, so nginx cannot verify the upstream.
        tls_client = f"""\
        proxy_ssl_certificate {ctx.client_presents.cert};
        proxy_ssl_certificate_key {ctx.client_presents.key};
        proxy_ssl_protocols TLSv1.3;
        proxy_ssl_session_reuse off;
"""
        if mode == "stream":
            fmt = "log_format conn '$remote_addr [$time_local] $status $bytes_sent $session_time';"
            # A client whose leaf is not the pinned one is sent to a closed port.
            server_body = f"""stream {{
    {fmt}
    access_log {ctx.root / "nginx-server-access.log"} conn;
    map $ssl_client_fingerprint $target {{
        {ids.client.sha1} 127.0.0.1:{b};
        default 127.0.0.1:1;
    }}
    server {{
        listen 127.0.0.1:{p_in} ssl backlog=4096;
{tls_server}        proxy_pass $target;
    }}
}}
"""
            client_body = f"""stream {{
    {fmt}
    access_log {ctx.root / "nginx-client-access.log"} conn;
    server {{
        listen 127.0.0.1:{p_out} backlog=4096;
        proxy_pass 127.0.0.1:{p_in};
        proxy_ssl on;
{tls_client}    }}
}}
"""
        else:
            http_common = f"""    keepalive_requests 100000000;
    keepalive_timeout 300s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    # Stream large bodies through memory buffers, never a temp file on disk.
    proxy_max_temp_file_size 0;
{nginx_temp_paths(ctx.root)}"""
            server_body = f"""http {{
{http_common}    access_log {ctx.root / "nginx-server-access.log"};
    upstream target {{ server 127.0.0.1:{b}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{p_in} ssl backlog=4096;
{tls_server}        location / {{
            if ($ssl_client_fingerprint != "{ids.client.sha1}") {{ return 403; }}
            proxy_pass http://target;
        }}
    }}
}}
"""
            client_body = f"""http {{
{http_common}    access_log {ctx.root / "nginx-client-access.log"};
    # Idle mTLS connections to the server side are reused across agent connections.
    upstream inbound {{ server 127.0.0.1:{p_in}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{p_out} backlog=4096;
        location / {{
            proxy_pass https://inbound;
{tls_client}        }}
    }}
}}
"""
        stream = mode == "stream"
        server = _nginx_main(ctx, "nginx-server", server_body, stream)
        client = _nginx_main(ctx, "nginx-client", client_body, stream)
        server_cfg = _write(ctx, f"nginx-{mode}-server.conf", server, dep)
        client_cfg = _write(ctx, f"nginx-{mode}-client.conf", client, dep)
        cpus = ctx.pinning.proxy

        def argv(name: str, cfg: Path) -> list[str]:
            err = ctx.root / f"{name}-error.log"
            return [binary, "-e", str(err), "-p", str(ctx.root), "-c", str(cfg)]

        dep.procs = [
            ProcSpec("nginx-server", argv("nginx-server", server_cfg), p_in, cpus=cpus),
            ProcSpec("nginx-client", argv("nginx-client", client_cfg), p_out, cpus=cpus),
        ]
        return dep

    return build


# -- the roster -----------------------------------------------------------------

PINNED = "chain vs CA, then the peer's leaf pinned by SHA-1 fingerprint"

CONTENDERS: tuple[Contender, ...] = (
    Contender(
        key="direct",
        label="direct",
        mode="direct",
        identity="none: plain HTTP straight to the backend (the ceiling)",
        notes="no proxies, no TLS",
        build=_direct,
        unavailable=lambda: None,
        is_peer=False,
    ),
    Contender(
        key="ours-tcp",
        label="ours TCP",
        mode="tcp",
        identity="both sides: in-handshake chain check against the peer's own trust "
        "domain + X509-SVID leaf rules + exact SPIFFE ID (--allow / --expect)",
        notes="agent-proxy inbound/outbound; Python, one trio thread each; "
        "audit record per connection to a file",
        build=_ours_tcp,
        unavailable=lambda: None,
        is_peer=False,
        is_ours=True,
    ),
    Contender(
        key="ours-http",
        label="ours HTTP",
        mode="http",
        identity="as ours TCP: inbound rule peers = [client ID] (GET /**), outbound "
        "route expect = [server ID]",
        notes='agent-proxy run --config, protocol = "http" on both sides; pooled mTLS '
        "connections (default pool); audit record per request to a file",
        build=_ours_http,
        unavailable=_ours_http_available,
        is_peer=False,
        is_ours=True,
    ),
    Contender(
        key="stunnel",
        label="stunnel",
        mode="tcp",
        identity="both sides: verifyChain (chain vs CA) + verifyPeer (peer leaf pinned "
        "in CAfile); no URI SAN check exists",
        notes="a thread per connection (no single-worker mode); both processes pinned "
        "to the proxy CPU",
        build=_stunnel,
        unavailable=_needs("stunnel4"),
    ),
    Contender(
        key="haproxy-tcp",
        label="HAProxy TCP",
        mode="tcp",
        identity=f"server side: verify required, {PINNED} (tcp-request session); client "
        f"side: verify required, leaf pinned by tcp-response rule (after the first bytes "
        f"are sent, no pre-send check exists)",
        notes="nbthread 1, mode tcp",
        build=_haproxy("tcp"),
        unavailable=_needs("haproxy"),
    ),
    Contender(
        key="haproxy-http",
        label="HAProxy HTTP",
        mode="http",
        identity="as HAProxy TCP; client side pins via http-response deny",
        notes="nbthread 1, mode http, http-reuse always (pooled mTLS connections)",
        build=_haproxy("http"),
        unavailable=_needs("haproxy"),
    ),
    Contender(
        key="nginx-stream",
        label="nginx stream",
        mode="tcp",
        identity="server side: ssl_verify_client on (chain vs CA) + leaf pinned by "
        "$ssl_client_fingerprint map; client side: NONE (proxy_ssl_verify needs a "
        "DNS name/CN, SVIDs have only a URI SAN) - favours nginx",
        notes="worker_processes 1 (+ idle master)",
        build=_nginx("stream"),
        unavailable=_needs("nginx"),
    ),
    Contender(
        key="nginx-http",
        label="nginx HTTP",
        mode="http",
        identity="server side: ssl_verify_client on + $ssl_client_fingerprint check "
        "(403); client side: NONE (as nginx stream) - favours nginx",
        notes="worker_processes 1 (+ idle master), upstream keepalive 64 (pooled mTLS connections)",
        build=_nginx("http"),
        unavailable=_needs("nginx"),
    ),
)
