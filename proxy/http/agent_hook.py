"""The one interface through which an agent protocol (MCP, A2A) plugs into
the generic HTTP exchange; the exchange never names a protocol.

A hook judges a whole request body (the POST that carries JSON-RPC calls)
and may filter the answer: JSON bodies whole, server-sent events as they
stream. The exchange reads the body (up to ``max_body``), asks
:meth:`AgentHook.judge`, and either answers with the judgement's own body
(a denial in the protocol's terms) or forwards the body and runs the answer
through the filter the hook gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Judgement:
    """What a hook decided about one body."""

    forward: bool
    status: int = 200  # our answer's status when not forwarding
    body: bytes = b""  # our answer when not forwarding
    pending: dict[Any, str] = field(default_factory=dict)  # request ids whose answers to filter
    version: str = ""  # the protocol version the calls spoke
    calls: list[dict[str, Any]] = field(default_factory=list)  # one audit entry per call
    reason: str = "rule_matched"
    rule: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)  # for the client either way
    policy_version: str = ""  # the rules' version the calls were judged under


class ResponseFilter(Protocol):
    """Rewrites (or only reads) an answer as it passes."""

    @property
    def whole(self) -> bool:
        """True: the answer is held and rewritten whole (its length changes,
        it is re-framed); False: it streams through :meth:`feed`."""
        ...

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


FilterFactory = Callable[[str], ResponseFilter]  # from the answer's content type


class AgentHook(Protocol):
    max_body: int

    def judge(self, body: bytes, headers: dict[str, str], path: str) -> Judgement: ...

    def answer_filter(
        self, verdict: Judgement, headers: dict[str, str], path: str
    ) -> FilterFactory | None: ...

    def stream_filter(self, headers: dict[str, str], path: str) -> FilterFactory | None:
        """For a GET that opens a stream of server messages."""
        ...
