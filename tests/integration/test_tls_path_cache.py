"""The verified-path cache of a TLS side (proxy.tls.peercheck.PathCache): a
peer's second handshake with the same chain reuses the first verdict on
its path, while the connection policy, the validity window and the
scoped-trust check still decide every handshake."""

from __future__ import annotations

import datetime as dt

import trio
import trio.testing

from proxy.identity import VerifiedSvid
from proxy.policy import decide_peer, parse_patterns
from proxy.tls import TLSHandshakeError, TlsSide, TLSStream, build_side
from tests.integration.tls_support import snapshot, tcp_pair
from tests.pki import Issued, TestCA


def _side(
    issued: Issued,
    cas: tuple[TestCA, ...],
    patterns: list[list[str]],
    *,
    server: bool,
    now: list[dt.datetime] | None = None,
) -> TlsSide:
    # ``patterns[0]`` and ``now[0]`` are read at each handshake: a test swaps them.
    snap = snapshot(issued, *cas)

    def clock() -> dt.datetime:
        return now[0] if now else dt.datetime.now(dt.UTC)

    return build_side(
        snap.svid,
        snap.bundles,
        lambda peer: decide_peer(peer, parse_patterns(patterns[0])),
        server=server,
        clock=clock,
    )


async def _handshake(server_side: TlsSide, client_side: TlsSide) -> tuple[TLSStream, object]:
    """(the server's stream, what its handshake raised or None)."""
    client_tcp, server_tcp = await tcp_pair()
    server, client = TLSStream(server_tcp, server_side), TLSStream(client_tcp, client_side)
    failure: list[object] = [None]

    async def serve() -> None:
        try:
            await server.do_handshake()
        except TLSHandshakeError as exc:
            failure[0] = exc

    async def dial() -> None:
        try:
            await client.do_handshake()
            await client.receive_some()  # the server's verdict: data, an alert, or EOF
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(dial)
            await trio.testing.wait_all_tasks_blocked()
            if failure[0] is None:
                await server.aclose()
    await client.aclose()
    await server.aclose()
    return server, failure[0]


async def test_a_second_handshake_with_the_same_chain_reuses_its_verified_path(
    ca_a: TestCA,
) -> None:
    server_side = _side(ca_a.issue("spiffe://a.org/svc/hr"), (ca_a,), [["spiffe://a.org/**"]],
                        server=True)  # fmt: skip
    client_side = _side(ca_a.issue("spiffe://a.org/agent/payroll"), (ca_a,),
                        [["spiffe://a.org/**"]], server=False)  # fmt: skip
    first, failed = await _handshake(server_side, client_side)
    assert failed is None
    second, failed = await _handshake(server_side, client_side)
    assert failed is None
    assert isinstance(first.peer.verified, VerifiedSvid)
    # The same verdict object: the path was neither parsed nor checked again.
    assert second.peer.verified is first.peer.verified
    assert str(second.peer.verified.spiffe_id) == "spiffe://a.org/agent/payroll"


async def test_the_connection_policy_still_runs_on_a_cached_path(ca_a: TestCA) -> None:
    allowed = [["spiffe://a.org/agent/*"]]
    server_side = _side(ca_a.issue("spiffe://a.org/svc/hr"), (ca_a,), allowed, server=True)
    client_side = _side(ca_a.issue("spiffe://a.org/agent/payroll"), (ca_a,),
                        [["spiffe://a.org/**"]], server=False)  # fmt: skip
    _, failed = await _handshake(server_side, client_side)
    assert failed is None
    allowed[0] = ["spiffe://a.org/agent/marketing"]  # a reload revokes payroll
    _, failed = await _handshake(server_side, client_side)
    assert isinstance(failed, TLSHandshakeError)
    assert failed.reason == "peer_not_allowed"


async def test_a_cached_path_past_its_validity_is_refused_as_expired(ca_a: TestCA) -> None:
    now = [dt.datetime.now(dt.UTC)]
    peer = ca_a.issue("spiffe://a.org/agent/payroll")
    server_side = _side(ca_a.issue("spiffe://a.org/svc/hr"), (ca_a,), [["spiffe://a.org/**"]],
                        server=True, now=now)  # fmt: skip
    client_side = _side(peer, (ca_a,), [["spiffe://a.org/**"]], server=False)
    _, failed = await _handshake(server_side, client_side)
    assert failed is None
    # Our clock passes the peer's notAfter (OpenSSL's, the real one, does not).
    now[0] = peer.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    _, failed = await _handshake(server_side, client_side)
    assert isinstance(failed, TLSHandshakeError)
    assert failed.reason == "certificate_expired"


async def test_a_cross_domain_forgery_is_refused_on_every_handshake(
    ca_a: TestCA, ca_b: TestCA
) -> None:
    # Refusals are never remembered, and neither is a path anchored outside
    # the leaf's own trust domain.
    forged = ca_a.issue("spiffe://b.org/agent/payroll")
    server_side = _side(ca_a.issue("spiffe://a.org/svc/hr"), (ca_a, ca_b),
                        [["spiffe://b.org/**"]], server=True)  # fmt: skip
    client_side = _side(forged, (ca_a, ca_b), [["spiffe://a.org/**"]], server=False)
    for _ in range(2):
        _, failed = await _handshake(server_side, client_side)
        assert isinstance(failed, TLSHandshakeError)
        assert failed.reason == "untrusted_chain"


def test_a_side_built_from_another_never_inherits_its_verdicts(ca_a: TestCA) -> None:
    """Verdicts hold for one bundle set only: a side made from another with
    ``dataclasses.replace`` (new bundles, say) starts with an empty cache,
    and the cache is not a constructor argument at all."""
    import dataclasses

    import pytest

    side = _side(ca_a.issue(f"spiffe://{ca_a.trust_domain}/payroll"), (ca_a,), [["*"]], server=True)
    other = dataclasses.replace(side)
    assert other.paths is not side.paths
    with pytest.raises(TypeError):
        TlsSide(  # type: ignore[call-arg]
            context=side.context,
            bundles=side.bundles,
            authorize=side.authorize,
            server=True,
            paths=side.paths,
        )


def test_the_cache_keeps_the_paths_in_use_and_drops_the_least_recent(ca_a: TestCA) -> None:
    from proxy.identity.verify import verify_x509_svid
    from proxy.tls.peercheck import PathCache

    leaf = ca_a.issue(f"spiffe://{ca_a.trust_domain}/payroll")
    now = dt.datetime.now(dt.UTC)
    verified = verify_x509_svid(leaf.cert, [], snapshot(leaf, ca_a).bundles, now)
    cache = PathCache()
    for i in range(PathCache.MAX):
        cache.put(b"path-%d" % i, verified)
    assert cache.get(b"path-0", now) is verified  # in use: now the most recent
    cache.put(b"one more", verified)
    assert cache.get(b"path-0", now) is verified
    assert cache.get(b"path-1", now) is None  # the least recently used went
    assert cache.get(b"one more", now) is verified
