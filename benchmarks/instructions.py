"""Instructions per connection and per request: ``python -m benchmarks.instructions``.

Wall-clock cells on a shared machine move by tens of percent from run to
run; an instruction count moves far less (valgrind's callgrind counts the
same total for the same code and inputs). Far less is not nothing: the
per-request row moved between 869K and 984K in five runs of one checkout,
because whether a read finds its bytes at once or waits for them depends
on timing, and a wait costs trio's scheduling. So read an A/B of a change
to the per-connection or per-request path here, from alternating runs of
each checkout, and trust only a difference larger than that spread.
Our inbound runs under callgrind while this process is its peer: N
sequential full mTLS handshakes, each closed at once as ``openssl
s_time -new`` does (TCP mode); then N keep-alive GETs on one connection
(HTTP mode), a twentieth as many 1 MiB answers (the body path), and N
MCP ``tools/call`` POSTs to an ``mcp`` listener that judges each call.
Then our outbound runs under callgrind in front of an inbound that runs
plainly: N plain connections, each a new mTLS
connection upstream, as in the bench's new-connection row. Each figure
is the difference between a short and a long run over the extra work, so
start-up and shutdown cancel out. Callgrind runs Python some 50 times
slower: about four minutes in all.
It measures the checkout it is run from (``python -m proxy`` with this
checkout first on PYTHONPATH), with a minimal in-process target, so the
numbers are ours alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.fixtures import (
    CLIENT_ID,
    MCP_CALL,
    MCP_HEADERS,
    MCP_PATH,
    MCP_RESULT,
    SERVER_ID,
    Identities,
    l4_argv,
    make_identities,
)
from benchmarks.harness import BenchError, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 64
_REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
# The body row's answer: 1 MiB, as the bench's "1 MiB responses" row.
_MIB_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nContent-Type: application/octet-stream"
    b"\r\n\r\n" + os.urandom(1 << 20)
)
_MIB_REQUEST = b"GET /mib HTTP/1.1\r\nHost: bench\r\n\r\n"
# The MCP row: the bench's tools/call and its answer, judged per call.
_MCP_HEADER_LINES = "".join(f"{line}\r\n" for line in MCP_HEADERS)
_MCP_REQUEST = (
    f"POST {MCP_PATH} HTTP/1.1\r\nHost: bench\r\n{_MCP_HEADER_LINES}"
    f"Content-Length: {len(MCP_CALL)}\r\n\r\n{MCP_CALL}"
).encode()
_MCP_HEAD = f"POST {MCP_PATH} ".encode()  # how the target knows a tools/call
_MCP_ANSWER = (
    f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(MCP_RESULT)}"
    f"\r\n\r\n{MCP_RESULT}"
).encode()


class _Target(socketserver.BaseRequestHandler):
    """The inbound's target: answers every request with 64 bytes (``GET
    /mib``: 1 MiB; a POST to the MCP path: the JSON-RPC result, once its
    body is in), until the connection ends (a TCP-mode handshake sends
    nothing)."""

    def handle(self) -> None:
        pending = b""
        while data := self.request.recv(65536):
            pending += data
            while b"\r\n\r\n" in pending:
                head, rest = pending.split(b"\r\n\r\n", 1)
                size = _content_length(head) or 0
                if len(rest) < size:
                    break  # the body is still coming
                pending = rest[size:]
                if head.startswith(b"GET /mib "):
                    self.request.sendall(_MIB_ANSWER)
                elif head.startswith(_MCP_HEAD):
                    self.request.sendall(_MCP_ANSWER)
                else:
                    self.request.sendall(_ANSWER)


def _content_length(head: bytes) -> int | None:
    found = re.search(rb"(?im)^content-length: *(\d+)", head)
    return int(found.group(1)) if found else None


def _client_context(ids: Identities) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SVIDs carry a URI SAN only; the chain is still verified
    ctx.load_verify_locations(str(ids.client.bundle))
    ctx.load_cert_chain(str(ids.client.cert), str(ids.client.key))
    return ctx


def _handshakes(ctx: ssl.SSLContext, port: int, n: int) -> None:
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            ctx.wrap_socket(sock).close()


def _requests(ctx: ssl.SSLContext, port: int, n: int, *, request: bytes = _REQUEST) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        pending = b""
        for i in range(n):
            tls.sendall(request)
            while b"\r\n\r\n" not in pending:
                pending += _more(tls, i, pending)
            head, pending = pending.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"request {i}: {head[:120]!r}")
            size = _content_length(head)
            if size is None:
                raise BenchError(f"request {i}: no Content-Length in {head[:200]!r}")
            while len(pending) < size:
                pending += _more(tls, i, pending)
            pending = pending[size:]


def _mib_requests(ctx: ssl.SSLContext, port: int, n: int) -> None:
    _requests(ctx, port, n, request=_MIB_REQUEST)


def _mcp_requests(ctx: ssl.SSLContext, port: int, n: int) -> None:
    _requests(ctx, port, n, request=_MCP_REQUEST)


def _more(tls: ssl.SSLSocket, i: int, got: bytes) -> bytes:
    data = tls.recv(1 << 20)
    if not data:
        raise BenchError(f"the inbound closed after {i} requests: {got[:120]!r}")
    return data


def _plain(ctx: ssl.SSLContext, port: int, n: int) -> None:
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass


def _outbound_argv(root: Path, ids: Identities, port: int, upstream: int) -> list[str]:
    return l4_argv("outbound", port, upstream, ids.client, ids.client.bundle,
                   ["--expect", SERVER_ID], root / f"audit-{port}.jsonl")  # fmt: skip


_HTTP_RULE = 'methods = ["GET"]\npaths = ["/**"]'
_MCP_RULE = 'tools = ["read_*"]'  # as the bench's mcp listener: every call judged


def _http_config(
    root: Path, ids: Identities, port: int, target: int, *, protocol: str = "http",
    rule: str = _HTTP_RULE,
) -> list[str]:  # fmt: skip
    path = root / f"inbound-{port}.toml"
    path.write_text(f"""\
