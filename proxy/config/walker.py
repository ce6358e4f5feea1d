"""The table walker: typed reads from one TOML table with its key path.

Theory of operation: each :class:`Table` knows its key path
(``inbound[0].rules[1]``), hands out typed values, and at the end
(:meth:`Table.done`) refuses any key nobody asked for, so a typo is an error
instead of a silently ignored setting. A required key that is missing while
a close misspelling of it is present is reported as that unknown key, with
the hint (``unknown key 'inbound[0].lisen' (did you mean 'listen'?)``).
Every problem is a :class:`~proxy.config.schema.ConfigError` with one line
``FILE: KEY.PATH: problem``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from proxy.config.schema import BARE_KEY_RE, NAME_RE, ConfigError
from proxy.durations import DurationError, parse_duration
from proxy.netaddr import AddressError, HostPort

T = TypeVar("T")


@dataclass(frozen=True)
class Ctx:
    """The file being read (``source``; empty for flags), where relative
    paths resolve, and how key paths are spelled in messages."""

    source: str
    base_dir: Path
    key_names: Mapping[str, str] = field(default_factory=dict)

    def name(self, path: str) -> str:
        """``path`` as the operator wrote it: a flag when one was renamed."""
        best = ""
        for key in self.key_names:
            if len(key) > len(best) and (path == key or path.startswith((key + ".", key + "["))):
                best = key
        return self.key_names[best] + path[len(best) :] if best else path

    def fail(self, path: str, problem: str) -> NoReturn:
        for key, flag in self.key_names.items():
            problem = problem.replace(f"set {key} = true", f"pass {flag}")
        where = f"{self.name(path)}: " if path else ""
        prefix = f"{self.source}: " if self.source else ""
        raise ConfigError(f"{prefix}{where}{problem}")


def type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _key_part(key: str) -> str:
    return key if BARE_KEY_RE.match(key) else '"' + key.replace('"', '\\"') + '"'


def generic(path: str) -> str:
    """``inbound[0].rules`` as TOML spells the table header: ``inbound.rules``."""
    return re.sub(r"\[\d+\]", "", path)


MISSING: Any = object()


class Table:
    """One TOML table, its key path, and which of its keys were read."""

    def __init__(self, ctx: Ctx, path: str, data: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.path = path
        self.data = data
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        part = _key_part(key)
        return f"{self.path}.{part}" if self.path else part

    def fail(self, key: str, problem: str) -> NoReturn:
        self.ctx.fail(self.at(key), problem)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key, MISSING)

    def done(self, *, allowed_elsewhere: Mapping[str, str] | None = None) -> None:
        """Refuse keys nobody read. ``allowed_elsewhere`` maps keys that are
        valid in other settings to why they are not valid here."""
        for key in self.data:
            if key in self.seen:
                continue
            if allowed_elsewhere and key in allowed_elsewhere:
                self.fail(key, allowed_elsewhere[key])
            hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.ctx.fail("", f"unknown key {self.ctx.name(self.at(key))!r}{suggestion}")

    def missing(self, key: str, problem: str = "required") -> NoReturn:
        """A required key is absent. When a close misspelling of it is
        present, the misspelling is the problem to report."""
        strays = [k for k in self.data if k not in self.seen]
        hint = difflib.get_close_matches(key, strays, n=1)
        if hint:
            self.ctx.fail(
                "", f"unknown key {self.ctx.name(self.at(hint[0]))!r} (did you mean {key!r}?)"
            )
        self.fail(key, problem)

    def _typed(self, key: str, value: Any, check: Callable[[Any], bool], what: str) -> Any:
        if not check(value):
            self.fail(key, f"expected {what}, got {type_name(value)}")
        return value

    def string(self, key: str, *, default: Any = MISSING, nonempty: bool = False) -> Any:
        value = self.get(key)
        if value is MISSING:
            if default is MISSING:
                self.missing(key)
            return default
        self._typed(key, value, lambda v: isinstance(v, str), "a string")
        if nonempty and not value:
            self.fail(key, "must not be empty")
        if "\x00" in value:
            self.fail(key, "must not contain a NUL byte")
        return value

    def boolean(self, key: str, *, default: bool = False) -> bool:
        value = self.get(key)
        if value is MISSING:
            return default
        return bool(self._typed(key, value, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, key: str, *, default: int, minimum: int = 1) -> int:
        value = self.get(key)
        if value is MISSING:
            return default
        self._typed(
            key, value, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )
        if value < minimum:
            self.fail(key, f"must be at least {minimum}, got {value}")
        return int(value)

    def duration(self, key: str, *, default: T, allow_zero: bool = False) -> float | T:
        """A number of seconds or a duration string such as ``"30s"``."""
        value = self.get(key)
        if value is MISSING:
            return default
        if isinstance(value, str):
            try:
                seconds = parse_duration(value).total_seconds()
            except DurationError as exc:
                self.fail(key, str(exc))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                self.fail(key, f"expected a non-negative number of seconds, got {value}")
        else:
            self.fail(key, f'expected seconds or a duration such as "30s", got {type_name(value)}')
        if seconds == 0 and not allow_zero:
            self.fail(key, "must be greater than zero")
        return seconds

    def strings(self, key: str, *, required: bool = True, nonempty: bool = True) -> list[str]:
        value = self.get(key)
        if value is MISSING:
            if required:
                self.missing(key)
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, "expected a list of strings")
        if nonempty and not value:
            self.fail(key, "must not be empty")
        for i, item in enumerate(value):
            if "\x00" in item:
                self.ctx.fail(f"{self.at(key)}[{i}]", "must not contain a NUL byte")
        return list(value)

    def parsed_list(
        self, key: str, parse: Callable[[str], T], errors: tuple[type[Exception], ...]
    ) -> tuple[T, ...]:
        out: list[T] = []
        for i, text in enumerate(self.strings(key)):
            try:
                out.append(parse(text))
            except errors as exc:
                self.ctx.fail(f"{self.at(key)}[{i}]", str(exc))
        return tuple(out)

    def address(
        self, key: str, *, zero_port: bool, any_host: bool = False, default: Any = MISSING
    ) -> Any:
        """``HOST:PORT``; with ``any_host`` (listen keys) also ``:PORT``."""
        text = self.string(key, default=default)
        if text is default and default is not MISSING:
            return default
        try:
            return HostPort.parse(text, allow_zero_port=zero_port, allow_any_host=any_host)
        except AddressError as exc:
            self.fail(key, str(exc))

    def path_value(self, key: str, *, default: Any = MISSING) -> Any:
        text = self.string(key, default=default, nonempty=True)
        if text is default and default is not MISSING:
            return default
        return self.ctx.base_dir / self.expand(key, text)

    def expand(self, key: str, text: str) -> Path:
        """``~`` and ``~user`` expanded; an unknown user is this key's problem."""
        try:
            return Path(text).expanduser()
        except RuntimeError:
            user = text[1:].split("/", 1)[0]
            self.fail(key, f"cannot expand {text!r}: no user {user!r} on this host")

    def table(self, key: str) -> Table | None:
        value = self.get(key)
        if value is MISSING:
            return None
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table ([{generic(self.at(key))}]), got {type_name(value)}")
        return Table(self.ctx, self.at(key), value)

    def tables(self, key: str) -> list[Table]:
        value = self.get(key)
        if value is MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.fail(key, f"expected an array of tables ([[{generic(self.at(key))}]])")
        return [Table(self.ctx, f"{self.at(key)}[{i}]", v) for i, v in enumerate(value)]

    def choice(
        self, key: str, options: Sequence[str], *, default: Any = MISSING, more: str = ""
    ) -> Any:
        value = self.string(key, default=default)
        if value not in options:
            quoted = ", ".join(f'"{o}"' for o in options)
            self.fail(key, f"expected one of {quoted}, got {value!r}{more}")
        return value

    def number(self, key: str, *, default: float, minimum: float) -> float:
        value = self.get(key)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number, got {type_name(value)}")
        if not math.isfinite(value) or value < minimum:
            self.fail(key, f"must be at least {minimum:g}, got {value}")
        return float(value)

    def name(self, key: str = "name", *, default: Any = MISSING) -> Any:
        value = self.string(key, default=default)
        if value is default:
            return value
        if not NAME_RE.match(value):
            self.fail(
                key,
                f"invalid name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        return value
