"""W3C Trace Context: ``traceparent`` and ``tracestate`` (pure).

Strict parsing per the W3C Trace Context recommendation: a version-00
``traceparent`` is exactly ``00-<32 hex trace id>-<16 hex parent id>-<2 hex
flags>``, lowercase, neither id all zeros. A higher version (never ``ff``) is
read by its first four fields when what follows them starts with ``-``, as
the spec asks of forward-compatible parsers. Anything else is no trace
context: the caller starts a new trace. A ``tracestate`` that breaks its
grammar (bad key or value, a duplicate key, more than 32 members) is dropped
as a whole, while the ``traceparent`` beside it still counts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

_HEX = re.compile(r"[0-9a-f]+")
_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
# A version-00 traceparent as we and every other hop write it: taken in one
# match (parse_traceparent's full reading still decides everything else).
_V00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
MAX_MEMBERS = 32
SAMPLED = 0x01


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 lowercase hex
    span_id: str  # 16 lowercase hex: the span this context names
    flags: int = SAMPLED
    tracestate: tuple[tuple[str, str], ...] = ()

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self) -> TraceContext:
        """A new span in the same trace (our hop), keeping flags and state."""
        return TraceContext(self.trace_id, new_span_id(), self.flags, self.tracestate)


def _hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX.fullmatch(text) is not None and text != "0" * length


def parse_traceparent(value: str | bytes) -> TraceContext | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if (common := _V00.fullmatch(value)) is not None:
        trace_id, span_id, flags = common.groups()
        if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
            return TraceContext(trace_id, span_id, int(flags, 16))
    value = value.strip(" \t")
    if len(value) < 55:
        return None
    version = value[:2]
    if _HEX.fullmatch(version) is None or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    parts = value[:55].split("-")
    if len(parts) != 4:
        return None
    _, trace_id, span_id, flags = parts
    if not (_hex(trace_id, 32) and _hex(span_id, 16)):
        return None
    if len(flags) != 2 or _HEX.fullmatch(flags) is None:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16) & 0xFF)


def parse_tracestate(values: Iterable[str | bytes]) -> tuple[tuple[str, str], ...] | None:
    """Every ``tracestate`` header, combined in order; None when invalid."""
    members: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in values:
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        for item in text.split(","):
            item = item.strip(" \t")
            if not item:
                continue  # empty list members are allowed
            key, sep, val = item.partition("=")
            if not sep or _KEY.fullmatch(key) is None or _VALUE.fullmatch(val) is None:
                return None
            if key in seen:
                return None
            seen.add(key)
            members.append((key, val))
    if len(members) > MAX_MEMBERS:
        return None
    return tuple(members)


def format_tracestate(members: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{key}={value}" for key, value in members)


# Ids are random, not secret (the OpenTelemetry SDK makes its own the same
# way): random.getrandbits costs no syscall, os.urandom one per id, and each
# request makes up to two.
def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def new_trace(sampled: bool = True) -> TraceContext:
    return TraceContext(new_trace_id(), new_span_id(), SAMPLED if sampled else 0)


def incoming(
    headers: Iterable[tuple[bytes, bytes]], *, names_lowered: bool = False
) -> TraceContext | None:
    """The caller's trace context from request headers; None when absent or
    invalid (then a new trace starts). Two ``traceparent`` headers are
    ambiguous, hence invalid. ``names_lowered``: the names are lower-case
    already (a request's fields), not lowered again."""
    parents: list[bytes] = []
    states: list[bytes] = []
    for name, value in headers:
        lowered = name if names_lowered else name.lower()
        if lowered == b"traceparent":
            parents.append(value)
        elif lowered == b"tracestate":
            states.append(value)
    if len(parents) != 1:
        return None
    parent = parse_traceparent(parents[0])
    if parent is None:
        return None
    if not states:
        return parent  # tracestate () already
    state = parse_tracestate(states)
    return TraceContext(parent.trace_id, parent.span_id, parent.flags, state or ())


def outgoing(ctx: TraceContext) -> list[tuple[bytes, bytes]]:
    """Headers naming ``ctx`` as the parent of the next hop."""
    headers = [(b"traceparent", ctx.traceparent().encode())]
    if ctx.tracestate:
        headers.append((b"tracestate", format_tracestate(ctx.tracestate).encode()))
    return headers
