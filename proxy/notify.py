"""Readiness notification to a supervisor: ``--ready-fd N`` on run, inbound, outbound.

The supervisor (``agent-proxy launch``, s6's ``notification-fd``, a test)
creates a pipe, hands the write end to the sidecar as descriptor N and reads
the other end. Once every listener is bound, the sidecar writes ``ready\\n``
to N and closes it. Only the process that was handed the descriptor can
write to that pipe, so the supervisor learns that *its own* child is ready;
probing a port cannot tell our sidecar from another process that answers on
it. End of file without ``ready`` means the child died first.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os

from proxy.errors import UsageError

__all__ = ["READY_LINE", "add_flag", "ready", "select"]

READY_LINE = b"ready\n"

_fd: int | None = None


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ready-fd",
        metavar="N",
        default=None,
        help="write 'ready' to inherited file descriptor N once every listener is bound",
    )


def select(value: str | None) -> None:
    """Check that ``--ready-fd`` names an open descriptor, and keep it."""
    global _fd
    _fd = None
    if value is None:
        return
    if not value.isdigit() or int(value) < 3:
        raise UsageError(f"--ready-fd {value!r}: expected a descriptor number of 3 or more")
    fd = int(value)
    try:
        os.fstat(fd)
    except OSError:
        raise UsageError(f"--ready-fd {fd}: not an open file descriptor") from None
    # Keep it from anything we start ourselves.
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    _fd = fd


def ready() -> None:
    """Tell the supervisor we are ready (once; a no-op without ``--ready-fd``)."""
    global _fd
    fd, _fd = _fd, None
    if fd is None:
        return
    try:
        # A supervisor that went away is not our failure: EPIPE is ignored.
        with contextlib.suppress(OSError):
            os.write(fd, READY_LINE)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
