"""Writing files so that nobody sees them half-written or too readable.

Theory of operation: a file is written to a fresh temporary name in the
same directory, created with ``O_CREAT | O_EXCL`` and its final mode, so a
private key is 0600 from its very first byte (never world-readable, not even
between ``open`` and ``chmod``). The data is flushed with ``fsync`` and the
temporary file is renamed over the target with ``os.replace``, which is
atomic on POSIX: a watcher sees either the old file or the complete new one.
The directory is fsynced afterwards so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["ensure_private_dir", "write_atomic"]

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and missing parents) with mode 0700 if missing.

    An existing directory is left as it is: the operator chose its mode.
    """
    # Path.mkdir applies ``mode`` only to the last component; parents get the
    # umask default, which is what `mkdir -p -m 700` does too.
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if not directory.is_dir():  # pragma: no cover - mkdir raised already
        raise NotADirectoryError(str(directory))


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, with permissions ``mode``.

    Raises :class:`OSError` on failure; the temporary file is removed and an
    existing ``path`` is left untouched.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    # Safe: the file is created with ``mode`` (at most narrowed by the umask),
    # so a private key is never readable by others at any moment.
    fd = os.open(tmp, flags, mode)
    try:
        try:
            # The umask may have narrowed the mode (e.g. 0644 -> 0600 under
            # umask 077); set exactly what the caller asked for.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. platforms without dir fds
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)
