"""Shared source pieces: snapshot checks, fingerprints, expiry warnings, Pulse."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from proxy.identity import TrustBundle, TrustDomain, X509Svid, load_x509_svid
from proxy.sources import (
    ExpiryWarner,
    IdentityLoadError,
    Pulse,
    SourceStats,
    build_snapshot,
    lifetime_remaining_fraction,
    snapshot_fingerprint,
)
from proxy.sources.base import describe_snapshot
from tests.pki import Issued, TestCA


def _svid(issued: Issued) -> X509Svid:
    return load_x509_svid(issued.cert_pem(), issued.key_pem())


def _td(ca: TestCA) -> TrustDomain:
    return TrustDomain.parse(ca.trust_domain)


def _bundle(ca: TestCA) -> TrustBundle:
    return TrustBundle.from_pem(_td(ca), ca.bundle_pem())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- build_snapshot --------------------------------------------------------------


def test_build_snapshot_accepts_a_consistent_set(ca_a: TestCA, ca_b: TestCA) -> None:
    svid = _svid(ca_a.issue("spiffe://a.org/agent/payroll"))
    snapshot = build_snapshot(svid, _bundle(ca_a), [_bundle(ca_b)], _now(), origin="test")
    assert snapshot.local_id == "spiffe://a.org/agent/payroll"
    assert {str(td) for td in snapshot.bundles.trust_domains} == {"a.org", "b.org"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("expired", "not usable now"),
        ("not_yet_valid", "not usable now"),
        ("bundle_of_other_td", "the bundle is for b.org"),
        ("federated_own_td", "federated bundle is for our own trust domain"),
        ("wrong_ca", "does not verify against our own trust bundle"),
    ],
)
def test_build_snapshot_refuses(ca_a: TestCA, ca_b: TestCA, case: str, expected: str) -> None:
    now = _now()
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    own, federated = _bundle(ca_a), [_bundle(ca_b)]
    if case == "expired":
        issued = ca_a.issue(
            "spiffe://a.org/x",
            not_before=now - dt.timedelta(hours=2),
            not_after=now - dt.timedelta(hours=1),
        )
    elif case == "not_yet_valid":
        issued = ca_a.issue(
            "spiffe://a.org/x",
            not_before=now + dt.timedelta(hours=1),
            not_after=now + dt.timedelta(hours=2),
        )
    elif case == "bundle_of_other_td":
        own = _bundle(ca_b)
        federated = []
    elif case == "federated_own_td":
        federated = [_bundle(ca_a)]
    elif case == "wrong_ca":
        impostor = TestCA.create("a.org")
        own = TrustBundle.from_pem(_td(ca_a), impostor.bundle_pem())
    with pytest.raises(IdentityLoadError, match=expected) as info:
        build_snapshot(_svid(issued), own, federated, now, origin="origin-name")
    assert str(info.value).startswith("origin-name: ")
    assert "\n" not in str(info.value)


def test_fingerprint_tracks_chain_and_bundles(ca_a: TestCA, ca_b: TestCA) -> None:
    now = _now()
    svid = _svid(ca_a.issue("spiffe://a.org/agent/payroll"))
    one = build_snapshot(svid, _bundle(ca_a), [], now, origin="t")
    same = build_snapshot(svid, _bundle(ca_a), [], now, origin="t")
    federated = build_snapshot(svid, _bundle(ca_a), [_bundle(ca_b)], now, origin="t")
    other = build_snapshot(
        _svid(ca_a.issue("spiffe://a.org/agent/payroll")), _bundle(ca_a), [], now, origin="t"
    )
    assert snapshot_fingerprint(one) == snapshot_fingerprint(same)
    assert snapshot_fingerprint(one) != snapshot_fingerprint(federated)
    assert snapshot_fingerprint(one) != snapshot_fingerprint(other)
    described = describe_snapshot(federated)
    assert described["trust_domains"] == ["a.org", "b.org"]
    assert "PRIVATE" not in repr(described)


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
