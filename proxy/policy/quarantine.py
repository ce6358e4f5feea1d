"""The anomaly tripwire and the quarantine it fills.

Theory of operation: :class:`Tripwire` watches every decision about a peer
identity (``observe``) and trips on any configured condition:

* ``deny_burst``: ``count`` denials within ``window`` seconds;
* ``rate_spike``: the requests in the current ``interval`` reach
  ``min_requests`` and exceed ``factor`` times the identity's own baseline,
  an exponentially weighted moving average of its per-interval counts. No
  trip before ``warmup`` intervals have been seen (a new identity has no
  baseline yet);
* ``new_tool`` / ``new_path``: after a ``learning_period`` from the first
  request of an identity, a tool (or path) it never used before.

A trip puts the identity in the :class:`Quarantine` for ``quarantine_for``:
every request from it is then denied with reason ``quarantined`` until the
time runs out or an operator releases it (the admin endpoint, loopback only).
Quarantined identities are not observed (they cannot re-trip or learn).

Memory is bounded: at most ``max_identities`` identities are tracked; the one
idle the longest is forgotten first. Forgetting only weakens detection for
that identity (its baseline and learning restart, so it cannot be falsely
tripped by its own known tools); it never releases a quarantine, which is
kept in its own table. All times come from the injected monotonic clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.identity import SpiffeId

__all__ = [
    "DenyBurst",
    "GuardConfig",
    "Quarantine",
    "QuarantineEntry",
    "QuarantineEvent",
    "RateSpike",
    "Tripwire",
]

# Trip reasons (audit and metrics label values).
DENY_BURST = "deny_burst"
RATE_SPIKE = "rate_spike"
NEW_TOOL = "new_tool"
NEW_PATH = "new_path"

_MAX_SEEN = 1024  # tools or paths remembered per identity


@dataclass(frozen=True, slots=True)
class DenyBurst:
    count: int = 5
    window: float = 60.0


@dataclass(frozen=True, slots=True)
class RateSpike:
    factor: float = 10.0
    min_requests: int = 50
    interval: float = 10.0
    warmup: int = 6  # intervals seen before the baseline counts
    alpha: float = 0.2  # EWMA weight of the newest interval


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """``[guard]``: the tripwire, the quarantine and the guard tables' sizes.
    With nothing configured the tripwire never trips."""

    quarantine_for: float = 600.0
    deny_burst: DenyBurst | None = None
    rate_spike: RateSpike | None = None
    new_tool: bool = False
    new_path: bool = False
    learning_period: float = 3600.0
    max_identities: int = 10_000
    rate_table_size: int = 100_000
    replay_cache_size: int = 100_000

    @property
    def enabled(self) -> bool:
        return bool(self.deny_burst or self.rate_spike or self.new_tool or self.new_path)


@dataclass(frozen=True, slots=True)
class QuarantineEvent:
    peer: SpiffeId
    reason: str  # deny_burst | rate_spike | new_tool | new_path
    detail: str
    until: float  # clock time


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    peer: SpiffeId
    reason: str
    detail: str
    since: float
    until: float


class Quarantine:
    """Identities denied until a time. ``max_entries`` bounds it; when full, the
    entry ending soonest is replaced only if the new one ends later."""

    def __init__(self, clock: Callable[[], float], *, max_entries: int = 10_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: dict[SpiffeId, QuarantineEntry] = {}

    def add(self, peer: SpiffeId, reason: str, detail: str, until: float) -> QuarantineEntry:
        now = self._clock()
        self._expire(now)
        if peer not in self._entries and len(self._entries) >= self._max:
            soonest = min(self._entries.values(), key=lambda e: e.until)
            if soonest.until >= until:
                return soonest
            del self._entries[soonest.peer]
        entry = QuarantineEntry(peer, reason, detail, now, until)
        old = self._entries.get(peer)
        if old is None or old.until < until:
            self._entries[peer] = entry
        return self._entries[peer]

    def is_quarantined(self, peer: SpiffeId) -> float | None:
        """The clock time the quarantine ends, or None."""
        entry = self._entries.get(peer)
        if entry is None:
            return None
        if entry.until <= self._clock():
            del self._entries[peer]
            return None
        return entry.until

    def release(self, peer: SpiffeId) -> bool:
        """End a quarantine now; False when there was none."""
        return self._entries.pop(peer, None) is not None

    def list(self) -> list[QuarantineEntry]:
        self._expire(self._clock())
        return sorted(self._entries.values(), key=lambda e: (e.until, str(e.peer)))

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        for peer in [p for p, e in self._entries.items() if e.until <= now]:
            del self._entries[peer]


@dataclass(slots=True)
class _PeerState:
    first_seen: float
    denials: deque[float] = field(default_factory=deque)
    interval_start: float = 0.0
    count: int = 0
    baseline: float = 0.0
    intervals: int = 0
    seen: set[str] = field(default_factory=set)


class Tripwire:
    def __init__(
        self,
        config: GuardConfig,
        clock: Callable[[], float],
        quarantine: Quarantine | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.quarantine = quarantine or Quarantine(clock)
        self._peers: OrderedDict[SpiffeId, _PeerState] = OrderedDict()

    def observe(
        self, peer: SpiffeId, allowed: bool, tool_or_path: str | None = None
    ) -> QuarantineEvent | None:
        """Record one decision about ``peer``; a QuarantineEvent when it trips."""
        cfg = self.config
        if not cfg.enabled or self.quarantine.is_quarantined(peer) is not None:
            return None
        now = self._clock()
        state = self._state(peer, now)
        tripped = (
            self._deny_burst(state, allowed, now)
            or self._rate_spike(state, now)
            or self._novelty(state, tool_or_path, now)
        )
        if tripped is None:
            return None
        reason, detail = tripped
        until = now + cfg.quarantine_for
        self.quarantine.add(peer, reason, detail, until)
        # A fresh start after the quarantine: the burst that tripped is spent.
        self._peers.pop(peer, None)
        return QuarantineEvent(peer, reason, detail, until)

    def _state(self, peer: SpiffeId, now: float) -> _PeerState:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.config.max_identities:
                self._peers.popitem(last=False)  # idle the longest
            state = _PeerState(first_seen=now, interval_start=now)
            self._peers[peer] = state
        else:
            self._peers.move_to_end(peer)
        return state

    def _deny_burst(self, state: _PeerState, allowed: bool, now: float) -> tuple[str, str] | None:
        burst = self.config.deny_burst
        if burst is None:
            return None
        denials = state.denials
        while denials and denials[0] <= now - burst.window:
            denials.popleft()
        if allowed:
            return None
        denials.append(now)
        if len(denials) >= burst.count:
            return DENY_BURST, f"{len(denials)} denials within {burst.window:g}s"
        return None

    def _rate_spike(self, state: _PeerState, now: float) -> tuple[str, str] | None:
        spike = self.config.rate_spike
        if spike is None:
            return None
        elapsed = now - state.interval_start
        if elapsed >= spike.interval:
            # Close the current interval, then any empty ones after it.
            closed = int(elapsed // spike.interval)
            counts = [state.count] + [0] * min(closed - 1, 64)
            for c in counts:
                if state.intervals == 0:
                    state.baseline = float(c)
                else:
                    state.baseline = spike.alpha * c + (1 - spike.alpha) * state.baseline
                state.intervals += 1
            state.interval_start += closed * spike.interval
            state.count = 0
        state.count += 1
        if state.intervals < spike.warmup or state.count < spike.min_requests:
            return None
        if state.count > spike.factor * state.baseline:
            return (
                RATE_SPIKE,
                f"{state.count} requests in {spike.interval:g}s against a baseline of "
                f"{state.baseline:.1f}",
            )
        return None

    def _novelty(self, state: _PeerState, item: str | None, now: float) -> tuple[str, str] | None:
        cfg = self.config
        if item is None or not (cfg.new_tool or cfg.new_path):
            return None
        if item in state.seen:
            return None
        if now - state.first_seen < cfg.learning_period:
            if len(state.seen) < _MAX_SEEN:
                state.seen.add(item)
            return None
        is_tool = not item.startswith("/")
        if is_tool and cfg.new_tool:
            return NEW_TOOL, f"first use of tool {item!r} after the learning period"
        if not is_tool and cfg.new_path:
            return NEW_PATH, f"first use of path {item!r} after the learning period"
        return None
