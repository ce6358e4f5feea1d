"""``python -m benchmarks.parser_bench`` measures the two parser wrappers the
data path can run (llhttp on the hot path, h11 as the oracle), each through
the same MessageParser loop. It once imported a helper that had moved and
quietly fell back to h11 without our strict checks; now every message must
parse to its end on both, or the tool fails."""

from __future__ import annotations

import pytest

from benchmarks.parser_bench import GET, POST, RESPONSE, parser_loop
from proxy.http.h11_parser import H11Parser
from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import MessageParser, Role


@pytest.mark.parametrize("make", [LlhttpParser, H11Parser])
@pytest.mark.parametrize(
    ("role", "message"), [("request", GET), ("request", POST), ("response", RESPONSE)]
)
def test_each_wrapper_reads_each_message_to_its_end_again_and_again(
    make: type[LlhttpParser] | type[H11Parser], role: Role, message: bytes
) -> None:
    parser: MessageParser = make(role)
    parser_loop(parser, message)(3)  # keep-alive: the same parser, three messages
    assert parser.buffered == b""


def test_an_incomplete_message_fails_the_measurement() -> None:
    with pytest.raises(RuntimeError, match="incomplete"):
        parser_loop(LlhttpParser("request"), GET[:-2])(1)
