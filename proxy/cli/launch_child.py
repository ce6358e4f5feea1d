"""The sidecar as ``agent-proxy launch`` runs it: a child process with a
readiness pipe (``run --ready-fd N``) and a stderr the launcher forwards.

Only this child holds the pipe's write end (``pass_fds``; the launcher
closes its copy at once), so ``ready`` on it, or end of file, can only come
from our own sidecar. Its stderr is always JSON (``--log-format json``):
the launcher reads the ``listening`` events for bound addresses, keeps the
last non-JSON line as the child's error, and forwards every line, rendered
for the console when the launcher's own logs are.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from proxy import logs, notify

__all__ = ["SidecarChild", "die_with_parent", "exit_fd"]


def exit_fd(proc: subprocess.Popen[bytes]) -> int:
    """A descriptor that becomes readable when ``proc`` exits."""
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            return os.pidfd_open(proc.pid)
    r, w = os.pipe()

    def wait() -> None:
        proc.wait()
        os.write(w, b"x")
        os.close(w)

    threading.Thread(target=wait, name=f"wait-{proc.pid}", daemon=True).start()
    return r


def die_with_parent() -> Callable[[], None] | None:
    """A preexec hook so the sidecar gets SIGTERM if the launcher is killed
    outright (Linux ``PR_SET_PDEATHSIG``). The libc lookup happens here, in
    the parent; the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


class SidecarChild:
    """The sidecar process, its readiness pipe and what its log lines told us."""

    def __init__(self, config_path: str) -> None:
        ready_r, ready_w = os.pipe()
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [
                    *(sys.executable, "-m", "proxy", "run", "--config", config_path),
                    *("--ready-fd", str(ready_w), "--log-format", "json"),
                ],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(ready_w,),
                process_group=0,
                # preexec_fn is unsafe with threads; the launcher has none yet.
                preexec_fn=die_with_parent(),
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            # Only the child may hold the write end: then end of file on
            # ready_r means the child is gone.
            os.close(ready_w)
        self.ready_fd = ready_r
        os.set_blocking(ready_r, False)
        self._ready_buffer = b""
        self.ready = False
        assert self.proc.stderr is not None
        self.stderr_fd = self.proc.stderr.fileno()
        os.set_blocking(self.stderr_fd, False)
        self._partial = b""
        self.last_error: str | None = None
        self.listening: dict[str, str] = {}
        self._console = logs.current_format() == "console"

    def read_ready(self) -> bool:
        """Read the readiness pipe; False at end of file."""
        try:
            data = os.read(self.ready_fd, 64)
        except BlockingIOError:
            return True
        self._ready_buffer = (self._ready_buffer + data)[-64:]
        if notify.READY_LINE in self._ready_buffer:
            self.ready = True
        return bool(data)

    def read_stderr(self) -> bool:
        """Forward what the sidecar wrote; False at end of file."""
        try:
            data = os.read(self.stderr_fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            if self._partial:
                self._line(self._partial)
                self._partial = b""
            return False
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line)
        return True

    def _line(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            obj = None
            if raw.strip():
                self.last_error = raw.decode("utf-8", "replace").strip()
        out = raw
        if obj is not None and self._console:
            out = logs.render_event(obj).encode("utf-8", "replace")
        # A closed stderr (``... 2>&1 | head``) must not end supervision:
        # keep reading, so the sidecar never blocks on a full pipe.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            sys.stderr.buffer.write(out + b"\n")
            sys.stderr.buffer.flush()
        if obj is None:
            return
        event, address = obj.get("event"), obj.get("address")
        if event == "listening" and isinstance(address, str):
            self.listening[str(obj.get("listener"))] = address
