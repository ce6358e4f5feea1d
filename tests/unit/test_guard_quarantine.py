"""The tripwire trips on each configured condition; quarantines expire and
can be released; nothing trips unless configured."""

from __future__ import annotations

from proxy.identity import SpiffeId
from proxy.policy.quarantine import DenyBurst, GuardConfig, Quarantine, RateSpike, Tripwire

A = SpiffeId.parse("spiffe://payroll.example/agent/a")
B = SpiffeId.parse("spiffe://payroll.example/agent/b")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_configured_never_trips() -> None:
    wire = Tripwire(GuardConfig(), Clock())
    assert all(wire.observe(A, False, "/x") is None for _ in range(1000))
    assert wire.quarantine.list() == []


def test_deny_burst_trips_quarantines_and_expires() -> None:
    clock = Clock()
    wire = Tripwire(GuardConfig(quarantine_for=600, deny_burst=DenyBurst(3, 60)), clock)
    assert wire.observe(A, False) is None
    clock.now += 61  # the first denial leaves the window
    assert wire.observe(A, False) is None
    assert wire.observe(A, True) is None  # allowed requests do not count
    assert wire.observe(A, False) is None
    event = wire.observe(A, False)
    assert event is not None and event.reason == "deny_burst" and event.peer == A
    assert event.until == clock.now + 600
    assert wire.quarantine.is_quarantined(A) == event.until
    assert wire.quarantine.is_quarantined(B) is None
    assert wire.observe(A, False) is None  # no re-trip while quarantined
    [entry] = wire.quarantine.list()
    assert (entry.peer, entry.reason, entry.since) == (A, "deny_burst", clock.now)
    clock.now += 600
    assert wire.quarantine.is_quarantined(A) is None
    assert wire.quarantine.list() == []


def test_release() -> None:
    clock = Clock()
    wire = Tripwire(GuardConfig(deny_burst=DenyBurst(1, 60)), clock)
    assert wire.observe(A, False) is not None
    assert wire.quarantine.release(A) is True
    assert wire.quarantine.release(A) is False
    assert wire.quarantine.is_quarantined(A) is None
    # Released with a clean slate: one more denial is a new burst of one.
    assert wire.observe(A, True) is None


def test_rate_spike_against_the_identitys_own_baseline() -> None:
    clock = Clock()
    spike = RateSpike(factor=5, min_requests=20, interval=10, warmup=3)
    wire = Tripwire(GuardConfig(rate_spike=spike), clock)
    # A steady 8 requests per interval: the baseline.
    for _ in range(6):
        for _ in range(8):
            assert wire.observe(A, True) is None
        clock.now += 10
    # B is busy from the start: no baseline, no warm-up, no trip.
    for _ in range(100):
        assert wire.observe(B, True) is None
    # 5 x 8 = 40: 40 requests are tolerated, the 41st trips.
    events = [wire.observe(A, True) for _ in range(41)]
    assert events[:40] == [None] * 40
    event = events[40]
    assert event is not None and event.reason == "rate_spike" and "baseline of 8.0" in event.detail


def test_rate_spike_needs_min_requests() -> None:
    clock = Clock()
    spike = RateSpike(factor=2, min_requests=50, interval=10, warmup=2)
    wire = Tripwire(GuardConfig(rate_spike=spike), clock)
    for _ in range(3):
        wire.observe(A, True)
        clock.now += 10
    assert all(wire.observe(A, True) is None for _ in range(49))  # 49 > 2 x 1, but < 50
    assert wire.observe(A, True) is not None


def test_new_tool_after_the_learning_period() -> None:
    clock = Clock()
    wire = Tripwire(GuardConfig(new_tool=True, learning_period=3600), clock)
    assert wire.observe(A, True, "crm.read") is None
    clock.now += 3000
    assert wire.observe(A, True, "crm.write") is None  # still learning
    clock.now += 600
    assert wire.observe(A, True, "crm.read") is None  # known
    assert wire.observe(A, True, "/a/path") is None  # paths not watched
    event = wire.observe(A, True, "bank.transfer")
    assert event is not None and event.reason == "new_tool" and "bank.transfer" in event.detail


def test_new_path_when_configured() -> None:
    clock = Clock()
    wire = Tripwire(GuardConfig(new_path=True, learning_period=60), clock)
    wire.observe(A, True, "/timesheets")
    clock.now += 61
    assert wire.observe(A, True, "/timesheets") is None
    assert wire.observe(A, True, "some_tool") is None  # tools not watched
    event = wire.observe(A, True, "/admin")
    assert event is not None and event.reason == "new_path"


def test_quarantine_store_is_bounded_without_dropping_longer_ones() -> None:
    clock = Clock()
    store = Quarantine(clock, max_entries=2)
    store.add(A, "deny_burst", "", clock.now + 100)
    store.add(B, "deny_burst", "", clock.now + 200)
    c = SpiffeId.parse("spiffe://payroll.example/agent/c")
    store.add(c, "deny_burst", "", clock.now + 50)  # ends sooner than all: not kept
    assert store.is_quarantined(c) is None
    store.add(c, "deny_burst", "", clock.now + 300)  # replaces the one ending soonest
    assert [e.peer for e in store.list()] == [B, c]
