"""Connection policy: SPIFFE ID patterns and the peer allowlist decision.

A pattern is an exact SPIFFE ID, ``spiffe://td/a/*`` (exactly one more path
segment) or ``spiffe://td/a/**`` (one or more more segments). The prefix
before a wildcard must itself be a valid SPIFFE ID (a bare trust domain is
allowed), so a typo fails at startup instead of silently never matching.
Decisions are pure functions over data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.identity import SpiffeId, SpiffeIdError


class PatternError(ValueError):
    """A SPIFFE ID pattern that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class SpiffePattern:
    text: str
    prefix: SpiffeId
    wildcard: str  # "" (exact), "*" or "**"

    @classmethod
    def parse(cls, text: str) -> SpiffePattern:
        wildcard = ""
        base = text
        for suffix in ("/**", "/*"):
            if text.endswith(suffix):
                wildcard = suffix[1:]
                base = text[: -len(suffix)]
                break
        if "*" in base:
            raise PatternError(
                f"invalid SPIFFE ID pattern {text!r}: '*' and '**' are allowed only "
                "as the whole last segment"
            )
        try:
            prefix = SpiffeId.parse(base)
        except SpiffeIdError as exc:
            raise PatternError(f"invalid SPIFFE ID pattern {text!r}: {exc}") from exc
        if not wildcard and not prefix.path:
            raise PatternError(
                f"invalid SPIFFE ID pattern {text!r}: a workload ID needs a path "
                "(use spiffe://td/* or spiffe://td/** to match a trust domain)"
            )
        return cls(text=text, prefix=prefix, wildcard=wildcard)

    def matches(self, candidate: SpiffeId) -> bool:
        if candidate.trust_domain != self.prefix.trust_domain:
            return False
        if not self.wildcard:
            return candidate.path == self.prefix.path
        head = self.prefix.path + "/"
        if not candidate.path.startswith(head):
            return False
        rest = candidate.path[len(head) :]
        if not rest:
            return False
        return self.wildcard == "**" or "/" not in rest

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class PeerDecision:
    allowed: bool
    reason: str
    rule: str | None


def decide_peer(peer: SpiffeId, patterns: Sequence[SpiffePattern]) -> PeerDecision:
    """Deny by default: a peer is allowed only when some pattern names it."""
    for pattern in patterns:
        if pattern.matches(peer):
            return PeerDecision(True, "peer_allowed", pattern.text)
    return PeerDecision(False, "peer_not_allowed", None)


def parse_patterns(texts: Sequence[str]) -> tuple[SpiffePattern, ...]:
    return tuple(SpiffePattern.parse(t) for t in texts)
