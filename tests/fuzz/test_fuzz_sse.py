"""The SSE filter: any bytes in any chunking raise only SseError (or what
the transform raises); a transform that changes nothing passes the stream
on byte for byte, however it was split."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import given
from hypothesis import strategies as st

from proxy.agent.jsonrpc import JsonRpcError
from proxy.agent.sse import SseError, SseFilter, make_list_transform
from tests.fuzz.strategies import mutated

SEEDS = (
    b'event: message\r\nid: 1\r\ndata: {"jsonrpc":"2.0","id":1,"result":{"tools":[]}}\r\n\r\n',
    b"\xef\xbb\xbf: comment\ndata: a\ndata: b\n\nretry: 10\n\n",
    b'data: {"jsonrpc":"2.0","id":"x","result":{"tools":[{"name":"read"},{"name":"rm"}]}}\r\r',
    b"data:\rdata\n\n\n",
)
streams = st.one_of(mutated(SEEDS), st.binary(max_size=300))


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds)]


def _run(sse: SseFilter, chunks: list[bytes]) -> bytes:
    out = b"".join(sse.feed(chunk) for chunk in chunks)
    return out + sse.close()


@given(chunked(), st.integers(1, 400))
def test_pass_through_is_byte_for_byte(stream: tuple[bytes, list[bytes]], limit: int) -> None:
    data, chunks = stream
    try:
        out = _run(SseFilter(lambda _: None, max_event_bytes=limit), chunks)
    except SseError:
        return
    assert out == data


@given(chunked())
def test_mcp_list_filter(stream: tuple[bytes, list[bytes]]) -> None:
    pending = {("n", 1): "tools/list"}
    transform = make_list_transform(pending, lambda method, name: name == "read", "2025-06-18")
    # UnfilterableResponse (the transform's fail-closed refusal) is a JsonRpcError.
    with contextlib.suppress(SseError, JsonRpcError):
        _run(SseFilter(transform, max_event_bytes=1 << 12), chunks=stream[1])
