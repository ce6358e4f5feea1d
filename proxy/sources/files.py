"""The files source: our SVID, key and bundles from files that others rotate.

Theory of operation: whoever writes the files (spiffe-helper, cert-manager's
CSI driver, a Kubernetes Secret volume, ``agent-proxy ca issue``) replaces
them while we run. We poll, we do not use inotify: every ``poll_interval``
a trio task takes a *signature* of the file set, for each file the path it
resolves to through any symlinks and the (device, inode, mtime, ctime,
size) of that final file. Each way of rotating changes it:

* an atomic rename (write a temporary file, ``rename`` over the name) gives
  the name a new inode;
* Kubernetes' ``..data`` swap (``svid.pem -> ..data/svid.pem``, ``..data ->
  ..2026_01_01_...``, and ``..data`` itself atomically replaced by a symlink
  to a new timestamped directory) changes the resolved path;
* a rewrite in place changes mtime, ctime or size.

When the signature differs from the last one we settled, we read *all* the
files and validate the whole set (``build_snapshot``): a certificate is
never paired with a key or bundle from another generation, because a
mismatched pair fails ``load_x509_svid`` and the set is refused.

Writers are not atomic as a set. spiffe-helper replaces three files one
after another and a careless writer truncates and rewrites in place, so
between two writes we may see a new key with the old certificate, or half a
certificate. A set that fails validation the first time we see it is
therefore not counted yet: we look again on the next tick. Only a set that
still fails when unchanged a full poll interval later (or any failure on an
explicit reload) is logged as a warning and counted. Either way the current
identity stays. A failed set is retried quietly every ``_RETRY_FAILED``
seconds even if unchanged, so a certificate that was not yet valid (clock
skew) is picked up once it is.

A new set that validates but equals the current identity (same chain, same
bundles) is not swapped. ``request_reload`` (SIGHUP) wakes the loop and
forces a read even when the signature is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trio

from proxy.identity import (
    BundleError,
    IdentityLoadError,
    IdentitySnapshot,
    IdentityState,
    SvidError,
    TrustBundle,
    TrustDomain,
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

__all__ = ["FilesSource", "load_snapshot_from_files"]

# Retry a set that failed, even if unchanged, this often (seconds).
_RETRY_FAILED = 30.0

_Signature = tuple[tuple[object, ...], ...]


@dataclass(frozen=True)
class _FileSet:
    cert: Path
    key: Path
    bundle: Path
    federation: tuple[tuple[TrustDomain, Path], ...]

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key, self.bundle, *(p for _, p in self.federation))


@dataclass(frozen=True)
class _FileData:
    cert: bytes
    key: bytes = b""  # never shown: a key's bytes must not reach a log or repr
    bundle: bytes = b""
    federation: tuple[bytes, ...] = ()

    def __repr__(self) -> str:
        return "_FileData(...)"


def _file_set(
    cert: Path, key: Path, bundle: Path, federation: Mapping[TrustDomain, Path]
) -> _FileSet:
    return _FileSet(
        cert=Path(cert),
        key=Path(key),
        bundle=Path(bundle),
        federation=tuple((td, Path(path)) for td, path in federation.items()),
    )


def _read(path: Path, role: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityLoadError(f"cannot read {role} {path}: {exc.strerror or exc}") from None


def _read_all(files: _FileSet) -> _FileData:
    return _FileData(
        cert=_read(files.cert, "certificate"),
        key=_read(files.key, "key"),
        bundle=_read(files.bundle, "trust bundle"),
        federation=tuple(
            _read(path, f"federated bundle for {td}") for td, path in files.federation
        ),
    )


def _snapshot(files: _FileSet, data: _FileData, now: datetime) -> IdentitySnapshot:
    return loading(f"certificate {files.cert}", lambda: _parse(files, data, now))


def _parse(files: _FileSet, data: _FileData, now: datetime) -> IdentitySnapshot:
    try:
        svid = load_x509_svid(data.cert, data.key)
    except SvidError as exc:
        raise IdentityLoadError(f"certificate {files.cert} / key {files.key}: {exc}") from None
    own_td = svid.spiffe_id.trust_domain
    try:
        own_bundle = TrustBundle.from_bytes(own_td, data.bundle)
    except BundleError as exc:
        raise IdentityLoadError(f"trust bundle {files.bundle}: {exc}") from None
    federated: list[TrustBundle] = []
    for (td, path), content in zip(files.federation, data.federation, strict=True):
        if td == own_td:
            raise IdentityLoadError(
                f"federated bundle {path}: {td} is our own trust domain "
                "(its bundle is the main trust bundle)"
            )
        try:
            federated.append(TrustBundle.from_bytes(td, content))
        except BundleError as exc:
            raise IdentityLoadError(f"federated bundle {path}: {exc}") from None
    return build_snapshot(svid, own_bundle, federated, now, origin=f"certificate {files.cert}")


def load_snapshot_from_files(
    cert: Path,
    key: Path,
    bundle: Path,
    federation: Mapping[TrustDomain, Path],
    now: datetime,
) -> IdentitySnapshot:
    """Read and check our SVID, its key, our bundle and federated bundles.

    Raises IdentityLoadError naming the file and the problem: unreadable,
    not an SVID, key does not match, expired or not yet valid, a federated
    bundle for our own trust domain, or an SVID that does not chain to our
    own bundle.
    """
    files = _file_set(cert, key, bundle, federation)
    return _snapshot(files, _read_all(files), now)


def _signature(files: _FileSet) -> _Signature:
    parts: list[tuple[object, ...]] = []
    for path in files.paths():
        try:
            # os.stat follows symlinks: this is the file the name means now.
            st = os.stat(path)
            target = os.path.realpath(path)
        except OSError as exc:
            parts.append(("error", str(path), exc.errno))
            continue
        parts.append((target, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return tuple(parts)


class FilesSource:
    """Watches the certificate, key, bundle and federated bundle files."""

    name = "files"

    def __init__(
        self,
        cert: Path,
        key: Path,
        bundle: Path,
        federation: Mapping[TrustDomain, Path] | None = None,
        *,
        poll_interval: float = 1.0,
        clock: Clock = utc_now,
    ) -> None:
        if not poll_interval > 0:
            raise ValueError("poll_interval must be positive")
        self._files = _file_set(cert, key, bundle, federation or {})
        self._poll_interval = poll_interval
        self._clock = clock
        self.stats = SourceStats()
        self.pulse = Pulse()
        """Fires after every poll (and so after every swap or counted failure)."""
        self.polls = 0
        self._expiry = ExpiryWarner(self.name)
        self._wake = trio.Event()
        self._reload_requested = False
        self._seen: _Signature | None = None  # signature at the previous poll
        self._settled: _Signature | None = None  # last signature loaded successfully
        self._failed: tuple[_Signature, str] | None = None  # last counted failure
        self._failed_at = 0.0  # trio time of the last attempt on the failed set

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    async def initial(self) -> IdentitySnapshot:
        signature = _signature(self._files)
        now = self._clock()
        snapshot = load_snapshot_from_files(
            self._files.cert,
            self._files.key,
            self._files.bundle,
            dict(self._files.federation),
            now,
        )
        self._seen = self._settled = signature
        self.stats.record_success(now, swapped=False)
        log.info("identity loaded", source=self.name, **describe_snapshot(snapshot))
        return snapshot

    async def run(self, state: IdentityState) -> None:
        while True:
            forced = self._reload_requested
            self._reload_requested = False
            if self._wake.is_set():
                self._wake = trio.Event()
            try:
                self._poll(state, forced=forced)
            except Exception as exc:
                # A bug outside the loaders (signature, bookkeeping) must not
                # stop rotation either; the current identity stays.
                self._count_failure(f"files source: unexpected {type(exc).__name__}")
            self.polls += 1
            self._expiry.check(state.current.svid, self._clock())
            self.pulse.fire()
            with trio.move_on_after(self._poll_interval):
                await self._wake.wait()

    # -- one poll --------------------------------------------------------------

    def _poll(self, state: IdentityState, *, forced: bool) -> None:
        signature = _signature(self._files)
        first_sight = signature != self._seen
        self._seen = signature
        if not forced:
            if signature == self._settled:
                return
            if (
                self._failed is not None
                and self._failed[0] == signature
                and trio.current_time() - self._failed_at < _RETRY_FAILED
            ):
                return
        now = self._clock()
        try:
            data = _read_all(self._files)
            if _signature(self._files) != signature:
                # A writer is at work right now; look again next tick.
                self._seen = None
                return
            swapped = swap_in(state, _snapshot(self._files, data, now), source=self.name)
        except IdentityLoadError as exc:
            self._refused(signature, str(exc), first_sight=first_sight, forced=forced)
            return
        self._settled = signature
        self._failed = None
        self.stats.record_success(now, swapped=swapped)
        if not swapped:
            (log.info if forced else log.debug)(
                "identity files reloaded; identity unchanged", source=self.name
            )

    def _refused(
        self, signature: _Signature, error: str, *, first_sight: bool, forced: bool
    ) -> None:
        if first_sight and not forced:
            # Possibly caught between two writes; only count it if it stays.
            log.debug(
                "identity files changed but are not a valid set yet; checking again",
                source=self.name,
                error=error,
            )
            return
        self._failed_at = trio.current_time()
        if self._failed == (signature, error):
            return  # the quiet periodic retry of a set already reported
        self._failed = (signature, error)
        self._count_failure(error)

    def _count_failure(self, error: str) -> None:
        self.stats.record_failure(error)
        log.error(
            "identity reload failed; keeping the current identity",
            source=self.name,
            error=error,
        )
