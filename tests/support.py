"""Helpers for tests that drive real processes and real sockets.

Nothing here sleeps to wait: we wait for a line, a port or an event, each
with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

DEADLINE = 15.0


def require_binary(name: str) -> str:
    """A peer binary, or skip; under CI=true a missing binary fails the test."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required for this interop test (CI=true)")
        pytest.skip(f"{name} not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"{host}:{port} did not open within {deadline}s") from None
            # A connect attempt is the event we wait for; back off briefly
            # between attempts so we do not spin.
            threading.Event().wait(0.02)


class LineReader:
    """Reads a pipe on a thread; tests wait for lines with a deadline."""

    def __init__(self, pipe: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe: Any) -> None:
        for raw in iter(pipe.readline, ""):
            self.lines.put(raw.rstrip("\n"))
        pipe.close()

    def all_lines(self) -> list[str]:
        """Every line read so far, consumed by waits or not."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return list(self.seen)

    def wait_for(
        self, predicate: Any, deadline: float = DEADLINE, *, search_seen: bool = False
    ) -> str:
        """The next line matching ``predicate``; with ``search_seen``, also
        lines already consumed by earlier waits (for one-off events)."""
        if search_seen:
            for line in self.seen:
                if predicate(line):
                    return line
        end = time.monotonic() + deadline
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching line within {deadline}s; saw: {self.seen[-10:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line

    def wait_json(
        self, deadline: float = DEADLINE, search_seen: bool = False, **fields: Any
    ) -> dict[str, Any]:
        def match(line: str) -> bool:
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            return isinstance(obj, dict) and all(obj.get(k) == v for k, v in fields.items())

        return dict(json.loads(self.wait_for(match, deadline, search_seen=search_seen)))


def agent_proxy_cmd() -> list[str]:
    return [sys.executable, "-m", "proxy"]


class ProxyProcess:
    """``agent-proxy`` as a subprocess: audit on stdout, logs on stderr."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*agent_proxy_cmd(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.audit = LineReader(self.proc.stdout)
        self.logs = LineReader(self.proc.stderr)
        self.address: tuple[str, int] | None = None

    def wait_listening(self) -> tuple[str, int]:
        line = self.logs.wait_json(event="listening")
        host, _, port = line["address"].rpartition(":")
        self.address = (host.strip("[]"), int(port))
        return self.address

    def wait_listener(self, name: str) -> tuple[str, int]:
        """The bound address of the listener called ``name`` (admin: "admin")."""
        if name == "admin":
            line = self.logs.wait_json(event="admin listening", search_seen=True)
        else:
            line = self.logs.wait_json(event="listening", listener=name, search_seen=True)
        host, _, port = line["address"].rpartition(":")
        return host.strip("[]"), int(port)

    def stop(self, sig: int = signal.SIGTERM, deadline: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


class _ThreadedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on loopback that passes half-close on."""
    server = _ThreadedServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", int(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()


def write_identity(directory: Path, issued: Any, bundle: bytes) -> dict[str, str]:
    cert, key = issued.write(directory, bundle)
    return {"cert": str(cert), "key": str(key), "bundle": str(directory / "bundle.pem")}
