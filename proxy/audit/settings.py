"""The ``[audit]`` config section, read from its table by the config walker.

The config package hands :func:`parse_audit` the section's
:class:`~proxy.config.walker.Table` (key path, file, base directory, which
keys were read), so unknown keys, "did you mean" hints and the
``FILE: audit.KEY: problem`` line are the walker's, as for every other
section. Only the section's own value rules live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the config package imports this module's settings type
    from proxy.config.walker import Table

Durability = Literal["os", "fsync"]
OnFailure = Literal["closed", "open"]


def either(t: Table, key: str, options: Sequence[str], default: str) -> str:
    """One of a few words: ``expected "os" or "fsync", got "x"``."""
    if not t.has(key):
        t.get(key)
        return default
    value = t.get(key)
    if value not in options:
        t.fail(key, f"expected {' or '.join(t.show(o) for o in options)}, got {t.show(value)}")
    return str(value)


def at_least(t: Table, key: str, default: int, minimum: int) -> int:
    """An integer no smaller than ``minimum``: ``expected at least 0, got -1``."""
    value = t.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
        t.fail(key, f"expected at least {minimum}, got {value}")
    return t.integer(key, default=default, minimum=minimum)


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


def parse_audit(t: Table) -> AuditSettings:
    """``[audit]``; a relative ``path`` resolves against the config's directory."""
    d = AuditSettings()
    path = t.text("path", d.path)
    if path != "-":
        path = str(t.ctx.base_dir / t.expand("path", path))
    settings = AuditSettings(
        path=path,
        durability=either(t, "durability", ("os", "fsync"), d.durability),  # type: ignore[arg-type]
        fsync_interval=t.duration("fsync_interval", default=d.fsync_interval),
        checkpoint_interval=t.duration("checkpoint_interval", default=d.checkpoint_interval),
        max_bytes=t.size("max_bytes", default=None),
        max_age=t.duration("max_age", default=None),
        keep=at_least(t, "keep", d.keep, 0),
        on_failure=either(t, "on_failure", ("closed", "open"), d.on_failure),  # type: ignore[arg-type]
    )
    t.done()
    if path == "-" and (settings.max_bytes or settings.max_age):
        t.fail("max_bytes" if settings.max_bytes else "max_age", "rotation needs a file path")
    return settings
