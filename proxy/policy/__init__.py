"""Policy: who may talk to whom, and what they may do (pure, no I/O).

Peer patterns and the connection allowlist (:mod:`.peers`), path patterns
and normalisation (:mod:`.paths`), guard rules and request facts
(:mod:`.rules`), how rules combine (:mod:`.evaluate`), CEL conditions,
rate limits, quarantine and step-up approvals, and the gate pipeline
(:mod:`.gate`) that yields one :class:`~proxy.policy.verdict.RequestVerdict`
per request. Time is always passed in; nothing here reads a clock or does
I/O.
"""

from proxy.policy.peers import (
    PatternError,
    PeerDecision,
    SpiffePattern,
    decide_peer,
    parse_patterns,
)

__all__ = ["PatternError", "PeerDecision", "SpiffePattern", "decide_peer", "parse_patterns"]
