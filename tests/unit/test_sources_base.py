"""Shared source pieces: expiry warnings, Pulse."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from proxy.sources import ExpiryWarner, Pulse, SourceStats, lifetime_remaining_fraction
from tests.pki import TestCA
from tests.unit.test_identity_snapshot import _now, _svid

# -- expiry ------------------------------------------------------------------------


def test_lifetime_remaining_fraction(ca_a: TestCA) -> None:
    start = _now().replace(microsecond=0)
    svid = _svid(
        ca_a.issue("spiffe://a.org/x", not_before=start, not_after=start + dt.timedelta(hours=1))
    )
    assert lifetime_remaining_fraction(svid, start - dt.timedelta(minutes=5)) == 1.0
    assert lifetime_remaining_fraction(svid, start) == 1.0
    assert lifetime_remaining_fraction(svid, start + dt.timedelta(minutes=30)) == 0.5
    assert lifetime_remaining_fraction(svid, start + dt.timedelta(minutes=54)) == pytest.approx(0.1)
    assert lifetime_remaining_fraction(svid, start + dt.timedelta(hours=2)) == 0.0


def test_expiry_warning_below_twenty_percent_once_per_svid(ca_a: TestCA) -> None:
    start = _now().replace(microsecond=0)
    svid = _svid(
        ca_a.issue("spiffe://a.org/x", not_before=start, not_after=start + dt.timedelta(hours=1))
    )
    warner = ExpiryWarner("files")
    with capture_logs() as logs:
        warner.check(svid, start + dt.timedelta(minutes=47))  # 21.7% left: quiet
        assert logs == []
        warner.check(svid, start + dt.timedelta(minutes=49))  # 18.3% left
        warner.check(svid, start + dt.timedelta(minutes=55))  # still the same SVID: once
        warner.check(svid, start + dt.timedelta(minutes=61))  # expired: an error, once
        warner.check(svid, start + dt.timedelta(minutes=62))
    assert [(r["log_level"], r["event"]) for r in logs] == [
        ("warning", "our SVID expires soon and has not been rotated"),
        ("error", "our SVID has expired"),
    ]
    assert logs[0]["source"] == "files"
    assert logs[0]["remaining_fraction"] == pytest.approx(0.183, abs=0.001)


# -- stats and pulse -------------------------------------------------------------------


def test_source_stats_record() -> None:
    stats = SourceStats()
    now = _now()
    stats.record_success(now, swapped=False)
    assert (stats.reloads_ok, stats.last_success) == (0, now)
    stats.record_success(now, swapped=True)
    stats.record_failure("bad file")
    assert (stats.reloads_ok, stats.reloads_failed, stats.last_error) == (1, 1, "bad file")


async def test_pulse_wakes_every_waiter() -> None:
    pulse = Pulse()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await pulse.wait()
        woken.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 1)
        nursery.start_soon(waiter, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        pulse.fire()
    assert sorted(woken) == [1, 2]


# -- the loaders' backstop ---------------------------------------------------------


def test_loading_turns_any_exception_into_one_identity_error() -> None:
    from proxy.identity import IdentityLoadError
    from proxy.sources.base import loading

    def buggy() -> None:
        raise TypeError("unhashable type: 'list' -----BEGIN PRIVATE KEY----- MIGH")

    with pytest.raises(IdentityLoadError) as info:
        loading("certificate /run/svid.pem", buggy)
    message = str(info.value)
    assert message.startswith("certificate /run/svid.pem: unexpected TypeError")
    assert "PRIVATE" not in message and "unhashable" not in message  # never the bug's text
    assert isinstance(info.value.__cause__, TypeError)

    def refused() -> None:
        raise IdentityLoadError("as documented")

    with pytest.raises(IdentityLoadError, match=r"^as documented$"):
        loading("x", refused)
    assert loading("x", lambda: 42) == 42
