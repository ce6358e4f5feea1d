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
for the audit record. A path that passed the SPIFFE rules is remembered
per side with its validity window (:class:`PathCache`): the next handshake
that presents the same DER skips re-parsing and re-checking it, never
OpenSSL's own chain verification nor the connection policy.

The alert the peer receives says why (issue 12, item 28). OpenSSL derives it
from the X509 verify error left in the store context (``ssl_x509err2alert``
in ssl/statem/statem_lib.c), so a refusal sets the error whose mapped alert
fits: an untrusted chain ``unknown_ca``, an expired certificate
``certificate_expired``, a certificate that breaks the X509-SVID rules
``unsupported_certificate``. OpenSSL maps no verify error to
``access_denied`` and has no public call that sends an alert of our choice,
so a peer refused by policy gets ``handshake_failure``
(X509_V_ERR_APPLICATION_VERIFICATION, "application verification failure"):
distinct from every certificate problem, and never ``internal_error``, which
stays for our own failures. pyOpenSSL's ``set_verify`` wrapper gives its
callback no store context, so the callback is installed with pyOpenSSL's own
cffi handles (``OpenSSL._util``), the way pyOpenSSL installs it itself.

Session resumption is off (no tickets, no session cache): a resumed session
would skip the callback and could outlive the peer certificate it was opened
with. Full handshakes only.
"""

from __future__ import annotations

import datetime as _dt
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from proxy.identity import (
    ChainError,
    SpiffeId,
    TrustBundleSet,
    VerifiedSvid,
    X509Svid,
    accept_verified_path,
    verify_x509_svid,
)

TlsVersion = Literal["1.2", "1.3"]


class PeerVerdict(Protocol):
    """What the connection policy answers about a verified peer (the tls
    layer needs no more of policy than this)."""

    @property
    def allowed(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def rule(self) -> str | None: ...


Authorizer = Callable[[SpiffeId], PeerVerdict]
Clock = Callable[[], _dt.datetime]

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

# Our refusal reason -> the X509 verify error whose alert (OpenSSL's
# ssl_x509err2alert) tells the peer why. See the module docstring.
_REFUSAL_ERRORS = {
    "untrusted_chain": _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,  # unknown_ca
    "certificate_expired": _lib.X509_V_ERR_CERT_HAS_EXPIRED,  # certificate_expired
    "invalid_svid": _lib.X509_V_ERR_INVALID_PURPOSE,  # unsupported_certificate
}
_POLICY_ERROR = _lib.X509_V_ERR_APPLICATION_VERIFICATION  # handshake_failure
_INTERNAL_ERROR = 1  # X509_V_ERR_UNSPECIFIED: internal_error
_OK = 0  # X509_V_OK


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class PeerVerification:
    """Per-connection verification state; the verify callback fills it in."""

    __slots__ = (
        "_authorize",
        "_bundles",
        "_clock",
        "_paths",
        "decision",
        "message",
        "presented",
        "reason",
        "verified",
    )

    def __init__(
        self,
        bundles: TrustBundleSet,
        authorize: Authorizer,
        clock: Clock,
        paths: PathCache | None = None,
    ) -> None:
        self._bundles = bundles
        self._authorize = authorize
        self._clock = clock
        self._paths = paths if paths is not None else PathCache()
        self.verified: VerifiedSvid | None = None
        self.decision: PeerVerdict | None = None
        self.reason: str | None = None
        self.message: str | None = None
        # The leaf the peer presented when OpenSSL refused its chain (an
        # expired SVID, an unknown CA): not trusted, but an operator needs to
        # know whose certificate it was (its ID, serial and notAfter).
        self.presented: x509.Certificate | None = None

    def _fail(self, reason: str, message: str, error: int) -> int:
        if self.reason is None:  # keep the first, most specific failure
            self.reason = reason
            self.message = message
        return error

    def openssl_failed(self, errnum: int, depth: int, leaf: x509.Certificate | None = None) -> int:
        """OpenSSL refused the chain itself; its own error (and so its own
        alert) stands."""
        if self.presented is None:
            self.presented = leaf
        text = _X509_ERRORS.get(errnum, f"X509 verify error {errnum}")
        reason = "certificate_expired" if errnum in _TIME_ERRORS else "untrusted_chain"
        self._fail(reason, f"{text} at depth {depth}", errnum)
        return errnum

    def judge_leaf(self, path: bytes, ends: list[int]) -> int:
        """The path OpenSSL built (``path``: the DER of each certificate,
        leaf first, concatenated; ``ends``: where each one ends) passed its
        checks: apply the SPIFFE rules and the connection policy. X509_V_OK
        or the error to set."""
        try:
            now = self._clock()
            verified = self._paths.get(path, now)
            if verified is None:
                chain = _certificates(path, ends)
                # OpenSSL has verified this path; when its anchor is in the
                # leaf's own trust domain bundle only the SPIFFE rules remain.
                # Anything else (a cross-domain anchor) gets the full scoped
                # verification, every time (never remembered).
                verified = accept_verified_path(chain, self._bundles, now)
                if verified is not None:
                    self._paths.put(path, verified)
                else:
                    verified = verify_x509_svid(chain[0], chain[1:], self._bundles, now)
        except ChainError as exc:
            return self._fail(
                exc.reason, str(exc), _REFUSAL_ERRORS.get(exc.reason, _INTERNAL_ERROR)
            )
        decision = self._authorize(verified.spiffe_id)
        self.verified = verified
        self.decision = decision
        if not decision.allowed:
            return self._fail(
                decision.reason, f"peer {verified.spiffe_id} is not allowed", _POLICY_ERROR
            )
        return _OK


class PathCache:
    """Verified paths of one side (one bundle set), by their DER.

    A peer presents the same chain on every connection until it rotates,
    and :func:`accept_verified_path` is a pure function of the path, the
    side's bundles and the time; the time enters only as "inside every
    certificate's validity period", i.e. between the latest notBefore and
    the earliest notAfter of the path. So a path that passed is remembered
    with that window and, while ``now`` is inside it, passes again without
    being parsed or checked again: the answer would be the same. Outside
    the window the full check runs (and names the expired certificate).
    Failures and cross-domain paths are never remembered. OpenSSL still
    verifies every signature of every handshake before this is consulted;
    the connection policy runs on every handshake. One cache per TlsSide:
    a rotation (new bundles) starts an empty one, and a side cannot be
    given another's (``TlsSide.paths`` is not an init field). Bounded: the
    least recently used entry goes first.
    """

    __slots__ = ("_entries",)
    MAX = 256

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, tuple[VerifiedSvid, _dt.datetime, _dt.datetime]] = (
            OrderedDict()
        )

    def get(self, path: bytes, now: _dt.datetime) -> VerifiedSvid | None:
        entry = self._entries.get(path)
        if entry is None:
            return None
        verified, not_before, not_after = entry
        if not_before <= now <= not_after:
            self._entries.move_to_end(path)
            return verified
        del self._entries[path]
        return None

    def put(self, path: bytes, verified: VerifiedSvid) -> None:
        if len(self._entries) >= self.MAX:
            self._entries.popitem(last=False)
        not_before = max(cert.not_valid_before_utc for cert in verified.chain)
        not_after = min(cert.not_valid_after_utc for cert in verified.chain)
        self._entries[path] = (verified, not_before, not_after)


def _certificates(path: bytes, ends: list[int]) -> list[x509.Certificate]:
    start, chain = 0, []
    for end in ends:
        chain.append(_shared(path[start:end]))
        start = end
    return chain


def _verified_chain(store_ctx: Any) -> tuple[bytes, list[int]]:
    """The chain OpenSSL built, leaf first, as its certificates' DER one
    after the other and where each ends. get1_chain returns owned
    references: each is freed here, then the bare stack. One memory BIO
    takes every certificate (no certificate object is made for this)."""
    stack = _lib.X509_STORE_CTX_get1_chain(store_ctx)
    if stack == _ffi.NULL:
        raise ValueError("OpenSSL returned no verified chain")
    bio = _lib.BIO_new(_lib.BIO_s_mem())
    try:
        if bio == _ffi.NULL:
            _lib.ERR_clear_error()  # no stale entry in a later pyOpenSSL error
            raise MemoryError("cannot allocate a memory BIO")
        data = _ffi.new("char **")
        ends = []
        for i in range(_lib.sk_X509_num(stack)):
            if _lib.i2d_X509_bio(bio, _lib.sk_X509_value(stack, i)) != 1:
                _lib.ERR_clear_error()
                raise ValueError("cannot encode a certificate of the verified chain")
            ends.append(_lib.BIO_get_mem_data(bio, data))
        return _ffi.buffer(data[0], ends[-1] if ends else 0)[:], ends
    finally:
        if bio != _ffi.NULL:
            _lib.BIO_free(bio)
        for i in range(_lib.sk_X509_num(stack)):
            _lib.X509_free(_lib.sk_X509_value(stack, i))
        _lib.sk_X509_free(stack)


# A peer presents the same chain on every connection until it rotates, and
# each connection keeps its verified chain for its life: one certificate
# object per distinct DER (bounded, most recent kept) instead of a parse and
# a copy per handshake. Certificates are immutable; equal DER, equal value.
_SHARED: OrderedDict[bytes, x509.Certificate] = OrderedDict()
_SHARED_MAX = 512


def _shared(der: bytes) -> x509.Certificate:
    cert = _SHARED.get(der)
    if cert is None:
        cert = x509.load_der_x509_certificate(der)
        _SHARED[der] = cert
        if len(_SHARED) > _SHARED_MAX:
            _SHARED.popitem(last=False)
    else:
        _SHARED.move_to_end(der)
    return cert


def _presented_leaf(store_ctx: Any) -> x509.Certificate | None:
    # get0_cert is the leaf being verified, borrowed: take a reference of
    # our own before an X509 object frees it.
    ptr = _lib.X509_STORE_CTX_get0_cert(store_ctx)
    if ptr == _ffi.NULL:
        return None
    _lib.X509_up_ref(ptr)
    return crypto.X509._from_raw_x509_ptr(ptr).to_cryptography()


def _on_verify(ok: int, store_ctx: Any) -> int:
    """OpenSSL calls this per certificate, from the anchor down to the leaf."""
    error = _INTERNAL_ERROR
    state: object = None
    try:
        ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
        conn = SSL.Connection._reverse_mapping.get(ssl)
        state = conn.get_app_data() if conn is not None else None
        if isinstance(state, PeerVerification):
            depth = _lib.X509_STORE_CTX_get_error_depth(store_ctx)
            if not ok:
                error = state.openssl_failed(
                    _lib.X509_STORE_CTX_get_error(store_ctx), depth, _presented_leaf(store_ctx)
                )
            elif depth != 0:
                return 1
            else:
                error = state.judge_leaf(*_verified_chain(store_ctx))
    except Exception as exc:  # an exception must never escape into OpenSSL
        if isinstance(state, PeerVerification):
            state._fail("invalid_svid", f"cannot check peer certificate: {exc}", _INTERNAL_ERROR)
    _lib.X509_STORE_CTX_set_error(store_ctx, error)
    return 1 if error == _OK else 0


# A module global, so the C callback outlives every context that points at it.
_verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", _on_verify)


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
    # Not ctx.set_verify(): see the module docstring.
    _lib.SSL_CTX_set_verify(ctx._context, mode, _verify_callback)
    ctx.set_verify_depth(8)
    return TlsSide(context=ctx, bundles=bundles, authorize=authorize, server=server, clock=clock)
