"""The dev source: an embedded development CA issues our SVID, for development only.

Theory of operation: when no identity is configured, ``agent-proxy run``
keeps a dev CA (proxy/devca.py) in a state directory, one per trust domain
under ``<state_dir>/dev-ca/<trust domain>/`` (directories 0700, the CA key
0600), creating it on first use and loading it afterwards so that peers
that trust its ``ca.pem`` keep trusting us across restarts. It issues our
configured SPIFFE ID a short SVID (1 hour by default) held only in memory,
and issues a fresh one at half-life, as SPIRE does. Our bundle is the dev
CA's certificate; there are no federated trust domains.

The renewal sleeps on trio's clock, so tests drive it with
``trio.testing.MockClock``; certificate times come from ``clock`` (wall
time), which a test may tie to trio's clock.

Every issue logs a loud warning: a CA key on local disk is no production
identity.
"""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path

import trio

from proxy.devca import DEFAULT_SVID_TTL, DevCA, DevCAError
from proxy.fileutil import ensure_private_dir
from proxy.identity import (
    IdentityLoadError,
    IdentitySnapshot,
    IdentityState,
    SpiffeId,
    SvidError,
    TrustBundle,
    build_snapshot,
    describe_snapshot,
    load_x509_svid,
)
from proxy.sources.base import (
    Clock,
    ExpiryWarner,
    Pulse,
    SourceStats,
    loading,
    log,
    swap_in,
    utc_now,
)

__all__ = ["DEV_WARNING", "DevSource"]

DEV_WARNING = "DEVELOPMENT identity: embedded dev CA, not for production"

# After a failed renewal, try again this soon (seconds), or sooner if our
# SVID expires before then.
_RETRY_AFTER = 30.0


class DevSource:
    """Issues and renews our SVID from a dev CA kept in ``state_dir``."""

    name = "dev"

    def __init__(
        self,
        state_dir: Path,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_SVID_TTL,
        clock: Clock = utc_now,
    ) -> None:
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        if not spiffe_id.path:
            raise IdentityLoadError(
                f"dev identity {spiffe_id}: an SVID needs a SPIFFE ID with a path"
            )
        self.state_dir = Path(state_dir)
        self.spiffe_id = spiffe_id
        self.ca_dir = self.state_dir / "dev-ca" / spiffe_id.trust_domain.name
        self._ttl = ttl
        self._clock = clock
        self._ca: DevCA | None = None
        self.stats = SourceStats()
        self.pulse = Pulse()
        """Fires after every renewal attempt."""
        self._expiry = ExpiryWarner(self.name)
        self._wake = trio.Event()

    def request_reload(self) -> None:
        """SIGHUP: issue a fresh SVID now."""
        self._wake.set()

    async def initial(self) -> IdentitySnapshot:
        snapshot = self._issue()
        self.stats.record_success(self._clock(), swapped=False)
        self._announce(snapshot)
        return snapshot

    async def run(self, state: IdentityState) -> None:
        while True:
            current = state.current.svid
            now = self._clock()
            self._expiry.check(current, now)
            half_life = current.not_before + (current.not_after - current.not_before) / 2
            delay = max(0.0, (half_life - now).total_seconds())
            with trio.move_on_after(delay):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
            await self._renew(state)

    # -- internals ---------------------------------------------------------------

    async def _renew(self, state: IdentityState) -> None:
        try:
            snapshot = self._issue()
            swap_in(state, snapshot, source=self.name)
        except Exception as exc:
            error = str(exc) if isinstance(exc, IdentityLoadError) else type(exc).__name__
            self.stats.record_failure(error)
            log.error(
                "dev identity renewal failed; keeping the current identity",
                source=self.name,
                error=error,
            )
            self.pulse.fire()
            remaining = (state.current.svid.not_after - self._clock()).total_seconds()
            await trio.sleep(max(1.0, min(_RETRY_AFTER, remaining / 2)))
            return
        self.stats.record_success(self._clock(), swapped=True)
        self._announce(snapshot)
        self.pulse.fire()

    def _announce(self, snapshot: IdentitySnapshot) -> None:
        log.warning(
            DEV_WARNING,
            source=self.name,
            state_dir=str(self.state_dir),
            ca=str(self.ca_dir / "ca.pem"),
            **describe_snapshot(snapshot),
        )

    def _load_ca(self) -> DevCA:
        if self._ca is not None:
            return self._ca
        try:
            ensure_private_dir(self.state_dir)
        except OSError as exc:
            raise IdentityLoadError(
                f"dev identity: cannot create state directory {self.state_dir}: "
                f"{exc.strerror or exc}"
            ) from None
        mode = stat.S_IMODE(os.stat(self.state_dir).st_mode)
        if mode & 0o077:
            log.warning(
                "dev identity state directory is accessible to other users",
                source=self.name,
                state_dir=str(self.state_dir),
                mode=oct(mode),
            )
        try:
            if (self.ca_dir / "ca.pem").exists() or (self.ca_dir / "ca_key.pem").exists():
                ca = DevCA.load(self.ca_dir)
            else:
                ca = DevCA.init(self.ca_dir, self.spiffe_id.trust_domain, now=self._clock())
                log.warning(
                    "dev identity: created a new dev CA",
                    source=self.name,
                    ca=str(ca.cert_path),
                )
        except DevCAError as exc:
            raise IdentityLoadError(f"dev identity: {exc}") from None
        if ca.trust_domain != self.spiffe_id.trust_domain:
            raise IdentityLoadError(
                f"dev identity: the dev CA in {self.ca_dir} is for {ca.trust_domain}, "
                f"not {self.spiffe_id.trust_domain}"
            )
        self._ca = ca
        return ca

    def _issue(self) -> IdentitySnapshot:
        return loading(f"dev identity {self.spiffe_id}", self._issue_unguarded)

    def _issue_unguarded(self) -> IdentitySnapshot:
        ca = self._load_ca()
        now = self._clock()
        origin = f"dev identity {self.spiffe_id}"
        try:
            issued = ca.issue(self.spiffe_id, ttl=self._ttl, now=now)
        except DevCAError as exc:
            raise IdentityLoadError(
                f"{origin}: {exc} (remove {self.ca_dir} to create a new dev CA)"
            ) from None
        try:
            svid = load_x509_svid(issued.cert_pem, issued.key_pem)
        except SvidError as exc:  # pragma: no cover - our own CA's output
            raise IdentityLoadError(f"{origin}: {exc}") from None
        bundle = TrustBundle(ca.trust_domain, (ca.certificate,))
        return build_snapshot(svid, bundle, (), now, origin=origin)
