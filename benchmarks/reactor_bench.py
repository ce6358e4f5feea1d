"""CPU of moving bytes through one TLS<->plain pair: ``python -m benchmarks.reactor_bench``.

The relay under test runs in this process; the peers run in a child process
(a TLS client on Python's ssl, and a plain TCP target), so only the relay's
own CPU is counted (getrusage around the transfer). Variants:

- ``reactor``: proxy/runtime/reactor.py, SSL_read/SSL_write through cffi
  into the one scratch buffer;
- ``reactor-pyopenssl``: the same reactor through pyOpenSSL's
  ``recv_into``/``send`` (which allocate per call);
- ``trio-relay``: today's path, proxy/runtime/relay.py over
  proxy.tls.TLSStream (memory BIOs on main at the time of writing).

Each variant moves ``--mib`` MiB up (client to target), then down, over a
fresh connection, after one TLS 1.3 handshake, then ``--exchanges`` round
trips of a 100-byte request and a 200-byte answer (the keep-alive shape):
relay CPU per round trip.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio

from proxy.runtime.reactor import open_reactor
from proxy.runtime.relay import RelayStats, relay
from tests.integration.reactor_support import _CA, CLIENT, SERVER, SockTls

CHUNK = 65536


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the peer process ---------------------------------------------------------


def peer(relay_port: int, direction: str, total: int, pem: str) -> None:
    """Target: accept one plain connection (its port goes to stdout). Client:
    TLS to the relay. Move ``total`` bytes ``direction`` ("up": client to
    target), then close."""
    target = socket.create_server(("127.0.0.1", 0))
    print(target.getsockname()[1], flush=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(f"{pem}/ca.pem")
    ctx.load_cert_chain(f"{pem}/client.pem", f"{pem}/client.key")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection(("127.0.0.1", relay_port))
    client = ctx.wrap_socket(raw)
    conn, _ = target.accept()
    if direction == "pingpong":
        # ``total`` exchanges of a 100-byte request and a 200-byte answer.
        request, answer = b"q" * 100, b"a" * 200
        for _ in range(total):
            client.sendall(request)
            _recv_exactly(conn, len(request))
            conn.sendall(answer)
            _recv_exactly(client, len(answer))
        for s in (client, conn):
            s.close()
        return
    src, dst = (client, conn) if direction == "up" else (conn, client)
    payload = memoryview(bytearray(os.urandom(CHUNK)))
    got = [0]

    def sink() -> None:
        buf = bytearray(1 << 20)
        while got[0] < total:
            n = dst.recv_into(buf)
            if not n:
                break
            got[0] += n

    reader = threading.Thread(target=sink)
    reader.start()
    sent = 0
    while sent < total:
        sent += src.send(payload[: min(CHUNK, total - sent)])
    reader.join()
    if got[0] != total:
        raise SystemExit(f"peer: moved {got[0]} of {total} bytes")
    for s in (client, conn):
        s.close()


def _recv_exactly(sock: socket.socket, n: int) -> None:
    while n:
        got = len(sock.recv(n))
        if not got:
            raise SystemExit("peer: connection closed mid-exchange")
        n -= got


# -- the relay under test ------------------------------------------------------


async def measure(variant: str, direction: str, total: int, pem: Path) -> tuple[float, float]:
    """(relay CPU seconds, wall seconds) to move ``total`` bytes."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    argv = [sys.executable, "-m", "benchmarks.reactor_bench", "--peer", str(port), direction,
            str(total), str(pem)]  # fmt: skip
    child = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        with trio.fail_after(30):
            target_port = int(await child.stdout.receive_some(100))
            accepted = await listener.accept()
        target = await trio.open_tcp_stream("127.0.0.1", target_port)
        if variant == "trio-relay":
            from proxy.tls import TLSStream
            from tests.integration.tls_support import side

            tls_side = side(SERVER, (_CA,), ["spiffe://reactor.test/**"], server=True)
            tls = TLSStream(accepted, tls_side)
            await tls.do_handshake()
            cpu0, t0 = _cpu(), time.perf_counter()
            await relay(tls, target, RelayStats())
        else:
            sock_tls = SockTls.over(accepted, server=True)
            await sock_tls.handshake()
            async with open_reactor(use_cffi=variant == "reactor") as reactor:
                cpu0, t0 = _cpu(), time.perf_counter()
                await reactor.relay(sock_tls, target)
        cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    finally:
        with trio.move_on_after(30):
            await child.wait()
        child.kill()
        await listener.aclose()
    return cpu, wall


def _write_pem(d: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    (d / "ca.pem").write_bytes(_CA.cert.public_bytes(serialization.Encoding.PEM))
    (d / "client.pem").write_bytes(CLIENT.cert_pem())
    (d / "client.key").write_bytes(CLIENT.key_pem())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.reactor_bench", description=__doc__)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--variants", default="reactor,reactor-pyopenssl,trio-relay")
    p.add_argument("--exchanges", type=int, default=3000, help="request/answer round trips")
    args = p.parse_args()
    total = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp)
        _write_pem(pem)
        print(f"load average {os.getloadavg()[0]:.2f}; {args.mib} MiB per direction\n")
        print("| variant | bulk up: CPU s/GiB, MB/s | bulk down: CPU s/GiB, MB/s "
              "| 100 B / 200 B round trip: relay CPU µs, round trips/s |")  # fmt: skip
        print("|---|---|---|---|")
        for variant in args.variants.split(","):
            cells = []
            for direction in ("up", "down"):
                cpu, wall = trio.run(measure, variant, direction, total, pem)
                cells.append(f"{cpu / total * (1 << 30):.2f}, {total / wall / 1e6:.0f}")
            n = args.exchanges
            cpu, wall = trio.run(measure, variant, "pingpong", n, pem)
            cells.append(f"{cpu / n * 1e6:.1f}, {n / wall:.0f}")
            print(f"| {variant} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
