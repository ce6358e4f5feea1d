"""The state of the reactor's pairs (proxy/runtime/reactor.py): what a
pair moved and why it ended, its two directions, and the write deadline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.tls.raw_io import End


@dataclass
class RelayResult:
    """Why a pair ended and what it moved. ``bytes_up`` were read from the
    first side (the accepted one) and sent to the second, ``bytes_down``
    the other way. ``truncated`` names the TLS sides that ended without
    close_notify (read as EOF)."""

    reason: str = "closed"
    bytes_up: int = 0
    bytes_down: int = 0
    truncated: list[str] = field(default_factory=list)
    detail: str | None = None  # for resets: the error (a TLS alert names itself)
    stalled: str | None = None  # for write_timeout: the side that stopped reading


class _Flow:
    """One direction of a pair: bytes read from ``src`` are sent to ``dst``."""

    __slots__ = ("blocked_since", "done", "dst", "eof", "left", "pending", "pending_ptr",
                 "read_at", "shut_pending", "src", "upward")  # fmt: skip

    def __init__(self, src: End, dst: End, upward: bool) -> None:
        self.src, self.dst, self.upward = src, dst, upward
        self.pending: memoryview | None = None  # unsent bytes (a copy)
        self.pending_ptr: Any = None
        self.blocked_since: float | None = None
        self.eof = False  # src ended
        self.shut_pending = False  # the EOF still has to reach dst
        self.done = False  # EOF passed on (a transfer: its bytes all moved)
        # A transfer's bytes still to move (None: a relay, until EOF) and
        # when it last read any (its idle deadline counts from there).
        self.left: int | None = None
        self.read_at = 0.0


class _Pair:
    __slots__ = ("a", "b", "done", "down", "result", "up", "wakeup")

    def __init__(self, a: End, b: End, result: RelayResult) -> None:
        self.a, self.b, self.result = a, b, result
        self.up, self.down = _Flow(a, b, True), _Flow(b, a, False)
        a.src_of, a.out, b.src_of, b.out = self.up, self.down, self.down, self.up
        a.pair = b.pair = self
        self.done = trio.Event()
        self.wakeup = trio.Event()  # set when the owning task should look again

    def unlink(self) -> None:
        """Cut the ends' links back to their flows and pair once it ended:
        without a cycle the sockets, SSL objects and events go when the
        caller drops them, not at a later garbage collection (the passes
        one cycle per connection set off took 2-4% of a new connection's time)."""
        for end in (self.a, self.b):
            end.src_of = end.out = end.pair = None


def _since(flow: _Flow) -> float:
    return math.inf if flow.blocked_since is None else flow.blocked_since


def _write_deadline(pair: _Pair, write_timeout: float | None) -> float:
    if write_timeout is None:
        return math.inf
    blocked = [f.blocked_since for f in (pair.up, pair.down) if f.blocked_since is not None]
    return min(blocked) + write_timeout if blocked else math.inf
