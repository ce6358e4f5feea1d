"""What a side sends after its leaf, seen by the peer over a real handshake:
the SVID's own intermediates; for a leaf-only SVID, the intermediates our
bundles hold for it, found once when the side is built; never the
self-signed root that the peer must hold already (RFC 8446 4.4.2), which
OpenSSL's own chain building added, rebuilding it with a signature check
on every handshake."""

from __future__ import annotations

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.identity import (
    IdentitySnapshot,
    TrustBundle,
    TrustBundleSet,
    TrustDomain,
    load_x509_svid,
)
from proxy.policy import decide_peer, parse_patterns
from proxy.tls import TlsSide, TLSStream, build_side
from tests.integration.tls_support import side, tcp_pair
from tests.pki import Issued, TestCA

SERVER_ID = "spiffe://a.org/svc/hr"
CLIENT_ID = "spiffe://a.org/agent/payroll"


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


async def _handshake(server: TlsSide, client: TlsSide) -> tuple[list[bytes], list[bytes]]:
    """(what the client received from the server, what the server received
    from the client), each as DER, leaf first."""
    connector, accepted = await tcp_pair()
    theirs, ours = TLSStream(accepted, server), TLSStream(connector, client)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(theirs.do_handshake)
            nursery.start_soon(ours.do_handshake)
    from_server = ours.ssl_connection.get_peer_cert_chain() or []
    # A server's view of the client's chain leaves the leaf out (SSL_get_peer_cert_chain).
    client_leaf = theirs.ssl_connection.get_peer_certificate()
    assert client_leaf is not None
    from_client = [client_leaf, *(theirs.ssl_connection.get_peer_cert_chain() or [])]
    for stream in (theirs, ours):
        stream.close_now()
    connector.socket.close()
    accepted.socket.close()
    der = serialization.Encoding.DER
    return (
        [c.to_cryptography().public_bytes(der) for c in from_server],
        [c.to_cryptography().public_bytes(der) for c in from_client],
    )


def _der(*certs: x509.Certificate) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


async def test_a_leaf_issued_by_the_root_goes_alone(ca_a: TestCA) -> None:
    server = ca_a.issue(SERVER_ID)
    client = ca_a.issue(CLIENT_ID)
    from_server, from_client = await _handshake(
        side(server, (ca_a,), [CLIENT_ID], server=True),
        side(client, (ca_a,), [SERVER_ID], server=False),
    )
    assert from_server == _der(server.cert)
    assert from_client == _der(client.cert)


async def test_an_svid_with_its_intermediates_is_sent_as_given(ca_a: TestCA) -> None:
    issuing = ca_a.intermediate()
    server, client = issuing.issue(SERVER_ID), issuing.issue(CLIENT_ID)
    from_server, from_client = await _handshake(
        side(server, (ca_a,), [CLIENT_ID], server=True),
        side(client, (ca_a,), [SERVER_ID], server=False),
    )
    assert from_server == _der(server.cert, issuing.cert)
    assert from_client == _der(client.cert, issuing.cert)


async def test_a_leaf_only_svid_is_completed_from_our_bundle_once(ca_a: TestCA) -> None:
    """The SVID file holds the leaf alone and our bundle holds its issuing
    intermediate: the peer, whose bundle has only the root, still gets the
    intermediate, and still no root."""
    issuing = ca_a.intermediate()
    leaf_only = issuing.issue(SERVER_ID)
    ours = IdentitySnapshot(
        svid=load_x509_svid(_pem(leaf_only.cert), leaf_only.key_pem()),
        bundles=TrustBundleSet(
            [TrustBundle.from_pem(TrustDomain.parse("a.org"), _pem(ca_a.cert, issuing.cert))]
        ),
    )
    patterns = parse_patterns([CLIENT_ID])
    server = build_side(
        ours.svid, ours.bundles, lambda peer: decide_peer(peer, patterns), server=True
    )
    client: Issued = ca_a.issue(CLIENT_ID)
    for _ in range(2):  # the same chain on every handshake of the side
        from_server, _ = await _handshake(server, side(client, (ca_a,), [SERVER_ID], server=False))
        assert from_server == _der(leaf_only.cert, issuing.cert)
