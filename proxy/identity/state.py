"""The current identity snapshot, and the TLS sides built from it.

Theory of operation: a snapshot (our SVID plus every trust bundle) is
immutable, and rotation swaps the whole snapshot at once. Each listener (and
each outbound route) holds a :class:`SideCache`: its TLS side (a server or
client context, whatever its builder returns) for the current snapshot.
Every cache registers with the state, so :meth:`IdentityState.swap` builds
the side of every cache for the new snapshot *before* it swaps. If any
build fails (OpenSSL refuses an RSA-1024 key that passed every X.509 check,
say) nothing changes: the old snapshot and its sides keep serving and swap
raises :class:`IdentityLoadError` naming the side and the cause; the source
that offered the snapshot logs and counts it. Only when every side is built
are the snapshot and all the sides installed, with no checkpoint between,
so a handshake uses either the old parts or the new ones, never a mix
(ghostunnel: read the current context on every accept).

This module knows nothing of TLS: a side is whatever the builder makes.
The state holds its caches weakly, so a listener that is dropped stops
costing a build on every rotation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from proxy.identity.snapshot import IdentityLoadError, IdentitySnapshot

__all__ = ["IdentityState", "SideCache", "describe_error"]

SideT = TypeVar("SideT")


class IdentityState:
    def __init__(self, snapshot: IdentitySnapshot) -> None:
        self._snapshot = snapshot
        self.generation = 0
        self._subscribers: list[Callable[[IdentitySnapshot], None]] = []
        self._caches: weakref.WeakSet[SideCache[Any]] = weakref.WeakSet()

    def subscribe(self, callback: Callable[[IdentitySnapshot], None]) -> None:
        """Call ``callback`` now and after every swap (metrics, readiness)."""
        self._subscribers.append(callback)
        callback(self._snapshot)

    @property
    def current(self) -> IdentitySnapshot:
        return self._snapshot

    def swap(self, snapshot: IdentitySnapshot) -> None:
        """Build every registered side for ``snapshot``, then make it current.

        Raises IdentityLoadError, and changes nothing, if any side cannot be
        built.
        """
        built: list[tuple[SideCache[Any], object]] = []
        for cache in list(self._caches):
            try:
                built.append((cache, cache.build(snapshot)))
            except Exception as exc:
                raise IdentityLoadError(
                    f"cannot build the TLS context of {cache.name} from "
                    f"{snapshot.local_id} (serial {snapshot.svid.serial_hex}): "
                    f"{describe_error(exc)}"
                ) from exc
        self._snapshot = snapshot
        self.generation += 1
        for cache, side in built:
            cache.install(snapshot, side)
        for callback in self._subscribers:
            callback(snapshot)

    def register(self, cache: SideCache[SideT]) -> None:
        self._caches.add(cache)


class SideCache(Generic[SideT]):
    """One listener's TLS side for the current snapshot.

    The side for the snapshot current at construction is built at once
    (IdentityLoadError if it cannot be); later ones are built by
    :meth:`IdentityState.swap` before it swaps.
    """

    def __init__(
        self,
        state: IdentityState,
        build: Callable[[IdentitySnapshot], SideT],
        *,
        name: str = "a listener",
    ) -> None:
        self.name = name
        self.build = build
        snapshot = state.current
        try:
            side = build(snapshot)
        except Exception as exc:
            raise IdentityLoadError(
                f"cannot build the TLS context of {name} from {snapshot.local_id}: "
                f"{describe_error(exc)}"
            ) from exc
        self._for, self._side = snapshot, side
        state.register(self)

    def install(self, snapshot: IdentitySnapshot, side: SideT) -> None:
        self._for, self._side = snapshot, side

    def current(self) -> tuple[IdentitySnapshot, SideT]:
        return self._for, self._side


def describe_error(exc: BaseException) -> str:
    """One line for an exception from a context builder.

    pyOpenSSL's errors carry a list of (library, function, reason) tuples
    from OpenSSL's error queue; the reasons are what an operator needs
    ("ee key too small"). Anything else shows its own message.
    """
    queue = exc.args[0] if len(exc.args) == 1 else None
    if isinstance(queue, list) and queue and all(isinstance(e, tuple) and e for e in queue):
        return "; ".join(str(entry[-1]) for entry in queue)
    return str(exc) or type(exc).__name__
