"""The ``[audit]`` config section, parsed from its raw TOML table.

A section parser takes the raw table and its key path and returns a frozen
value, or raises :class:`proxy.config.ConfigError` in the house style
(``audit.durability: expected "os" or "fsync", got "x"``; unknown keys named,
with a "did you mean"). The config package calls :func:`parse_audit`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

Durability = Literal["os", "fsync"]
OnFailure = Literal["closed", "open"]

_MISSING: Any = object()


class SectionReader:
    """One raw table: typed reads that name the key path, then :meth:`done`."""

    def __init__(self, table: Mapping[str, Any], at: str, source: str | None = None) -> None:
        self.table, self.at, self.source = table, at, source
        self.seen: set[str] = set()

    def fail(self, key: str | None, problem: str) -> NoReturn:
        """``key`` None: a problem of the whole file (no key path prefix)."""
        from proxy.config import ConfigError

        where = "" if key is None else f"{self.at}.{key}: " if key else f"{self.at}: "
        raise ConfigError(f"{self.source + ': ' if self.source else ''}{where}{problem}")

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.table.get(key, _MISSING)

    def choice(self, key: str, options: Sequence[str], default: str) -> str:
        value = self.get(key)
        if value is _MISSING:
            return default
        if value not in options:
            quoted = " or ".join(f'"{o}"' for o in options)
            self.fail(key, f"expected {quoted}, got {_show(value)}")
        return str(value)

    def string(self, key: str, default: str | None) -> str | None:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {_show(value)}")
        return value

    def seconds(self, key: str, default: float | None, *, positive: bool = True) -> float | None:
        from proxy.durations import DurationError, parse_duration

        value = self.get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            self.fail(key, f'expected seconds or a duration such as "10s", got {_show(value)}')
        if isinstance(value, str):
            try:
                seconds = parse_duration(value).total_seconds()
            except DurationError as exc:
                self.fail(key, str(exc))
        else:
            seconds = float(value)
        if seconds < 0 or (positive and seconds == 0):
            self.fail(key, f"expected a positive duration, got {_show(value)}")
        return seconds

    def integer(self, key: str, default: int | None, *, minimum: int) -> int | None:
        value = self.get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_show(value)}")
        if value < minimum:
            self.fail(key, f"expected at least {minimum}, got {value}")
        return value

    def size(self, key: str, default: int | None) -> int | None:
        """Bytes: an integer, or a string such as "100MiB", "64k"."""
        value = self.get(key)
        if value is _MISSING:
            return default
        if isinstance(value, str):
            parsed = parse_size(value)
            if parsed is None:
                self.fail(key, f'expected bytes such as 104857600 or "100MiB", got {value!r}')
            value = parsed
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(key, f"expected a positive number of bytes, got {_show(value)}")
        return value

    def done(self) -> None:
        for key in self.table:
            if key in self.seen:
                continue
            hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.fail(None, f"unknown key {self.at + '.' + key!r}{suggestion}")


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20, "mb": 10**6}
_SIZE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_UNITS |= {"mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_size(text: str) -> int | None:
    match = _SIZE.fullmatch(text.strip())
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    return repr(value)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: str = "-"  # "-" is stdout
    durability: Durability = "os"
    fsync_interval: float = 0.1
    checkpoint_interval: float = 10.0
    max_bytes: int | None = None  # rotate when the file reaches this size
    max_age: float | None = None  # ... or is this old (seconds)
    keep: int = 0  # rotated files kept (0: all)
    on_failure: OnFailure = "closed"


def parse_audit(
    table: Mapping[str, Any],
    at: str = "audit",
    *,
    base_dir: Path | None = None,
    source: str | None = None,
) -> AuditSettings:
    """``[audit]``; relative paths resolve against ``base_dir``."""
    if not isinstance(table, Mapping):
        SectionReader({}, at, source).fail("", f"expected a table, got {_show(table)}")
    r = SectionReader(table, at, source)
    d = AuditSettings()
    path = r.string("path", d.path)
    assert path is not None
    if "\x00" in path:
        r.fail("path", "must not contain a NUL byte")
    if path != "-":
        try:
            expanded = Path(path).expanduser()
        except RuntimeError:
            user = path[1:].split("/", 1)[0]
            r.fail("path", f"cannot expand {path!r}: no user {user!r} on this host")
        path = str(base_dir / expanded) if base_dir is not None else str(expanded)
    settings = AuditSettings(
        path=path,
        durability=r.choice("durability", ("os", "fsync"), d.durability),  # type: ignore[arg-type]
        fsync_interval=r.seconds("fsync_interval", d.fsync_interval) or d.fsync_interval,
        checkpoint_interval=r.seconds("checkpoint_interval", d.checkpoint_interval)
        or d.checkpoint_interval,
        max_bytes=r.size("max_bytes", None),
        max_age=r.seconds("max_age", None),
        keep=r.integer("keep", d.keep, minimum=0) or 0,
        on_failure=r.choice("on_failure", ("closed", "open"), d.on_failure),  # type: ignore[arg-type]
    )
    r.done()
    if path == "-" and (settings.max_bytes or settings.max_age):
        r.fail("max_bytes" if settings.max_bytes else "max_age", "rotation needs a file path")
    return settings
