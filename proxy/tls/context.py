"""Building pyOpenSSL contexts from an identity snapshot, with SPIFFE peer
verification inside the handshake.

Theory of operation: OpenSSL builds and checks the peer's chain against the
union of every trust bundle we hold (signatures, validity times, CA flags).
That alone is not enough for SPIFFE: an SVID for ``spiffe://b.org/...`` that
chains to a.org's CA would pass. So the verify callback records the chain
OpenSSL built, depth by depth (OpenSSL calls it from the anchor down to the
leaf), and at depth 0 hands it to :func:`proxy.identity.verify_x509_svid`,
which checks the X509-SVID leaf rules and re-verifies the path against the
bundle of the leaf's *own* trust domain only. Then the connection policy
(inbound allowlist or outbound expected IDs) runs. Any failure returns
False from the callback, so the peer gets a TLS alert and the handshake
fails; the reason is kept on the per-connection :class:`PeerVerification`
for the audit record.

Session resumption is off (no tickets, no session cache): a resumed session
would skip the callback and could outlive the peer certificate it was opened
with. Full handshakes only.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from OpenSSL import SSL, crypto

from proxy.identity import (
    ChainError,
    SpiffeId,
    TrustBundleSet,
    VerifiedSvid,
    X509Svid,
    accept_verified_path,
    verify_x509_svid,
)
from proxy.policy import PeerDecision

TlsVersion = Literal["1.2", "1.3"]
Authorizer = Callable[[SpiffeId], PeerDecision]
Clock = Callable[[], _dt.datetime]

# ECDHE with AEAD only, for the TLS 1.2 opt-down. TLS 1.3 suites are all AEAD.
_TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)

# OpenSSL X509_V_ERR codes we name in audit records.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}
_TIME_ERRORS = frozenset({9, 10})


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class PeerVerification:
    """Per-connection verification state; the verify callback fills it in."""

    __slots__ = (
        "_authorize",
        "_bundles",
        "_certs",
        "_clock",
        "decision",
        "message",
        "reason",
        "verified",
    )

    def __init__(self, bundles: TrustBundleSet, authorize: Authorizer, clock: Clock) -> None:
        self._bundles = bundles
        self._authorize = authorize
        self._clock = clock
        self._certs: dict[int, crypto.X509] = {}
        self.verified: VerifiedSvid | None = None
        self.decision: PeerDecision | None = None
        self.reason: str | None = None
        self.message: str | None = None

    def _fail(self, reason: str, message: str) -> bool:
        if self.reason is None:  # keep the first, most specific failure
            self.reason = reason
            self.message = message
        return False

    def on_certificate(self, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            text = _X509_ERRORS.get(errnum, f"X509 verify error {errnum}")
            reason = "certificate_expired" if errnum in _TIME_ERRORS else "untrusted_chain"
            return self._fail(reason, f"{text} at depth {depth}")
        self._certs[depth] = cert
        if depth != 0:
            return True
        try:
            chain = [self._certs[d].to_cryptography() for d in sorted(self._certs)]
            self._certs.clear()  # held for the connection's life otherwise
            now = self._clock()
            # OpenSSL has verified this path; when its anchor is in the leaf's
            # own trust domain bundle only the SPIFFE rules remain. Anything
            # else (a cross-domain anchor) gets the full scoped verification.
            verified = accept_verified_path(chain, self._bundles, now) or verify_x509_svid(
                chain[0], chain[1:], self._bundles, now
            )
        except ChainError as exc:
            return self._fail(exc.reason, str(exc))
        except Exception as exc:  # never let a callback exception escape into OpenSSL
            return self._fail("invalid_svid", f"cannot check peer certificate: {exc}")
        decision = self._authorize(verified.spiffe_id)
        self.verified = verified
        self.decision = decision
        if not decision.allowed:
            return self._fail(decision.reason, f"peer {verified.spiffe_id} is not allowed")
        return True


def _verify_callback(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    state = conn.get_app_data()
    if not isinstance(state, PeerVerification):
        return False
    return state.on_certificate(cert, errnum, depth, ok)


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
    clock: Clock = _utcnow

    def new_connection(self) -> tuple[SSL.Connection, PeerVerification]:
        conn = SSL.Connection(self.context, None)
        state = PeerVerification(self.bundles, self.authorize, self.clock)
        conn.set_app_data(state)
        if self.server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        return conn, state


def build_side(
    svid: X509Svid,
    bundles: TrustBundleSet,
    authorize: Authorizer,
    *,
    server: bool,
    min_version: TlsVersion = "1.3",
    clock: Clock = _utcnow,
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
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if min_version == "1.2":
        ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.use_certificate(svid.leaf)
    for cert in svid.intermediates:
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(svid.private_key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for authority in bundles.all_authorities():
        store.add_cert(crypto.X509.from_cryptography(authority))
    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, _verify_callback)
    ctx.set_verify_depth(8)
    return TlsSide(context=ctx, bundles=bundles, authorize=authorize, server=server, clock=clock)
