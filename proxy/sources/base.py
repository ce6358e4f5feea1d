"""What every identity source shares: the interface, errors, stats, checks.

Theory of operation: a source produces :class:`IdentitySnapshot` values (our
SVID plus every trust bundle) and hands each new one to
``IdentityState.swap``, which replaces the whole snapshot at once. A source
never swaps in anything that has not passed :func:`build_snapshot`, the one
place that decides whether a set of parts is a usable identity:

* the SVID passed ``load_x509_svid`` (leaf rules, chain order, key matches);
* it is inside its validity period now;
* we have a bundle for our own trust domain, and federated bundles are for
  other trust domains (each at most once);
* our SVID chains to our own bundle, so we never present something our
  peers' copy of the same bundle would refuse.

On any failure the source keeps the current snapshot, logs one line (never
key material: messages are built from our own text and from identity-module
errors, which are key-safe) and counts the failure in :class:`SourceStats`.

``Pulse`` lets a caller (a test, a metrics exporter) wait for "something
happened in this source" without polling or sleeping.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio
from cryptography.hazmat.primitives import serialization

from proxy.identity import (
    BundleError,
    ChainError,
    SvidError,
    TrustBundle,
    TrustBundleSet,
    X509Svid,
    check_validity,
    verify_x509_svid,
)
from proxy.runtime.identity_state import IdentitySnapshot, IdentityState

__all__ = [
    "EXPIRY_WARNING_FRACTION",
    "Clock",
    "ExpiryWarner",
    "IdentityLoadError",
    "IdentitySource",
    "Pulse",
    "SourceStats",
    "build_snapshot",
    "describe_snapshot",
    "lifetime_remaining_fraction",
    "log",
    "snapshot_fingerprint",
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


class IdentityLoadError(ValueError):
    """An identity could not be loaded or was refused.

    The message is one line naming the file or field and the problem; it
    never contains key material.
    """


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


# -- building and comparing snapshots --------------------------------------------


def build_snapshot(
    svid: X509Svid,
    own_bundle: TrustBundle,
    federated: Iterable[TrustBundle],
    now: _dt.datetime,
    *,
    origin: str,
) -> IdentitySnapshot:
    """Check a candidate identity as a whole; IdentityLoadError if it is unusable.

    ``origin`` names where the SVID came from (a file, the Workload API) and
    starts every error message.
    """
    try:
        check_validity(svid.leaf, now)
    except SvidError as exc:
        raise IdentityLoadError(f"{origin}: our SVID is not usable now: {exc}") from None
    own_td = svid.spiffe_id.trust_domain
    if own_bundle.trust_domain != own_td:
        raise IdentityLoadError(
            f"{origin}: the bundle is for {own_bundle.trust_domain} but our SVID "
            f"{svid.spiffe_id} is in {own_td}"
        )
    bundles = [own_bundle]
    for bundle in federated:
        if bundle.trust_domain == own_td:
            raise IdentityLoadError(
                f"{origin}: a federated bundle is for our own trust domain {own_td}"
            )
        bundles.append(bundle)
    try:
        bundle_set = TrustBundleSet(bundles)
    except BundleError as exc:
        raise IdentityLoadError(f"{origin}: {exc}") from None
    try:
        verify_x509_svid(svid.leaf, svid.intermediates, bundle_set, now)
    except ChainError as exc:
        raise IdentityLoadError(
            f"{origin}: our SVID does not verify against our own trust bundle: {exc}"
        ) from None
    return IdentitySnapshot(svid=svid, bundles=bundle_set)


def snapshot_fingerprint(snapshot: IdentitySnapshot) -> str:
    """SHA-256 over our certificate chain and every bundle.

    Equal fingerprints mean a reload changed nothing that a handshake would
    use, so there is nothing to swap. The key is not hashed: load_x509_svid
    guarantees it matches the leaf, so the leaf decides it.
    """
    digest = hashlib.sha256()
    for cert in snapshot.svid.chain:
        der = cert.public_bytes(serialization.Encoding.DER)
        digest.update(len(der).to_bytes(4, "big") + der)
    digest.update(snapshot.bundles.fingerprint().encode("ascii"))
    return digest.hexdigest()


def describe_snapshot(snapshot: IdentitySnapshot) -> dict[str, object]:
    """Log fields for an identity (public parts only)."""
    svid = snapshot.svid
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": svid.serial_hex,
        "not_after": _timestamp(svid.not_after),
        "trust_domains": sorted(str(td) for td in snapshot.bundles.trust_domains),
    }


def _timestamp(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
                    not_after=_timestamp(svid.not_after),
                )
        elif fraction < EXPIRY_WARNING_FRACTION and self._warned != serial:
            self._warned = serial
            log.warning(
                "our SVID expires soon and has not been rotated",
                source=self._source,
                spiffe_id=str(svid.spiffe_id),
                serial=serial,
                not_after=_timestamp(svid.not_after),
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