log_level = "warning"
[identity]
source = "files"
cert = "{ids.server.cert}"
key = "{ids.server.key}"
bundle = "{ids.server.bundle}"
[admin]
enabled = false
[audit]
path = "{root / f"audit-{port}.jsonl"}"
[[inbound]]
name = "bench-in"
protocol = "{protocol}"
listen = "127.0.0.1:{port}"
target = "127.0.0.1:{target}"
[[inbound.rules]]
peers = ["{CLIENT_ID}"]
{rule}
""")
    return ["run", "--config", str(path)]


def _mcp_config(root: Path, ids: Identities, port: int, target: int) -> list[str]:
    return _http_config(root, ids, port, target, protocol="mcp", rule=_MCP_RULE)


def _tcp_argv(root: Path, ids: Identities, port: int, target: int) -> list[str]:
    return l4_argv("inbound", port, target, ids.server, ids.server.bundle,
                   ["--allow", CLIENT_ID], root / f"audit-{port}.jsonl")  # fmt: skip


def _start(argv: list[str], callgrind: list[str]) -> subprocess.Popen[bytes]:
    """``python -m proxy ARGV`` from this checkout, under ``callgrind`` if given."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.Popen(
        [*callgrind, sys.executable, "-m", "proxy", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip


def _ready(proc: subprocess.Popen[bytes], port: int) -> None:
    def alive() -> None:
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise BenchError(f"agent-proxy exited: {proc.stderr.read()[-400:]!r}")

    wait_for_port(port, 300, alive)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # a clean exit: callgrind writes its counts then
    try:
        proc.wait(300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise BenchError("agent-proxy did not stop within 300 s of SIGINT") from None


def _count(
    root: Path,
    valgrind: str,
    argv: list[str],
    port: int,
    drive: Callable[[], None],
) -> int:
    """Instructions of one run of a sidecar (start-up, ``drive()``, shutdown)."""
    out = root / f"callgrind-{port}.out"
    proc = _start(argv, [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"])
    try:
        _ready(proc, port)
        drive()
    finally:
        _stop(proc)
    found = re.search(rb"^summary: (\d+)", out.read_bytes(), re.M) if out.exists() else None
    if found is None:
        raise BenchError(f"no callgrind totals in {out}")
    return int(found.group(1))


_ROWS = ("tcp", "http", "mib", "mcp", "outbound")  # the rows main() counts, in its order


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    p.add_argument("--handshakes", type=int, default=200, help="extra handshakes (200)")
    p.add_argument("--requests", type=int, default=1000, help="extra keep-alive requests (1000)")
    p.add_argument(
        "--only",
        default=",".join(_ROWS),
        help="comma-separated rows to count: tcp (inbound handshakes), http (inbound "
        "keep-alive requests), mib (inbound keep-alive 1 MiB responses, a twentieth as "
        "many), mcp (inbound keep-alive MCP tools/call requests, each judged), outbound (outbound "
        "connections); default all five",
    )
    args = p.parse_args()
    only = [key.strip() for key in args.only.split(",") if key.strip()]
    if not only or not set(only) <= set(_ROWS):
        p.error(f"--only: choose from {', '.join(_ROWS)} (got {args.only!r})")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    root = Path(tempfile.mkdtemp(prefix="agent-proxy-instructions-"))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Target)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = server.server_address[1]
    try:
        ids = make_identities(root / "pki")
        ctx = _client_context(ids)
        upstream = free_port()  # a plain inbound, the outbound's upstream
        inbound = _start(_tcp_argv(root, ids, upstream, target), [])
        try:
            _ready(inbound, upstream)
            rows = {  # keyed as _ROWS
                "tcp": ("TCP inbound, per full mTLS handshake", _tcp_argv, target, _handshakes,
                        args.handshakes, 50),
                "http": ("HTTP inbound, per keep-alive request", _http_config, target, _requests,
                         args.requests, 200),
                "mib": ("HTTP inbound, per keep-alive 1 MiB response", _http_config, target,
                        _mib_requests, max(args.requests // 20, 1), 10),
                "mcp": ("MCP inbound, per keep-alive tools/call (judged)",
                        _mcp_config, target,
                        _mcp_requests, args.requests, 200),
                "outbound": ("TCP outbound, per connection (a new mTLS one upstream)",
                             _outbound_argv, upstream, _plain, args.handshakes, 50),
            }  # fmt: skip
            for label, build, far, drive, extra, base in (rows[key] for key in only):
                counts = []
                for n in (base, base + extra):
                    port = free_port()
                    started = time.monotonic()
                    argv = build(root, ids, port, far)
                    counts.append(_count(root, valgrind, argv, port, partial(drive, ctx, port, n)))
                    print(f"  {label}: {n} in {time.monotonic() - started:.0f} s", file=sys.stderr)
                print(f"{label}: {(counts[1] - counts[0]) / extra:,.0f} instructions")
        finally:
            _stop(inbound)
    except BenchError as exc:
        raise SystemExit(f"instructions: {exc}") from None
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
