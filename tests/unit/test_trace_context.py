"""W3C traceparent/tracestate: strict parsing, generation, propagation."""

from __future__ import annotations

import pytest

from proxy.tracing import (
    TraceContext,
    incoming,
    new_trace,
    outgoing,
    parse_traceparent,
    parse_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_valid_traceparent() -> None:
    ctx = parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert ctx == TraceContext(TRACE, SPAN, 1)
    assert ctx.sampled and ctx.traceparent() == f"00-{TRACE}-{SPAN}-01"
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00").sampled is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"00-{TRACE}-{SPAN}",  # no flags
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE.upper()}-{SPAN}-01",  # uppercase hex
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"0g-{TRACE}-{SPAN}-01",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE}-{SPAN}-0x",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE}-{SPAN}-01".replace("-", " ", 1),
        f"01-{TRACE}-{SPAN}-01x",  # a future version must continue with "-"
        b"\xff\xfe",
    ],
)
def test_invalid_traceparent(value: str | bytes) -> None:
    assert parse_traceparent(value) is None


def test_future_version_reads_the_first_four_fields() -> None:
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-the-future-holds") == TraceContext(
        TRACE, SPAN, 1
    )


def test_tracestate() -> None:
    assert parse_tracestate(["rojo=00f067aa0ba902b7, congo=t61rcWkgMzE", "tenant@vendor=x"]) == (
        ("rojo", "00f067aa0ba902b7"),
        ("congo", "t61rcWkgMzE"),
        ("tenant@vendor", "x"),
    )
    assert parse_tracestate(["a=1,,b=2"]) == (("a", "1"), ("b", "2"))  # empty members allowed


@pytest.mark.parametrize(
    "value",
    [
        "a=1,a=2",
        "A=1",
        "a",
        "=1",
        "a=1=2",
        "a=b,c",
        "a=x\x7f",
        "1a=2",
        ",".join(f"k{i}=v" for i in range(33)),
    ],
)
def test_invalid_tracestate(value: str) -> None:
    assert parse_tracestate([value]) is None


def test_incoming_and_outgoing() -> None:
    headers = [(b"Traceparent", f"00-{TRACE}-{SPAN}-01".encode()), (b"tracestate", b"rojo=1")]
    ctx = incoming(headers)
    assert ctx == TraceContext(TRACE, SPAN, 1, (("rojo", "1"),))
    hop = ctx.child()
    assert hop.trace_id == TRACE and hop.span_id != SPAN and len(hop.span_id) == 16
    assert outgoing(hop) == [
        (b"traceparent", f"00-{TRACE}-{hop.span_id}-01".encode()),
        (b"tracestate", b"rojo=1"),
    ]
    # An invalid tracestate is dropped; the traceparent still counts.
    assert incoming(
        [(b"traceparent", f"00-{TRACE}-{SPAN}-01".encode()), (b"tracestate", b"A=1")]
    ) == TraceContext(TRACE, SPAN, 1)
    # Two traceparent headers are ambiguous: a new trace starts.
    assert incoming([*headers, (b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())]) is None
    assert incoming([]) is None


def test_new_trace_is_valid() -> None:
    ctx = new_trace()
    assert parse_traceparent(ctx.traceparent()) == ctx


def _spec_reading(value: str) -> TraceContext | None:
    """The W3C reading, written out plainly: what the one-match shortcut
    for common version-00 values must agree with."""
    value = value.strip(" \t")
    hexdigits = set("0123456789abcdef")
    if len(value) < 55 or not set(value[:2]) <= hexdigits or value[:2] == "ff":
        return None
    if (value[:2] == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-"):
        return None
    parts = value[:55].split("-")
    if len(parts) != 4:
        return None
    _, trace, span, flags = parts
    for text, size in ((trace, 32), (span, 16), (flags, 2)):
        if len(text) != size or not set(text) <= hexdigits:
            return None
    if trace == "0" * 32 or span == "0" * 16:
        return None
    return TraceContext(trace, span, int(flags, 16))


@pytest.mark.parametrize("version", ["00", "01", "ff", "0g"])
@pytest.mark.parametrize("trace", [TRACE, "0" * 32, TRACE.upper(), TRACE[:-1]])
@pytest.mark.parametrize("span", [SPAN, "0" * 16, SPAN + "a"])
@pytest.mark.parametrize("flags", ["01", "00", "ff", "0x", "1"])
@pytest.mark.parametrize("around", [("", ""), (" ", "\t"), ("", "-extra"), ("", "\n")])
def test_traceparent_reading_agrees_with_the_spec(
    version: str, trace: str, span: str, flags: str, around: tuple[str, str]
) -> None:
    value = f"{around[0]}{version}-{trace}-{span}-{flags}{around[1]}"
    assert parse_traceparent(value) == _spec_reading(value)
    assert parse_traceparent(value.encode()) == _spec_reading(value)
