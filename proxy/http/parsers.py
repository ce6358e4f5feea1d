"""The one place that chooses the HTTP/1.1 parser of the data path."""

from __future__ import annotations

from proxy.http.h11_parser import H11Parser
from proxy.http.wire import MessageParser, ParserLimits, Role


def make_parser(role: Role, limits: ParserLimits) -> MessageParser:
    """A parser for one direction of one connection (h11: the strict oracle)."""
    return H11Parser(role, limits)
