"""DevSource: the embedded dev CA issues, persists and renews our SVID.

Renewal runs on trio's clock; with ``autojump_clock`` an hour passes in no
real time. The source's wall clock is tied to trio's clock, so certificate
times move with it.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from proxy.identity import IdentityState, SpiffeId, TrustDomain, verify_x509_svid
from proxy.sources import DEV_WARNING, DevSource, IdentityLoadError

PAYROLL = SpiffeId.parse("spiffe://payroll.example/agent/payroll")
TD = TrustDomain.parse("payroll.example")
DEADLINE = 10


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


START = dt.datetime.now(dt.UTC).replace(microsecond=0)


def trio_wall_clock() -> dt.datetime:
    """Wall time that advances with trio's (mock) clock."""
    return START + dt.timedelta(seconds=trio.current_time())


async def test_initial_identity(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    source = DevSource(state_dir, PAYROLL)
    with capture_logs() as logs:
        snapshot = await source.initial()
    svid = snapshot.svid
    assert svid.spiffe_id == PAYROLL
    now = dt.datetime.now(dt.UTC)
    lifetime = svid.not_after - now
    assert dt.timedelta(minutes=59) < lifetime <= dt.timedelta(hours=1)
    assert snapshot.bundles.trust_domains == {TD}
    verify_x509_svid(svid.leaf, svid.intermediates, snapshot.bundles, now)
    # The CA lives in the state directory, private.
    ca_dir = state_dir / "dev-ca" / "payroll.example"
    assert _mode(state_dir) == 0o700
    assert _mode(ca_dir) == 0o700
    assert _mode(ca_dir / "ca_key.pem") == 0o600
    assert not list(ca_dir.glob("svid*")), "the SVID and its key stay in memory"
    # Loud, and says what it is.
    warnings = [r for r in logs if r["event"] == DEV_WARNING]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["spiffe_id"] == str(PAYROLL)


async def test_dev_ca_is_kept_across_restarts(tmp_path: Path) -> None:
    first = await DevSource(tmp_path, PAYROLL).initial()
    second = await DevSource(tmp_path, PAYROLL).initial()
    assert first.bundles.get(TD) == second.bundles.get(TD)
    assert first.svid.serial_hex != second.svid.serial_hex
    other = await DevSource(tmp_path, SpiffeId.parse("spiffe://other.example/svc/x")).initial()
    assert other.bundles.trust_domains == {TrustDomain.parse("other.example")}


async def test_custom_ttl(tmp_path: Path) -> None:
    snapshot = await DevSource(tmp_path, PAYROLL, ttl=dt.timedelta(minutes=5)).initial()
    assert snapshot.svid.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=5)


async def test_renews_at_half_life(tmp_path: Path, autojump_clock: object) -> None:
    source = DevSource(tmp_path, PAYROLL, clock=trio_wall_clock)
    state = IdentityState(await source.initial())
    first = state.current.svid
    half_life = (first.not_after - first.not_before).total_seconds() / 2
    # not_before is backdated for clock skew, so half-life comes a little
    # before 30 minutes after issue.
    expected_at = (first.not_before - START).total_seconds() + half_life
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run, state)
            with trio.fail_after(DEADLINE * 3600):
                while state.generation < 1:
                    await source.pulse.wait()
            renewed_at = trio.current_time()
            second = state.current.svid
            with trio.fail_after(DEADLINE * 3600):
                while state.generation < 2:
                    await source.pulse.wait()
            nursery.cancel_scope.cancel()
    assert renewed_at == pytest.approx(expected_at, abs=1)
    assert second.spiffe_id == PAYROLL
    assert second.serial_hex != first.serial_hex
    assert second.not_before > first.not_before
    assert second.not_after - second.not_before == first.not_after - first.not_before
    assert source.stats.reloads_ok == 2
    assert sum(1 for r in logs if r["event"] == DEV_WARNING) == 2


async def test_request_reload_issues_now(tmp_path: Path, autojump_clock: object) -> None:
    source = DevSource(tmp_path, PAYROLL, clock=trio_wall_clock)
    state = IdentityState(await source.initial())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run, state)
        await trio.testing.wait_all_tasks_blocked()  # run() waits for half-life
        assert state.generation == 0
        source.request_reload()
        with trio.fail_after(DEADLINE):
            while state.generation < 1:
                await source.pulse.wait()
        assert trio.current_time() < 60
        nursery.cancel_scope.cancel()


async def test_broken_dev_ca_is_a_load_error(tmp_path: Path) -> None:
    ca_dir = tmp_path / "dev-ca" / "payroll.example"
    ca_dir.mkdir(parents=True)
    (ca_dir / "ca.pem").write_bytes(b"not a certificate")
    (ca_dir / "ca_key.pem").write_bytes(b"not a key")
    with pytest.raises(IdentityLoadError, match=r"dev identity: .*ca\.pem"):
        await DevSource(tmp_path, PAYROLL).initial()


def test_spiffe_id_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(IdentityLoadError, match="needs a SPIFFE ID with a path"):
        DevSource(tmp_path, SpiffeId.parse("spiffe://payroll.example"))
