"""Durations as operators write them: ``90s``, ``30m``, ``1h30m``, ``500ms``, ``2d``.

Go-style strings (a sequence of ``<number><unit>`` terms, units ``ms s m h d``)
or a plain number of seconds (``3600``, ``1.5``). Negative values and garbage
are rejected with a :class:`DurationError` naming the text; whether zero is
acceptable is for the caller to decide.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from proxy.errors import UsageError

__all__ = ["DurationError", "format_duration", "parse_duration"]


class DurationError(UsageError, ValueError):
    """A duration string that does not parse (one line, exit status 2)."""


_UNIT_SECONDS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

# One term: a non-negative decimal number and a unit. "ms" is listed before
# "m" so that "500ms" is not read as "500m" followed by "s".
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_PLAIN = re.compile(r"\d+(?:\.\d*)?|\.\d+")

# Beyond this timedelta overflows; nobody means a duration this long.
_MAX_SECONDS = 100 * 365 * 86400.0


def parse_duration(text: str) -> timedelta:
    """Parse ``text`` into a non-negative :class:`timedelta`.

    >>> parse_duration("1h30m")
    datetime.timedelta(seconds=5400)
    >>> parse_duration("1.5")
    datetime.timedelta(seconds=1, microseconds=500000)
    """
    raw = text
    s = text.strip()
    if not s:
        raise DurationError("invalid duration '': empty")
    if s.startswith("-"):
        raise DurationError(f"invalid duration {raw!r}: must not be negative")
    if s.startswith("+"):
        s = s[1:]
    if _PLAIN.fullmatch(s):
        seconds = float(s)
    else:
        seconds = 0.0
        pos = 0
        while pos < len(s):
            m = _TERM.match(s, pos)
            if m is None:
                raise DurationError(
                    f"invalid duration {raw!r}: expected terms like 90s, 30m, 1h30m, "
                    "500ms, 2d or a number of seconds"
                )
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
    if not math.isfinite(seconds) or seconds > _MAX_SECONDS:
        raise DurationError(f"invalid duration {raw!r}: too large")
    # Round to whole microseconds so that "0.1s" + "0.2s" does not come out
    # as 299999 microseconds.
    return timedelta(microseconds=round(seconds * 1_000_000))


def format_duration(td: timedelta) -> str:
    """Render ``td`` in the same Go-style syntax :func:`parse_duration` reads.

    ``format_duration(timedelta(hours=1, minutes=30)) == "1h30m"``; zero is
    ``"0s"``. Sub-millisecond remainders are rounded to the millisecond.
    """
    total_ms = round(td / timedelta(milliseconds=1))
    if total_ms == 0:
        return "0s"
    sign = "-" if total_ms < 0 else ""
    total_ms = abs(total_ms)
    days, rem = divmod(total_ms, 86_400_000)
    hours, rem = divmod(rem, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    seconds, millis = divmod(rem, 1000)
    parts: list[str] = []
    if days:
        parts.append(f"{days}d")
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if seconds and millis:
        parts.append(f"{seconds}.{millis:03d}".rstrip("0") + "s")
    elif seconds:
        parts.append(f"{seconds}s")
    elif millis:
        parts.append(f"{millis}ms")
    return sign + "".join(parts)
