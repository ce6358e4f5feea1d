"""What every identity source shares: the interface, stats, expiry checks.

Theory of operation: a source produces :class:`IdentitySnapshot` values (our
SVID plus every trust bundle) and hands each new one to
``IdentityState.swap``, which builds every TLS side for it and then replaces
the whole snapshot at once. A source never swaps in anything that has not
passed :func:`proxy.identity.build_snapshot`, the one place that decides
whether a set of parts is a usable identity.

On any failure the source keeps the current snapshot, logs one line (never
key material: messages are built from our own text and from identity-module
errors, which are key-safe) and counts the failure in :class:`SourceStats`.

``Pulse`` lets a caller (a test, a metrics exporter) wait for "something
happened in this source" without polling or sleeping.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
import trio

from proxy.identity import (
    IdentityLoadError,
    IdentitySnapshot,
    IdentityState,
    X509Svid,
    describe_snapshot,
    snapshot_fingerprint,
)
from proxy.identity.snapshot import utc_timestamp

__all__ = [
    "EXPIRY_WARNING_FRACTION",
    "Clock",
    "ExpiryWarner",
    "IdentityLoadError",
    "IdentitySource",
    "Pulse",
    "SourceStats",
    "lifetime_remaining_fraction",
    "loading",
    "log",
    "swap_in",
    "utc_now",
    "watch_expiry",
]


class _Log:
    """The "agent_proxy" structlog logger, looked up afresh at every call.

    A module-level logger is cached on first use when logging is configured
    with ``cache_logger_on_first_use``; looking it up per call keeps
    ``structlog.testing.capture_logs`` working in any test order. Sources
    log rarely, so the lookup costs nothing that matters.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(structlog.get_logger("agent_proxy"), name)


log = _Log()

# Warn when less than this fraction of our SVID's lifetime remains. SPIRE
# rotates at half-life, so crossing 20% means rotation is well overdue.
EXPIRY_WARNING_FRACTION = 0.2

Clock = Callable[[], _dt.datetime]
"""Wall-clock time as an aware UTC datetime (certificate validity is wall time)."""


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass
class SourceStats:
    """Counters for one source. Mutable; read them, do not write them."""

    reloads_ok: int = 0
    """New identities swapped in (not counting the initial one)."""
    reloads_failed: int = 0
    """Refused updates and failed fetches; the old identity stayed."""
    last_error: str | None = None
    last_success: _dt.datetime | None = None
    """When an identity was last accepted (initial, swap, or unchanged reload)."""

    def record_success(self, now: _dt.datetime, *, swapped: bool) -> None:
        if swapped:
            self.reloads_ok += 1
        self.last_success = now

    def record_failure(self, message: str) -> None:
        self.reloads_failed += 1
        self.last_error = message


class IdentitySource(Protocol):
    """Where our SVID and bundles come from: files, the Workload API, the dev CA."""

    name: str
    stats: SourceStats

    async def initial(self) -> IdentitySnapshot:
        """The first identity, or IdentityLoadError."""
        ...

    async def run(self, state: IdentityState) -> None:
        """Run forever, swapping new valid identities into ``state``."""
        ...

    def request_reload(self) -> None:
        """SIGHUP: reload or re-fetch now. Call from the trio thread."""
        ...


class Pulse:
    """A broadcast "something changed" signal that tasks can wait for.

    ``fire()`` wakes every task currently in ``wait()``. Waiters re-check
    their condition after waking::

        with trio.fail_after(5):
            while source.stats.reloads_failed < 1:
                await source.pulse.wait()
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


_T = TypeVar("_T")


def loading(origin: str, load: Callable[[], _T]) -> _T:
    """Run ``load`` (which parses outside input) so that it raises only
    IdentityLoadError.

    The identity parsers raise only their documented errors; this is the
    backstop that keeps a bug in one of them from stopping rotation (or
    start-up with a traceback). The unexpected exception's message is not
    shown, only its type: we cannot vouch that it does not echo key bytes.
    """
    try:
        return load()
    except IdentityLoadError:
        raise
    except Exception as exc:
        raise IdentityLoadError(
            f"{origin}: unexpected {type(exc).__name__} while loading the identity "
            "(a bug: please report it)"
        ) from exc


def swap_in(state: IdentityState, snapshot: IdentitySnapshot, *, source: str) -> bool:
    """Make ``snapshot`` current unless it equals the current one; True if swapped.

    Raises IdentityLoadError, and changes nothing, when a TLS side cannot be
    built from it (see IdentityState.swap).
    """
    previous = state.current
    if snapshot_fingerprint(snapshot) == snapshot_fingerprint(previous):
        return False
    state.swap(snapshot)
    log.info(
        "identity rotated",
        source=source,
        previous_serial=previous.svid.serial_hex,
        generation=state.generation,
        **describe_snapshot(snapshot),
    )
    return True


# -- expiry ----------------------------------------------------------------------


def lifetime_remaining_fraction(svid: X509Svid, now: _dt.datetime) -> float:
    """The fraction of the SVID's validity period still ahead of ``now``,
    clamped to [0, 1]: 1.0 before ``not_before``, 0.0 at or after ``not_after``."""
    lifetime = (svid.not_after - svid.not_before).total_seconds()
    if lifetime <= 0:
        return 0.0
    remaining = (svid.not_after - now).total_seconds()
    return max(0.0, min(1.0, remaining / lifetime))


class ExpiryWarner:
    """Logs once per SVID when less than 20% of its lifetime remains, and
    once more when it has expired (the runtime fails closed then)."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._warned: str | None = None
        self._expired: str | None = None

    def check(self, svid: X509Svid, now: _dt.datetime) -> float:
        fraction = lifetime_remaining_fraction(svid, now)
        serial = svid.serial_hex
        if now >= svid.not_after:
            if self._expired != serial:
                self._expired = serial
                log.error(
                    "our SVID has expired",
                    source=self._source,
                    spiffe_id=str(svid.spiffe_id),
                    serial=serial,
                    not_after=utc_timestamp(svid.not_after),
                )
        elif fraction < EXPIRY_WARNING_FRACTION and self._warned != serial:
            self._warned = serial
            log.warning(
                "our SVID expires soon and has not been rotated",
                source=self._source,
                spiffe_id=str(svid.spiffe_id),
                serial=serial,
                not_after=utc_timestamp(svid.not_after),
                remaining_fraction=round(fraction, 3),
            )
        return fraction


async def watch_expiry(
    state: IdentityState,
    warner: ExpiryWarner,
    clock: Clock,
    *,
    interval: float = 30.0,
) -> None:
    """Check the current SVID every ``interval`` seconds, forever."""
    while True:
        warner.check(state.current.svid, clock())
        await trio.sleep(interval)
