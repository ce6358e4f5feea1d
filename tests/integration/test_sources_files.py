"""FilesSource against real files: rotations, broken rotations, SIGHUP.

The source polls every few milliseconds here; tests never sleep, they wait
for the source's pulse (fired after every poll) with a deadline.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from proxy.identity import IdentitySnapshot, IdentityState, TrustDomain, snapshot_fingerprint
from proxy.sources import FilesSource
from tests.pki import Issued, TestCA

POLL = 0.005
DEADLINE = 10


class RecordingState(IdentityState):
    """IdentityState that keeps every snapshot swapped in."""

    def __init__(self, snapshot: IdentitySnapshot) -> None:
        super().__init__(snapshot)
        self.history: list[IdentitySnapshot] = []

    def swap(self, snapshot: IdentitySnapshot) -> None:
        self.history.append(snapshot)
        super().swap(snapshot)


def serial(issued: Issued) -> str:
    return format(issued.cert.serial_number, "x")


def replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic replace, as spiffe-helper and cert-manager do."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_pair(directory: Path, issued: Issued) -> None:
    """Key first, then the certificate: the order spiffe-helper uses."""
    replace(directory / "svid_key.pem", issued.key_pem(), 0o600)
    replace(directory / "svid.pem", issued.cert_pem())


async def wait_until(source: FilesSource, condition: Callable[[], bool]) -> None:
    with trio.fail_after(DEADLINE):
        while not condition():
            await source.pulse.wait()


async def polls_pass(source: FilesSource, count: int) -> None:
    """Wait until the source has polled ``count`` more times."""
    target = source.polls + count
    await wait_until(source, lambda: source.polls >= target)


@asynccontextmanager
async def running(
    directory: Path,
    ca: TestCA,
    issued: Issued,
    *,
    federation: dict[TrustDomain, Path] | None = None,
    poll: float = POLL,
) -> AsyncIterator[tuple[FilesSource, RecordingState]]:
    write_pair(directory, issued)
    if not (directory / "bundle.pem").exists():
        replace(directory / "bundle.pem", ca.bundle_pem())
    source = FilesSource(
        directory / "svid.pem",
        directory / "svid_key.pem",
        directory / "bundle.pem",
        federation or {},
        poll_interval=poll,
    )
    state = RecordingState(await source.initial())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run, state)
        await polls_pass(source, 1)
        yield source, state
        nursery.cancel_scope.cancel()


def assert_all_swaps_valid(state: RecordingState) -> None:
    # Every snapshot that was ever current passed build_snapshot; make the
    # property visible: the key always matches the leaf it was paired with.
    for snapshot in state.history:
        assert snapshot.svid.private_key.public_key() == snapshot.svid.leaf.public_key()


async def test_atomic_rename_rotation_is_picked_up(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    new = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old) as (source, state):
        assert state.current.svid.serial_hex == serial(old)
        write_pair(tmp_path, new)
        await wait_until(source, lambda: state.current.svid.serial_hex == serial(new))
    assert state.generation == 1
    assert source.stats.reloads_ok == 1
    assert source.stats.last_success is not None
    assert_all_swaps_valid(state)


async def test_kubernetes_data_symlink_swap(tmp_path: Path, ca_a: TestCA) -> None:
    """The atomic-writer layout of Secret and ConfigMap volumes."""

    def publish(issued: Issued, stamp: str) -> None:
        version = tmp_path / stamp
        version.mkdir()
        (version / "svid.pem").write_bytes(issued.cert_pem())
        (version / "svid_key.pem").write_bytes(issued.key_pem())
        (version / "bundle.pem").write_bytes(ca_a.bundle_pem())
        os.symlink(stamp, tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    old = ca_a.issue("spiffe://a.org/agent/payroll")
    new = ca_a.issue("spiffe://a.org/agent/payroll")
    publish(old, "..2026_01_01_00_00_00.000000001")
    for name in ("svid.pem", "svid_key.pem", "bundle.pem"):
        os.symlink(f"..data/{name}", tmp_path / name)
    source = FilesSource(
        tmp_path / "svid.pem",
        tmp_path / "svid_key.pem",
        tmp_path / "bundle.pem",
        {},
        poll_interval=POLL,
    )
    state = RecordingState(await source.initial())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run, state)
        publish(new, "..2026_01_01_01_00_00.000000002")
        await wait_until(source, lambda: state.current.svid.serial_hex == serial(new))
        nursery.cancel_scope.cancel()
    assert state.generation == 1
    # All three files changed in one step, so nothing was ever refused.
    assert source.stats.reloads_failed == 0


async def test_half_written_certificate_is_never_swapped_in(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    new = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old) as (source, state):
        replace(tmp_path / "svid_key.pem", new.key_pem(), 0o600)
        full = new.cert_pem()
        # A writer that truncates and writes in place, caught half-way.
        with open(tmp_path / "svid.pem", "wb") as fh:
            fh.write(full[: len(full) // 2])
        await polls_pass(source, 3)
        assert state.generation == 0
        assert state.current.svid.serial_hex == serial(old)
        # Unchanged for a whole poll interval: now it is a counted failure.
        assert source.stats.reloads_failed == 1
        assert "svid.pem" in (source.stats.last_error or "")
        with open(tmp_path / "svid.pem", "wb") as fh:
            fh.write(full)
        await wait_until(source, lambda: state.current.svid.serial_hex == serial(new))
    assert state.generation == 1
    assert_all_swaps_valid(state)


async def test_mismatched_key_keeps_old_identity(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    stranger = ca_a.issue("spiffe://a.org/agent/other")
    new = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old) as (source, state):
        replace(tmp_path / "svid_key.pem", stranger.key_pem(), 0o600)
        await wait_until(source, lambda: source.stats.reloads_failed == 1)
        assert "private key does not match" in (source.stats.last_error or "")
        assert state.current.svid.serial_hex == serial(old)
        # The failure is reported once, not on every poll.
        await polls_pass(source, 3)
        assert source.stats.reloads_failed == 1
        write_pair(tmp_path, new)
        await wait_until(source, lambda: state.current.svid.serial_hex == serial(new))
    assert state.generation == 1
    assert_all_swaps_valid(state)


async def test_garbage_bundle_keeps_old_identity(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old) as (source, state):
        before = snapshot_fingerprint(state.current)
        replace(tmp_path / "bundle.pem", b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        await wait_until(source, lambda: source.stats.reloads_failed == 1)
        assert "bundle.pem" in (source.stats.last_error or "")
        assert snapshot_fingerprint(state.current) == before
        # Add a second CA next to the real one: a valid bundle again, and a
        # new one, so it is swapped in.
        extra = TestCA.create("a.org")
        replace(tmp_path / "bundle.pem", ca_a.bundle_pem() + extra.bundle_pem())
        await wait_until(source, lambda: state.generation == 1)
    bundle = state.current.bundles.get(TrustDomain.parse("a.org"))
    assert bundle is not None and len(bundle.authorities) == 2


async def test_file_deleted_mid_rotation(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    new = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old) as (source, state):
        (tmp_path / "svid_key.pem").unlink()
        await wait_until(source, lambda: source.stats.reloads_failed == 1)
        assert "cannot read key" in (source.stats.last_error or "")
        assert state.current.svid.serial_hex == serial(old)
        write_pair(tmp_path, new)
        await wait_until(source, lambda: state.current.svid.serial_hex == serial(new))
    assert state.generation == 1
    assert source.stats.reloads_ok == 1


async def test_expired_certificate_on_disk_is_refused(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    now = dt.datetime.now(dt.UTC)
    stale = ca_a.issue(
        "spiffe://a.org/agent/payroll",
        not_before=now - dt.timedelta(hours=2),
        not_after=now - dt.timedelta(hours=1),
    )
    async with running(tmp_path, ca_a, old) as (source, state):
        write_pair(tmp_path, stale)
        await wait_until(source, lambda: source.stats.reloads_failed == 1)
        assert "certificate expired" in (source.stats.last_error or "")
    assert state.generation == 0


async def test_request_reload_reads_at_once(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    new = ca_a.issue("spiffe://a.org/agent/payroll")
    # Polls once an hour: only request_reload can explain a prompt swap.
    async with running(tmp_path, ca_a, old, poll=3600) as (source, state):
        write_pair(tmp_path, new)
        await trio.testing.wait_all_tasks_blocked()
        assert state.generation == 0
        source.request_reload()
        await wait_until(source, lambda: state.generation == 1)
    assert state.current.svid.serial_hex == serial(new)


async def test_request_reload_of_a_broken_set_counts_at_once(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old, poll=3600) as (source, state):
        replace(tmp_path / "bundle.pem", b"garbage")
        source.request_reload()
        await wait_until(source, lambda: source.stats.reloads_failed == 1)
    assert state.generation == 0


async def test_rewrite_with_same_content_is_not_swapped(tmp_path: Path, ca_a: TestCA) -> None:
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old) as (source, state):
        seen = source.stats.last_success
        write_pair(tmp_path, old)  # new inodes, same bytes
        await wait_until(source, lambda: source.stats.last_success != seen)
    assert state.generation == 0
    assert (source.stats.reloads_ok, source.stats.reloads_failed) == (0, 0)


async def test_federated_bundle_rotation(tmp_path: Path, ca_a: TestCA, ca_b: TestCA) -> None:
    b_td = TrustDomain.parse("b.org")
    federated = tmp_path / "b.json"
    federated.write_text(ca_b.bundle_jwks())
    old = ca_a.issue("spiffe://a.org/agent/payroll")
    async with running(tmp_path, ca_a, old, federation={b_td: federated}) as (source, state):
        first = state.current.bundles.get(b_td)
        assert first is not None and first.authorities == (ca_b.cert,)
        # b.org rolls its CA: the old root is removed, a new one added.
        rolled = TestCA.create("b.org")
        replace(federated, rolled.bundle_pem())
        await wait_until(source, lambda: state.generation == 1)
        # Garbage in the federated bundle: refused, the rolled bundle stays.
        replace(federated, b"{not json")
        await wait_until(source, lambda: source.stats.reloads_failed == 1)
        assert "b.json" in (source.stats.last_error or "")
    second = state.current.bundles.get(b_td)
    assert second is not None and second.authorities == (rolled.cert,)
    assert state.current.svid.serial_hex == serial(old)
