"""The one place that chooses the HTTP/1.1 parser of the data path.

llhttp (through httptools) on the hot path; h11 (:class:`H11Parser`) stays
the strict oracle of the differential fuzz test and serves the admin
endpoint. Swapping one for the other is this one line.
"""

from __future__ import annotations

from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import MessageParser, ParserLimits, Role


def make_parser(role: Role, limits: ParserLimits) -> MessageParser:
    """A parser for one direction of one connection."""
    return LlhttpParser(role, limits)
