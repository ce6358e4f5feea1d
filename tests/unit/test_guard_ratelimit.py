"""GCRA per (peer, rule) with a fake clock, the IETF headers, and bounded
memory that never resets a live limit."""

from __future__ import annotations

import pytest

from proxy.policy.ratelimit import Rate, RateError, RateLimiter, headers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("10/minute", 10, 60),
        ("5/second", 5, 1),
        ("1000/hour", 1000, 3600),
        ("100/30s", 100, 30),
        ("20/1m30s", 20, 90),
        ("7/day", 7, 86400),
        (" 3 / m ", 3, 60),
    ],
)
def test_parse(text: str, count: int, period: int) -> None:
    assert Rate.parse(text) == Rate(count, period)


@pytest.mark.parametrize("text", ["", "10", "0/minute", "10/fortnight", "10/500ms", "-1/s", "x/s"])
def test_parse_errors(text: str) -> None:
    with pytest.raises(RateError, match="invalid rate"):
        Rate.parse(text)


def test_gcra_burst_then_one_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    rate = Rate.parse("10/minute")  # one every 6 s, bursts of 10
    results = [limiter.check("k", rate) for _ in range(10)]
    assert all(r.allowed for r in results)
    assert [r.remaining for r in results] == list(range(9, -1, -1))
    refused = limiter.check("k", rate)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(6.0)
    assert refused.remaining == 0
    clock.now += 5.9
    assert not limiter.check("k", rate).allowed
    clock.now += 0.1
    ok = limiter.check("k", rate)
    assert ok.allowed and ok.remaining == 0
    clock.now += 60  # a full period idle: the whole burst is back
    assert limiter.check("k", rate).remaining == 9


def test_keys_are_independent() -> None:
    limiter = RateLimiter(Clock())
    rate = Rate.parse("1/minute")
    assert limiter.check(("spiffe://a/x", "r1"), rate).allowed
    assert not limiter.check(("spiffe://a/x", "r1"), rate).allowed
    assert limiter.check(("spiffe://a/y", "r1"), rate).allowed
    assert limiter.check(("spiffe://a/x", "r2"), rate).allowed


def test_headers_follow_the_ietf_draft() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    rate = Rate.parse("10/minute")
    first = limiter.check("k", rate)
    assert headers(first, rate, "pay-tools") == [
        ("RateLimit-Policy", '"pay-tools";q=10;w=60'),
        ("RateLimit", '"pay-tools";r=9;t=6'),
    ]
    for _ in range(9):
        limiter.check("k", rate)
    clock.now += 1.5
    refused = limiter.check("k", rate)
    assert headers(refused, rate, 'we"ird') == [
        ("RateLimit-Policy", '"we\\"ird";q=10;w=60'),
        ("RateLimit", '"we\\"ird";r=0;t=5'),
        ("Retry-After", "5"),
    ]


def test_no_reset_under_churn() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, max_entries=8)
    rate = Rate.parse("2/minute")
    assert limiter.check("victim", rate).allowed
    assert limiter.check("victim", rate).allowed
    assert not limiter.check("victim", rate).allowed
    # An attacker churns fresh identities through the table.
    churn = [limiter.check(f"churn-{i}", rate) for i in range(100)]
    assert sum(r.allowed for r in churn) == 7  # the table filled up...
    assert all(r.table_full for r in churn[7:])  # ...then new keys were refused
    assert not limiter.check("victim", rate).allowed  # the live limit survived
    assert len(limiter) == 8
    clock.now += 29
    assert not limiter.check("victim", rate).allowed
    assert limiter.check("newcomer", rate).table_full  # nothing has expired yet
    # Entries whose TAT has passed are equivalent to fresh: those, and only
    # those, are evicted to make room.
    clock.now += 2
    assert limiter.check("newcomer", rate).allowed
    assert len(limiter) == 2  # the victim (live) and the newcomer
    assert limiter.check("victim", rate).allowed  # one interval passed: GCRA, not a reset
    assert not limiter.check("victim", rate).allowed
