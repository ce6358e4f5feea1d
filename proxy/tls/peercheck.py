"""SPIFFE peer verification inside the TLS handshake: the verify callback
and the per-connection state it fills in.

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
"""

from __future__ import annotations

import datetime as _dt
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from proxy.identity import (
    ChainError,
    SpiffeId,
    TrustBundleSet,
    VerifiedSvid,
    accept_verified_path,
    verify_x509_svid,
)


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


def utcnow() -> _dt.datetime:
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
verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", _on_verify)
