"""The current identity snapshot, and per-listener TLS sides built from it.

A snapshot (our SVID plus every trust bundle) is immutable. Rotation swaps
the whole snapshot at once; each listener rebuilds its TLS side the first
time it sees a new snapshot, so a handshake uses either the old parts or the
new ones, never a mix (ghostunnel: read the current context on every accept).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass

from proxy.identity import TrustBundleSet, X509Svid
from proxy.tls import TlsSide


@dataclass(frozen=True)
class IdentitySnapshot:
    svid: X509Svid
    bundles: TrustBundleSet

    @property
    def local_id(self) -> str:
        return str(self.svid.spiffe_id)

    def expired(self, now: _dt.datetime) -> bool:
        return now >= self.svid.not_after


class IdentityState:
    def __init__(self, snapshot: IdentitySnapshot) -> None:
        self._snapshot = snapshot
        self.generation = 0
        self._subscribers: list[Callable[[IdentitySnapshot], None]] = []

    def subscribe(self, callback: Callable[[IdentitySnapshot], None]) -> None:
        """Call ``callback`` now and after every swap (metrics, readiness)."""
        self._subscribers.append(callback)
        callback(self._snapshot)

    @property
    def current(self) -> IdentitySnapshot:
        return self._snapshot

    def swap(self, snapshot: IdentitySnapshot) -> None:
        self._snapshot = snapshot
        self.generation += 1
        for callback in self._subscribers:
            callback(snapshot)


class SideCache:
    """One listener's TLS side, rebuilt when the snapshot changes."""

    def __init__(self, state: IdentityState, build: Callable[[IdentitySnapshot], TlsSide]) -> None:
        self._state = state
        self._build = build
        self._for: IdentitySnapshot | None = None
        self._side: TlsSide | None = None

    def current(self) -> tuple[IdentitySnapshot, TlsSide]:
        snapshot = self._state.current
        if snapshot is not self._for or self._side is None:
            self._side = self._build(snapshot)
            self._for = snapshot
        return snapshot, self._side
