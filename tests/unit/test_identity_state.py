"""IdentityState and SideCache: every side is built before a swap, and a
side that cannot be built keeps the old snapshot and every old side."""

from __future__ import annotations

import gc

import pytest

from proxy.identity import IdentityLoadError, IdentitySnapshot, IdentityState, SideCache
from proxy.identity.state import describe_error
from tests.integration.tls_support import snapshot
from tests.pki import TestCA


@pytest.fixture(scope="module")
def snaps() -> tuple[IdentitySnapshot, IdentitySnapshot]:
    ca = TestCA.create("a.org")
    return (
        snapshot(ca.issue("spiffe://a.org/svc/hr"), ca),
        snapshot(ca.issue("spiffe://a.org/svc/hr"), ca),
    )


def _serial(snap: IdentitySnapshot) -> str:
    return snap.svid.serial_hex


def test_swap_builds_every_side_first(snaps: tuple[IdentitySnapshot, IdentitySnapshot]) -> None:
    old, new = snaps
    state = IdentityState(old)
    built: list[tuple[str, str]] = []

    def builder(name: str):  # type: ignore[no-untyped-def]
        def build(snap: IdentitySnapshot) -> str:
            built.append((name, _serial(snap)))
            return f"{name}:{_serial(snap)}"

        return build

    one = SideCache(state, builder("one"), name="listener one")
    two = SideCache(state, builder("two"), name="listener two")
    assert one.current() == (old, f"one:{_serial(old)}")  # built at construction
    seen: list[IdentitySnapshot] = []
    state.subscribe(seen.append)
    built.clear()
    state.swap(new)
    assert sorted(built) == [("one", _serial(new)), ("two", _serial(new))]
    assert state.current is new and state.generation == 1
    assert one.current() == (new, f"one:{_serial(new)}")
    assert two.current() == (new, f"two:{_serial(new)}")
    assert seen == [old, new]
    built.clear()
    assert one.current()[1] == f"one:{_serial(new)}" and built == []  # no rebuild per accept


def test_a_side_that_cannot_be_built_keeps_everything_old(
    snaps: tuple[IdentitySnapshot, IdentitySnapshot],
) -> None:
    old, new = snaps
    state = IdentityState(old)
    good = SideCache(state, lambda snap: _serial(snap), name="listener good")

    def picky(snap: IdentitySnapshot) -> str:
        if snap is new:
            raise RuntimeError("ee key too small")
        return _serial(snap)

    bad = SideCache(state, picky, name="route hr")
    swaps: list[IdentitySnapshot] = []
    state.subscribe(swaps.append)
    with pytest.raises(IdentityLoadError) as info:
        state.swap(new)
    message = str(info.value)
    assert "route hr" in message and "ee key too small" in message
    assert _serial(new) in message and "\n" not in message
    assert state.current is old and state.generation == 0
    assert good.current() == (old, _serial(old))  # not half-swapped
    assert bad.current() == (old, _serial(old))
    assert swaps == [old]  # subscribers saw no swap


def test_a_side_that_cannot_be_built_at_construction(
    snaps: tuple[IdentitySnapshot, IdentitySnapshot],
) -> None:
    state = IdentityState(snaps[0])

    def refuse(snap: IdentitySnapshot) -> str:
        raise ValueError("no")

    with pytest.raises(IdentityLoadError, match=r"listener in from spiffe://a.org/svc/hr: no$"):
        SideCache(state, refuse, name="listener in")


def test_dropped_caches_are_not_built(snaps: tuple[IdentitySnapshot, IdentitySnapshot]) -> None:
    old, new = snaps
    state = IdentityState(old)
    calls: list[IdentitySnapshot] = []

    def build(snap: IdentitySnapshot) -> None:
        calls.append(snap)

    cache = SideCache(state, build)
    del cache
    gc.collect()
    state.swap(new)
    assert calls == [old]


def test_describe_error_reads_openssl_error_queues() -> None:
    from OpenSSL import SSL

    assert describe_error(SSL.Error([("SSL routines", "", "ee key too small")])) == (
        "ee key too small"
    )
    assert describe_error(ValueError("plain")) == "plain"
    assert describe_error(RuntimeError()) == "RuntimeError"
