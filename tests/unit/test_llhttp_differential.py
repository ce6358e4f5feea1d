"""Differential fuzz: the llhttp parser never accepts what the h11 oracle
(tests/unit/h11_oracle.py) rejects, and where both accept they frame the
same messages (heads, body bytes, trailers, boundaries, what is left).

The byte streams are valid and near-valid HTTP/1.1 (smuggling vectors,
bad line endings, obs-fold, odd tokens, huge heads, pipelining), fed in
random splits. ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) runs many more
examples than the default smoke budget of ``make test``.

Where llhttp is *stricter* than the oracle the disagreement is allowed only
for the reasons in ``STRICTER`` (and, in responses, for loose line endings).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import NEED_DATA, Body, End, Head, ParseError, ParserLimits, Role
from tests.unit.h11_oracle import H11Oracle

_BUDGET = {"smoke": 80, "ci": 1000, "long": 20000, "fuzz": 20000}
_EXAMPLES = _BUDGET.get(os.environ.get("HYPOTHESIS_PROFILE", "smoke"), 80)
LIMITS = ParserLimits(max_header_bytes=2048, max_headers=24)

# Where llhttp may refuse what h11 accepts: its closed method list, its URL
# and chunk-extension grammars (h11 takes ";.*"), chunk sizes past 64 bits,
# versions other than 1.x, and control characters in field values (h11 takes
# any byte but NUL, CR and LF there; RFC 9110 section 5.5 does not).
STRICTER = {
    "request": re.compile(
        r"Invalid method|HTTP/1\.x|Invalid HTTP version|char in url|Invalid header value char|"
        r"chunk extension|Chunk size overflow|Invalid character in chunk size|"
        r"CONNECT with a body"  # llhttp would ignore the body h11 reads: refused
    ),
    # h11 merges repeated equal Content-Length values, lets Transfer-Encoding
    # override Content-Length and unfolds obs-fold in responses; we answer 502
    # instead (RFC 9112 sections 5.2 and 6.3 allow a proxy either).
    "response": re.compile(
        r"HTTP/1\.x|Invalid HTTP version|Content-Length|informational response with a body|"
        r"Invalid header value char|chunk extension|Chunk size overflow|"
        r"Invalid character in chunk size"
    ),
}


# Bare CR or LF line endings, and obs-fold (h11 reads both in responses).
LOOSE_LINES = re.compile(rb"(?<!\r)\n|\r(?!\n)|\n[ \t]")
# A control character in a reason phrase (h11 takes it; RFC 9112 section 4 does not).
CTL_REASON = re.compile(rb"(?:\A|\n)HTTP/[^\r\n]*[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class Transcript:
    items: list[object] = field(default_factory=list)
    error: ParseError | None = None
    buffered: bytes = b""

    def add(self, event: object) -> None:
        if isinstance(event, Body) and self.items and isinstance(self.items[-1], bytearray):
            self.items[-1] += event.data
        elif isinstance(event, Body):
            self.items.append(bytearray(event.data))
        elif isinstance(event, Head):
            self.items.append(_head_key(event))
        else:
            assert isinstance(event, End)
            self.items.append(("end", _trailer_key(event.trailers)))

    def messages(self) -> list[object]:
        """The items up to the last End: what was framed completely."""
        last = max((i for i, x in enumerate(self.items) if isinstance(x, tuple) and x[0] == "end"),
                   default=-1)  # fmt: skip
        return self.items[: last + 1]


def _trailer_key(trailers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    # h11 merges repeated Content-Length fields (equal ones; it refuses others),
    # in trailers as in heads; llhttp reports each. A trailer Content-Length
    # never frames and is never forwarded (headers.trailer_fields), so only
    # its first occurrence is compared.
    out: list[tuple[bytes, bytes]] = []
    seen = False
    for name, value in trailers:
        length = name.lower() == b"content-length"
        if not (length and seen):
            out.append((name, value))
        seen = seen or length
    return tuple(out)


def _head_key(h: Head) -> tuple[object, ...]:
    # h11 lower-cases the Transfer-Encoding value it accepted (always "chunked").
    headers = tuple(
        (n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in h.headers
    )
    return ("head", h.version, h.method, h.target, h.status, h.reason, headers,
            h.framing, h.content_length, h.keep_alive, h.upgrade, h.names)  # fmt: skip


def drive(
    parser: LlhttpParser | H11Oracle, chunks: list[bytes], eof: bool, head: bool
) -> Transcript:
    """Feed the chunks, read every event, start the next cycle after each
    End that allows one; after an upgrade or a last message, only feed."""
    out = Transcript()
    reading = True
    if head:
        parser.for_head_request()
    try:
        for chunk in [*chunks, b""] if eof else chunks:
            parser.feed(chunk)
            while reading:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                out.add(event)
                if isinstance(event, End):
                    final = [x for x in out.items if isinstance(x, tuple) and x[0] == "head"][-1]
                    if final[10] or not final[9]:  # upgrade, or no keep-alive
                        reading = False
                        break
                    parser.start_next_cycle()
                    if head:
                        parser.for_head_request()
    except ParseError as exc:
        out.error = exc
    out.buffered = parser.buffered if out.error is None else b""
    return out


def compare(role: Role, data: bytes, splits: list[int], eof: bool, head: bool = False) -> None:
    cuts = sorted({s % (len(data) + 1) for s in splits})
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    chunks = [c for c in chunks if c] or [b""]
    fast = drive(LlhttpParser(role, LIMITS), chunks, eof, head)
    oracle = drive(H11Oracle(role, LIMITS), chunks, eof, head)
    context = f"{role} {data!r} chunks={len(chunks)} eof={eof}"
    if fast.error is None and oracle.error is not None:
        # llhttp accepted what h11 refused: a hole in the wrapper, unless
        # llhttp merely has not yet reached the point of refusal.
        assert fast.messages() != oracle.messages() or len(fast.items) <= len(oracle.items), context
        assert len(fast.messages()) <= len(oracle.messages()), (
            f"llhttp accepted what h11 refuses ({oracle.error.message}): {context}\n"
            f"llhttp: {fast.items}\nh11: {oracle.items}"
        )
        return
    if fast.error is not None and oracle.error is None and not eof:
        # llhttp refuses a line as soon as it sees it; h11 waits for the
        # whole head. Complete the head and see whether h11 refuses then.
        oracle = drive(H11Oracle(role, LIMITS), [*chunks, b"\r\n\r\n"], True, head)
    if fast.error is not None and oracle.error is None:
        stricter = (
            STRICTER[role].search(fast.error.message)
            or (role == "response" and (LOOSE_LINES.search(data) or CTL_REASON.search(data)))
            # A bare CR or LF ending the trailer section: h11 reads it, we
            # refuse (RFC 9112 section 2.2 lets a recipient do either).
            or (fast.error.message == "malformed trailer field" and LOOSE_LINES.search(data))
        )
        assert stricter, (
            f"llhttp refused ({fast.error.message}) what h11 accepts: {context}\n{oracle.items}"
        )
        assert fast.messages() == oracle.items[: len(fast.messages())], context
        return
    if fast.error is not None:
        # Both refused: whatever both framed completely first must agree.
        n = min(len(fast.messages()), len(oracle.messages()))
        assert fast.messages()[:n] == oracle.messages()[:n], context
        return
    assert fast.items == oracle.items, f"{context}\nllhttp: {fast.items}\nh11: {oracle.items}"
    if fast.items and fast.items == fast.messages():
        # At a message boundary (or after an upgrade) the unread bytes agree.
        assert fast.buffered == oracle.buffered, context


# -- strategies ----------------------------------------------------------------

TOKEN = st.sampled_from([b"X-A", b"x-b", b"Accept", b"User-Agent", b"X_U", b"a!#$%&'*+.^`|~"])
BAD_NAME = st.sampled_from([b"X A", b"X[", b"", b"X\x00", b"\xc3\xa9", b"X\t"])
VALUE = st.one_of(
    st.sampled_from([b"1", b"text/html", b"a b", b"x\tb", b"\xc3\xa9", b"", b"  pad  "]),
    st.binary(max_size=12),
)
EOL = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])


@st.composite
def header_lines(draw: st.DrawFn, role: Role, body: bytes) -> tuple[list[bytes], bytes]:
    """Field lines and the body as framed (possibly wrongly) by them."""
    lines: list[bytes] = []
    if role == "request" and draw(st.integers(0, 9)):
        lines.append(b"Host: " + draw(st.sampled_from([b"h", b"h:80", b"", b"a b"])))
    framing = draw(st.sampled_from(["cl", "cl", "te", "none", "cl-dup", "cl-list", "cl-te",
                                    "te-gzip", "te-twice", "cl-bad", "te-case"]))  # fmt: skip
    if framing.startswith("cl"):
        n = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        value = draw(st.sampled_from([b"%d", b" %d ", b"+%d", b"%d, %d", b"0x%d"]))
        value = value.replace(b"%d", str(max(n, 0)).encode()) if framing != "cl-bad" else value
        lines.append(b"Content-Length: " + value.replace(b"%d", b"1"))
        if framing == "cl-dup":
            lines.append(b"content-length: " + str(len(body)).encode())
        if framing == "cl-list":
            lines[-1] = b"Content-Length: %d, %d" % (len(body), len(body))
        if framing == "cl-te":
            lines.append(b"Transfer-Encoding: chunked")
    elif framing.startswith("te"):
        te = {"te": b"chunked", "te-gzip": b"gzip, chunked", "te-twice": b"chunked",
              "te-case": b"Chunked"}[framing]  # fmt: skip
        lines.append(b"Transfer-Encoding: " + te)
        if framing == "te-twice":
            lines.append(b"Transfer-Encoding: chunked")
        body = draw(chunked(body))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 20))
        if kind == 0:
            lines.append(draw(BAD_NAME) + b": " + draw(VALUE))
        elif kind == 1:
            lines.append(draw(TOKEN) + b" : v")  # space before the colon
        elif kind == 2:
            lines.append(b" folded")  # obs-fold
        elif kind == 3:
            lines.append(b"Connection: " + draw(st.sampled_from(
                [b"close", b"keep-alive", b"Upgrade", b"x, close"])))  # fmt: skip
        elif kind == 4:
            lines.append(b"Upgrade: websocket")
        elif kind == 5:
            lines.append(b"X-Big: " + b"v" * draw(st.sampled_from([100, 1500, 2100, 5000])))
        elif kind == 6:
            lines.append(b"Expect: 100-continue")
        elif kind == 7:
            lines.append(b"NoColon")
        else:
            lines.append(draw(TOKEN) + b":" + draw(st.sampled_from([b"", b" ", b"\t"]))
                         + draw(VALUE))  # fmt: skip
    return draw(st.permutations(lines)) if draw(st.booleans()) else lines, body


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    out = b""
    rest = body
    while rest:
        n = draw(st.integers(1, max(1, len(rest))))
        ext = draw(st.sampled_from([b""] * 6 + [b";a=b", b';a="q"', b"; a", b";\x01", b";a=b c"]))
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"%x "])) % n
        out += size + ext + draw(EOL) + rest[:n] + draw(EOL)
        rest = rest[n:]
    out += b"0" + draw(EOL)
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from([b"T: v", b"Content-Length: 5", b"X-Forwarded-Client-Cert: x",
                                     b"bad trailer", b" fold"])) + draw(EOL)  # fmt: skip
    return out + draw(EOL)


@st.composite
def message(draw: st.DrawFn, role: Role) -> bytes:
    body = draw(st.binary(max_size=40))
    lines, body = draw(header_lines(role, body))
    if role == "request":
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS",
                                       b"PATCH", b"CONNECT", b"FOO", b"get", b"G@T"]))  # fmt: skip
        target = draw(st.sampled_from([b"/", b"/a/b?c=d", b"*", b"http://h/x", b"/a#f", b"/%20",
                                       b"/\xc3\xa9", b"/a\x7f", b"h:443", b"/a{b}"]))  # fmt: skip
        version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0", b"2.0", b"1.2", b"0.9"]))
        sp = draw(st.sampled_from([b" "] * 10 + [b"  ", b"\t"]))
        start = method + sp + target + b" HTTP/" + version
    else:
        status = draw(st.sampled_from([b"200", b"200", b"404", b"204", b"304", b"100", b"103",
                                       b"101", b"500", b"20", b"999", b"1000"]))  # fmt: skip
        reason = draw(st.sampled_from([b" OK", b" OK", b"", b" ", b" Not Found", b" \x01",
                                       b" \xc3\xa9", b"  two"]))  # fmt: skip
        version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0", b"2.0"]))
        start = b"HTTP/" + version + b" " + status + reason
    eols = [draw(EOL) for _ in range(len(lines) + 2)]
    head = (
        start + eols[0] + b"".join(line + eol for line, eol in zip(lines, eols[1:], strict=False))
    )
    lead = draw(st.sampled_from([b""] * 12 + [b"\r\n", b"\n"]))
    return lead + head + eols[-1] + body


@st.composite
def stream(draw: st.DrawFn, role: Role) -> bytes:
    msgs = draw(st.lists(message(role), min_size=1, max_size=3))
    tail = draw(st.sampled_from([b""] * 6 + [b"garbage", b"GET / HTTP/1.1\r\n"]))
    return b"".join(msgs) + tail


SPLITS = st.lists(st.integers(0, 10_000), max_size=6)
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=stream("request"), splits=SPLITS, eof=st.booleans())
def test_requests_agree_with_h11(data: bytes, splits: list[int], eof: bool) -> None:
    compare("request", data, splits, eof)


@FUZZ
@given(data=stream("response"), splits=SPLITS, eof=st.booleans(), head=st.booleans())
def test_responses_agree_with_h11(data: bytes, splits: list[int], eof: bool, head: bool) -> None:
    compare("response", data, splits, eof, head)


def test_the_comparison_can_fail() -> None:
    """A wrapper without the Host rule would be caught: h11 refuses, llhttp alone accepts."""
    data = b"GET / HTTP/1.1\r\n\r\n"
    oracle = drive(H11Oracle("request", LIMITS), [data], True, False)
    assert oracle.error is not None and oracle.error.status == 400
    fast = drive(LlhttpParser("request", LIMITS), [data], True, False)
    assert fast.error is not None and fast.error.status == 400


def test_a_bare_lf_after_the_last_chunk_is_refused_where_h11_reads_it() -> None:
    # Found by the long run: stricter than h11, and allowed to be.
    data = (
        b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\n\x00\x00\x00\x00\x00\x00\r\n0\r\n\n"
    )
    compare("request", data, [], False)
    assert drive(LlhttpParser("request", LIMITS), [data], False, False).error is not None


def test_a_repeated_trailer_content_length_frames_alike() -> None:
    # h11 merges the two equal fields into one, llhttp reports both; neither
    # frames the message and the relay drops both.
    data = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
    )
    compare("request", data, [], False)
    compare("request", data, [7, 60], True)
