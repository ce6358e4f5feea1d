"""Building pyOpenSSL contexts from an identity snapshot.

Every side verifies its peer inside the handshake with the callback of
:mod:`proxy.tls.peercheck` (why it is installed through pyOpenSSL's cffi
handles and which alert a refusal sends are explained there).

Session resumption is off (no tickets, no session cache): a resumed session
would skip the callback and could outlive the peer certificate it was opened
with. Full handshakes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from proxy.identity import TrustBundleSet, X509Svid
from proxy.tls.peercheck import (
    Authorizer,
    Clock,
    PathCache,
    PeerVerification,
    utcnow,
    verify_callback,
)

TlsVersion = Literal["1.2", "1.3"]

# ECDHE with AEAD only, for the TLS 1.2 opt-down. TLS 1.3 suites are all AEAD.
_TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)

# TLS 1.3 suites in the order the TLS 1.2 list above already uses (and Go's
# crypto/tls and BoringSSL, so Envoy, choose): AES-128-GCM first. OpenSSL's
# own order puts AES-256-GCM with SHA-384 first; with server preference on,
# that made every handshake pay for SHA-384's key schedule (no SHA-NI for
# SHA-512) and every record for 14 AES rounds instead of 10, with no gain
# against any attack in our threat model. The same three suites stay on.
_TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# SSL_MODE_NO_AUTO_CHAIN, from openssl/ssl.h (pyOpenSSL names no constant for it).
_MODE_NO_AUTO_CHAIN = 0x8


@dataclass(frozen=True)
class TlsSide:
    """An SSL.Context plus what a connection needs to verify its peer.

    Built once per identity snapshot; connections read the current one on
    every accept or dial, so a rotation never mixes old and new parts.
    """

    context: SSL.Context
    bundles: TrustBundleSet
    authorize: Authorizer
    server: bool
    clock: Clock = utcnow
    # Not an init field: verdicts made under one bundle set must never reach
    # a side built (or replace()d) with another.
    paths: PathCache = field(default_factory=PathCache, init=False, compare=False, repr=False)

    def new_connection(self, sock: Any) -> tuple[SSL.Connection, PeerVerification]:
        """An SSL.Connection on ``sock`` (anything with ``fileno()``): OpenSSL
        reads and writes the socket itself."""
        conn = SSL.Connection(self.context, sock)
        state = PeerVerification(self.bundles, self.authorize, self.clock, self.paths)
        conn.set_app_data(state)
        if self.server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        return conn, state


def _presented(svid: X509Svid, store: crypto.X509Store) -> Sequence[x509.Certificate]:
    """The certificates we send after our leaf. Given none, OpenSSL builds
    the chain from the trust store on every handshake (a signature check:
    a seventh of a server handshake's instructions) and sends the root
    with it. So a leaf-only SVID's chain is built here, once per identity,
    without the self-signed anchor every peer holds (RFC 8446 4.4.2)."""
    if svid.intermediates:
        return svid.intermediates
    leaf = crypto.X509.from_cryptography(svid.leaf)
    try:
        chain = [
            c.to_cryptography() for c in crypto.X509StoreContext(store, leaf).get_verified_chain()
        ]
    except crypto.X509StoreContextError:
        return ()  # not verifiable against our bundles: the leaf alone, as OpenSSL would
    return chain[1:-1] if chain[-1].subject == chain[-1].issuer else chain[1:]


def build_side(
    svid: X509Svid,
    bundles: TrustBundleSet,
    authorize: Authorizer,
    *,
    server: bool,
    min_version: TlsVersion = "1.3",
    clock: Clock = utcnow,
) -> TlsSide:
    ctx = SSL.Context(SSL.TLS_METHOD)
    # Invariant 6: TLS 1.3 unless the operator opts down to 1.2; never below.
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION if min_version == "1.3" else SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_TICKET
        | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # An idle connection keeps no record buffers (OpenSSL allocates ~34 KiB
    # each way per connection otherwise): most sidecar connections are idle.
    # No chain is built from the trust store per handshake: _presented says why.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | _MODE_NO_AUTO_CHAIN)
    ctx.set_tls13_ciphersuites(_TLS13_SUITES)
    if min_version == "1.2":
        ctx.set_cipher_list(_TLS12_CIPHERS)
    store = ctx.get_cert_store()
    assert store is not None
    for authority in bundles.all_authorities():
        store.add_cert(crypto.X509.from_cryptography(authority))
    ctx.use_certificate(svid.leaf)
    for cert in _presented(svid, store):
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(svid.private_key)
    ctx.check_privatekey()
    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    # Not ctx.set_verify(): proxy.tls.peercheck's docstring says why.
    _lib.SSL_CTX_set_verify(ctx._context, mode, verify_callback)
    ctx.set_verify_depth(8)
    return TlsSide(context=ctx, bundles=bundles, authorize=authorize, server=server, clock=clock)
