"""Rate limits per peer identity and rule: GCRA, and the IETF RateLimit headers.

Theory of operation: the Generic Cell Rate Algorithm keeps one number per
key, the theoretical arrival time (TAT) of the next request. A rate of
``count`` per ``period`` has an emission interval ``T = period / count``;
a request at ``now`` is allowed when ``max(TAT, now) + T - period <= now``,
and then ``TAT = max(TAT, now) + T``. That allows a burst of ``count`` and
then one request every ``T``, with no timers and no windows to reset.

Memory is bounded (``max_entries``) without ever resetting a live limit:
an entry whose TAT is in the past holds exactly the state a fresh entry
would, so those and only those are evicted. When the table is full of live
entries, a *new* key is refused (``table_full``) rather than evicting
someone's live state: fail closed. A peer cannot get its limit back by
churning other identities through the table. To keep that cheap under
attack, a sweep that frees nothing is not repeated until the earliest live
entry has expired.

Headers follow draft-ietf-httpapi-ratelimit-headers-11 (structured fields):
``RateLimit-Policy: "rule";q=10;w=60`` and ``RateLimit: "rule";r=0;t=6``,
plus ``Retry-After`` (seconds) on a refusal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from proxy.durations import DurationError, parse_duration

__all__ = ["Rate", "RateError", "RateLimiter", "RateResult", "headers"]

_UNITS = {"second": 1, "sec": 1, "s": 1, "minute": 60, "min": 60, "m": 60, "hour": 3600, "h": 3600}
_UNITS.update({"day": 86400, "d": 86400})
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")


class RateError(ValueError):
    """A rate that does not parse; the message says what is expected."""


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``period`` seconds (a whole number of seconds)."""

    count: int
    period: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"10/minute"``, ``"5/second"``, ``"1000/hour"``, ``"100/30s"``, ``"20/1m30s"``."""
        m = _RATE.match(text) if isinstance(text, str) else None
        if m is None:
            raise RateError(
                f'invalid rate {text!r}: expected COUNT/UNIT such as "10/minute" or "100/30s"'
            )
        count, unit = int(m.group(1)), m.group(2).lower()
        if count < 1:
            raise RateError(f"invalid rate {text!r}: the count must be at least 1")
        if unit in _UNITS:
            period = float(_UNITS[unit])
        else:
            try:
                period = parse_duration(unit).total_seconds()
            except DurationError:
                raise RateError(
                    f"invalid rate {text!r}: the period must be second, minute, hour, day "
                    'or a duration such as "30s"'
                ) from None
        if period < 1 or period != int(period):
            raise RateError(f"invalid rate {text!r}: the period must be a whole number of seconds")
        return cls(count, int(period))

    @property
    def interval(self) -> float:
        """The emission interval: one request every ``interval`` seconds, sustained."""
        return self.period / self.count

    def __str__(self) -> str:
        names = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
        return f"{self.count}/{names.get(self.period, f'{self.period}s')}"


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    limit: int
    remaining: int
    reset_s: float  # seconds until one more request is available (RateLimit ``t``)
    table_full: bool = False  # refused because the table holds only live limits


class RateLimiter:
    """GCRA state per key (use ``(peer_id, rule_name)``). ``clock``: monotonic seconds."""

    def __init__(self, clock: Callable[[], float], *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        self._tat: dict[Hashable, float] = {}
        self._no_sweep_before = -math.inf

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, key: Hashable, rate: Rate) -> RateResult:
        """Count one request for ``key``; say whether it may proceed."""
        now = self._clock()
        interval = rate.interval
        tat = self._tat.get(key)
        if tat is None and len(self._tat) >= self._max and not self._make_room(now):
            wait = max(self._no_sweep_before - now, interval)
            return RateResult(False, wait, rate.count, 0, wait, table_full=True)
        start = now if tat is None or tat < now else tat
        new_tat = start + interval
        allow_at = new_tat - rate.period
        if allow_at > now:
            # Refused: the state is left as it was (a refusal costs nothing).
            wait = allow_at - now
            return RateResult(False, wait, rate.count, 0, wait)
        self._tat[key] = new_tat
        debt = new_tat - now
        remaining = max(0, min(rate.count, math.floor((rate.period - debt) / interval + 1e-9)))
        reset = debt - (rate.period - (remaining + 1) * interval)
        return RateResult(True, 0.0, rate.count, remaining, max(reset, 0.0))

    def _make_room(self, now: float) -> bool:
        """Evict entries whose TAT has passed (equivalent to fresh state); never live ones."""
        if now < self._no_sweep_before:
            return False
        stale = [k for k, t in self._tat.items() if t <= now]
        for k in stale:
            del self._tat[k]
        if len(self._tat) < self._max:
            return True
        self._no_sweep_before = min(self._tat.values())
        return False


def _sf_string(text: str) -> str:
    """An RFC 9651 sf-string: printable ASCII, with ``"`` and ``\\`` escaped."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


def headers(result: RateResult, rate: Rate, policy: str = "default") -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-11),
    and ``Retry-After`` on a refusal. ``policy`` names the quota policy (the rule)."""
    name = _sf_string(policy)
    out = [
        ("RateLimit-Policy", f"{name};q={rate.count};w={rate.period}"),
        ("RateLimit", f"{name};r={result.remaining};t={_seconds(result.reset_s)}"),
    ]
    if not result.allowed:
        out.append(("Retry-After", str(max(1, _seconds(result.retry_after_s)))))
    return out
