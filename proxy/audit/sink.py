"""The audit sink: records to a hash-chained, signed, rotating trail.

Theory of operation.

*Contract for callers.* ``emit(record)`` renders the record and queues it;
it never blocks and never raises. ``commit()`` is the barrier: when it
returns, every record emitted so far has been handed to the kernel by a
completed ``write`` (or the sink is unhealthy, see below). Call it at each
effect point: before a response is released to the client, before an
allowed connection's first byte is relayed, before a refusal is sent or a
connection closed. ``await durable()`` is the stronger barrier for
``durability = "fsync"``: it returns True once the records are fsynced (the
group commit runs every ``fsync_interval``), False if the sink is failing;
a ``high_impact`` request is forwarded only after it returned True. With
``durability = "os"`` it is ``commit()``. ``accepting()`` says whether new
work may be admitted (False only when failing with ``on_failure =
"closed"``); listeners ask it before admitting a connection or a request.

*Coalescing.* A record costs no syscall when emitted. The first barrier of
a scheduler tick writes everything queued, every task's records, in one
``write``; later barriers in the tick find nothing to write. Records no
barrier asked for go out at the end of the tick: a trio instrument flushes
in ``before_io_wait``, which runs once per pass of the run loop.

*Chain.* Lines get ``seq`` and ``prev`` (:mod:`proxy.audit.chain`) when they
are written, not when emitted, so a record dropped in ``open`` mode never
leaves a hole in the chain: an ``audit.gap`` record says how many are
missing and links to the last record that reached the file. Every
``checkpoint_interval``, at rotation and at close, a signed checkpoint seals
the trail; the signer is a callable returning the current SVID key and
chain, so checkpoints follow rotation.

*Failure.* A failed write (ENOSPC, EIO, EBADF...) or a path that no longer
names our file (deleted, directory gone) makes the sink unhealthy: one
error line per incident, ``errors`` counts failed writes. The bytes not yet
written stay queued, byte-exact, so a record half-written before ENOSPC is
finished, never spliced. In ``closed`` mode nothing is dropped (up to
``max_pending_bytes``, past which drops are counted and logged); in
``open`` mode queued records are dropped and counted. A background task
retries every second and the sink recovers by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import structlog

from proxy.audit.chain import CHECKPOINT, GAP, GENESIS, Signer, chained, link, sign_checkpoint
from proxy.audit.files import FileOutput, StreamOutput
from proxy.audit.records import Renderable, rfc3339, utcnow
from proxy.audit.settings import AuditSettings

log = structlog.get_logger("agent_proxy.audit")

_CHECKPOINT_MARK = object()
# One encoder, built once: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


class AuditSink:
    flush_interval = 1.0  # seconds between retries, age and staleness checks

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        settings: AuditSettings | None = None,
        signer: Signer | None = None,
        clock: Callable[[], Any] = utcnow,
        max_pending_bytes: int = 16 << 20,
    ) -> None:
        self.settings = settings or AuditSettings()
        self.signer = signer
        self._clock = clock
        self.max_pending_bytes = max_pending_bytes
        self._out: StreamOutput | FileOutput
        if stream is not None or self.settings.path == "-":
            self._out = StreamOutput(stream if stream is not None else sys.stdout)
        else:
            self._out = FileOutput(self.settings.path)
        self._rotates = isinstance(self._out, FileOutput) and bool(
            self.settings.max_bytes or self.settings.max_age
        )
        self._bodies: list[str | object] = []
        self._bodies_size = 0
        self._buf = bytearray()  # chained bytes not yet written
        self._removed = 0  # bytes ever written: offsets in _ends are absolute
        self._written_in_buf = 0  # bytes at the front of _buf already written
        self._ends: deque[tuple[int, int, str]] = deque()  # (end offset, seq, hash)
        self._seq, self._head = 0, GENESIS  # the chain as queued
        self._w_seq, self._w_head, self._w_end = 0, GENESIS, 0  # as written
        self._synced_seq = 0
        self._sealed_seq = 0
        self._gap = 0
        self._fsync_waiters: list[Any] = []
        self.healthy = True
        self.errors = 0
        self.dropped = 0
        self.records_written = 0
        self.last_error = ""

    # -- opening and closing ------------------------------------------------

    @classmethod
    def open(
        cls,
        target: str | AuditSettings,
        *,
        signer: Signer | None = None,
        clock: Callable[[], Any] = utcnow,
    ) -> AuditSink:
        """``-`` is stdout; anything else is a file opened for append."""
        settings = target if isinstance(target, AuditSettings) else AuditSettings(path=target)
        sink = cls(settings=settings, signer=signer, clock=clock)
        if isinstance(sink._out, FileOutput):
            try:
                sink._open_file()
            except OSError as exc:
                from proxy.errors import UsageError

                raise UsageError(
                    f"cannot open audit log {settings.path!r}: {exc.strerror or exc}"
                ) from exc
        return sink

    def _open_file(self) -> None:
        out = self._out
        assert isinstance(out, FileOutput)
        resume = out.open()
        if resume.foreign:
            # Lines that are no trail of ours (an older format): set them aside
            # rather than chain onto them.
            out.close()
            os.rename(out.path, out.rotate_name(self._clock()) + ".unchained")
            resume = out.open()
        if resume.partial_tail:
            # A crash mid-write left half a line: end it, so the next record
            # starts on a line of its own; verify reports it as truncated.
            os.write(out.fd, b"\n")
            out.size += 1
        if self._w_seq == 0:
            self._seq = self._w_seq = self._sealed_seq = self._synced_seq = resume.seq
            self._head = self._w_head = resume.head

    def close(self) -> None:
        """Seal with a checkpoint, write everything, and close the file."""
        if self._seq + len(self._bodies) > self._sealed_seq:
            self._queue_checkpoint()
        self.flush(retry=True)
        with contextlib.suppress(OSError):
            if self.settings.durability == "fsync":
                self._out.sync()
        with contextlib.suppress(OSError):
            self._out.close()

    # -- the hot path -------------------------------------------------------

    def emit(self, record: Renderable) -> None:
        body = _encode(record.as_dict())
        if not self.healthy and (
            self.settings.on_failure == "open"
            or self._bodies_size + len(self._buf) > self.max_pending_bytes
        ):
            self._drop(1)
            return
        self._bodies.append(body)
        self._bodies_size += len(body)

    def commit(self) -> None:
        """The barrier: every record emitted so far is in the kernel."""
        if self._bodies or len(self._buf) > self._removed:
            self.flush()

    def accepting(self) -> bool:
        return self.healthy or self.settings.on_failure == "open"

    async def durable(self) -> bool:
        self.commit()
        if not self.healthy:
            return False
        if self.settings.durability == "os":
            return True
        import trio

        target = self._w_seq
        while self._synced_seq < target and self.healthy:
            event = trio.Event()
            self._fsync_waiters.append(event)
            await event.wait()
        return self.healthy

    # -- writing ------------------------------------------------------------

    def flush(self, *, retry: bool = False) -> None:
        """Write everything queued. Never raises. While unhealthy only the
        background retry (``retry=True``) touches the file."""
        if not self.healthy and not retry:
            return
        try:
            if retry and self._out.stale():
                raise FileNotFoundError(2, f"{self._out_path()} was removed or replaced")
            self._chain_queued()
            self._write_buf()
            if self._rotates and self._rotation_due(self._out):  # type: ignore[arg-type]
                self._rotate(self._out)  # type: ignore[arg-type]
        except OSError as exc:
            self._failed(exc)
            return
        if not self.healthy:
            self.healthy = True
            log.warning("audit sink recovered", path=self._out_path(), dropped=self.dropped)

    def _chain_queued(self) -> None:
        if not self._bodies and not self._gap:
            return
        if self._gap:
            gap = {"ts": rfc3339(self._clock()), "event": GAP, "dropped": self._gap}
            self._bodies.insert(0, json.dumps(gap, separators=(",", ":")))
            self._gap = 0
        buf, ends = self._buf, self._ends
        base = self._removed - self._written_in_buf  # absolute offset of buf[0]
        seq, head = self._seq, self._head
        for body in self._bodies:
            if body is _CHECKPOINT_MARK:
                self._seq, self._head = seq, head
                body = self._checkpoint_body(seq + 1)
                if body is None:
                    continue
            assert isinstance(body, str)
            seq += 1
            line = chained(body, seq, head)
            head = link(line)
            buf += line
            buf.append(10)
            ends.append((base + len(buf), seq, head))
        self._seq, self._head = seq, head
        self._bodies.clear()
        self._bodies_size = 0

    def _write_buf(self) -> None:
        view_start = self._written_in_buf
        while view_start < len(self._buf):
            if view_start == 0:
                n = self._out.write(self._buf)
            else:
                view = memoryview(self._buf)[view_start:]
                try:
                    n = self._out.write(view)
                finally:
                    view.release()  # a live export would stop _buf from being resized
            view_start += n
            self._written_in_buf = view_start
            self._removed += n
            self._advance_written()
        del self._buf[:]
        self._written_in_buf = 0

    def _advance_written(self) -> None:
        while self._ends and self._ends[0][0] <= self._removed:
            self._w_end, self._w_seq, self._w_head = self._ends.popleft()
            self.records_written += 1

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        self.last_error = exc.strerror or str(exc)
        if self.healthy:
            self.healthy = False
            log.error(
                "audit sink cannot write; "
                + ("refusing new work" if self.settings.on_failure == "closed" else "dropping"),
                path=self._out_path(),
                error=self.last_error,
            )
        if isinstance(self._out, FileOutput) and self._out.stale():
            with contextlib.suppress(OSError):
                self._out.close()
        if self.settings.on_failure == "open":
            self._drop_unwritten()
        for event in self._fsync_waiters:
            event.set()
        self._fsync_waiters.clear()

    def _drop_unwritten(self) -> None:
        """Drop queued records, keeping the rest of one half-written record."""
        keep_to = self._w_end
        if self._removed > self._w_end and self._ends:
            keep_to = self._ends[0][0]  # half-written: its rest must follow
        dropped = sum(1 for end, _, _ in self._ends if end > keep_to)
        dropped += sum(1 for b in self._bodies if b is not _CHECKPOINT_MARK)
        while self._ends and self._ends[-1][0] > keep_to:
            self._ends.pop()
        cut = keep_to - (self._removed - self._written_in_buf)
        del self._buf[max(cut, self._written_in_buf) :]
        self._bodies.clear()
        self._bodies_size = 0
        if self._ends:
            _, self._seq, self._head = self._ends[-1]
        else:
            self._seq, self._head = self._w_seq, self._w_head
        self._drop(dropped)

    def _drop(self, count: int) -> None:
        if count:
            self.dropped += count
            self._gap += count

    def _out_path(self) -> str:
        return self._out.path if isinstance(self._out, FileOutput) else "-"

    # -- checkpoints and rotation --------------------------------------------

    def _queue_checkpoint(self) -> None:
        if self.signer is not None:
            self._bodies.append(_CHECKPOINT_MARK)

    def _checkpoint_body(self, seq: int) -> str | None:
        assert self.signer is not None
        now = self._clock()
        try:
            subject, token = sign_checkpoint(self.signer, seq=seq, head=self._head, now=now)
        except Exception as exc:  # a signer failure leaves records unsealed, never lost
            log.error("cannot sign audit checkpoint", error=str(exc))
            return None
        self._sealed_seq = seq
        body = {
            "ts": rfc3339(now),
            "event": CHECKPOINT,
            "local_id": subject,
            "count": seq - 1,
            "head": self._head,
            "jws": token,
        }
        return json.dumps(body, separators=(",", ":"))

    def _rotation_due(self, out: FileOutput) -> bool:
        s = self.settings
        if s.max_bytes is not None and out.size >= s.max_bytes:
            return True
        if s.max_age is not None and out.size:
            age: float = (self._clock() - out.started).total_seconds()
            return age >= s.max_age
        return False

    def _rotate(self, out: FileOutput) -> None:
        if self._seq > self._sealed_seq:
            self._queue_checkpoint()
        self._chain_queued()
        self._write_buf()
        if self.settings.durability == "fsync":
            out.sync()
            self._synced(self._w_seq)
        out.close()
        rotated = out.rotate_name(self._clock())
        os.rename(out.path, rotated)
        out.open()
        out.started = self._clock()
        for removed in out.prune(self.settings.keep):
            log.info("audit file pruned", path=removed)
        log.info("audit file rotated", path=out.path, rotated=rotated)

    def _synced(self, seq: int) -> None:
        self._synced_seq = max(self._synced_seq, seq)
        for event in self._fsync_waiters:
            event.set()
        self._fsync_waiters.clear()

    # -- background -----------------------------------------------------------

    async def flush_forever(self) -> None:
        """Run while serving: tick flushes, retries, checkpoints, group commit."""
        import trio

        from proxy.audit.tick import TickFlush

        instrument = TickFlush(self)
        trio.lowlevel.add_instrument(instrument)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self._checkpoints)
                if self.settings.durability == "fsync" and isinstance(self._out, FileOutput):
                    nursery.start_soon(self._group_commit, self._out)
        finally:
            with contextlib.suppress(KeyError):
                trio.lowlevel.remove_instrument(instrument)

    async def _housekeeping(self) -> None:
        import trio

        while True:
            await trio.sleep(self.flush_interval)
            if self.healthy and self._out.stale():
                self._failed(FileNotFoundError(2, "the audit file was removed or replaced"))
            if not self.healthy and isinstance(self._out, FileOutput) and self._out.fd < 0:
                try:
                    self._open_file()
                except OSError as exc:
                    self._failed(exc)
                    continue
            self.flush(retry=not self.healthy)

    async def _checkpoints(self) -> None:
        import trio

        while True:
            await trio.sleep(self.settings.checkpoint_interval)
            if self.signer is not None and self._seq > self._sealed_seq:
                self._queue_checkpoint()
                self.flush()

    async def _group_commit(self, out: FileOutput) -> None:
        import trio

        while True:
            await trio.sleep(self.settings.fsync_interval)
            target = self._w_seq
            if target <= self._synced_seq or not self.healthy or out.fd < 0:
                continue
            fd = out.dup()
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            except OSError as exc:
                self._failed(exc)
                continue
            finally:
                os.close(fd)
            self._synced(target)
