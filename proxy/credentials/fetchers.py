"""Where each credential type comes from: one Fetcher per route.

- :class:`DevJwtSvidFetcher`: a JWT-SVID minted by the dev CA's JWT key.
- :class:`WorkloadApiJwtSvidFetcher`: FetchJWTSVID on the SPIFFE Workload API.
- :class:`OAuth2Fetcher`: client credentials at a token endpoint, either
  with mutual TLS (RFC 8705 ``tls_client_auth``: our SVID is the client
  certificate) or with a JWT client assertion (RFC 7523): a JWT-SVID, or
  a JWT signed with the SVID key carrying the chain in ``x5c``.
- :class:`FileFetcher`: a static secret from a file, re-read when it changes.

Each ``fetch`` raises only :class:`CredentialFetchError`, whose message
names what failed and never a secret.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import structlog
import trio
from cryptography.hazmat.primitives import serialization

from proxy.credentials.provider import CredentialFetchError, Token, utc_now
from proxy.credentials.token_endpoint import TokenUrl, parse_token_response, post_form
from proxy.identity import SpiffeId, X509Svid
from proxy.identity.jwt_svid import JwtSigningKey, jws_alg_for, mint_jwt_svid
from proxy.sources.proto import workload_pb2, workload_pb2_grpc
from proxy.sources.workload_api import SECURITY_HEADER
from proxy.tls.dns import DnsSide, TrustChoice, build_dns_side

__all__ = [
    "ASSERTION_TYPE",
    "DevJwtSvidFetcher",
    "FileFetcher",
    "OAuth2Fetcher",
    "WorkloadApiJwtSvidFetcher",
    "svid_key_assertion",
]

Clock = Callable[[], datetime]
AssertionSource = Callable[[], Awaitable[str]]
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_TTL = timedelta(minutes=5)
_DETAILS_MAX = 200
_SECRET_MAX = 16 * 1024


def _expiry_of(token: str, origin: str) -> datetime:
    """The ``exp`` of a JWT we were handed (our own JWT-SVID: its issuer
    vouches for it, and the upstream validates it)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        return datetime.fromtimestamp(float(claims["exp"]), tz=UTC)
    except (jwt.PyJWTError, KeyError, TypeError, ValueError, OverflowError):
        raise CredentialFetchError(f"{origin}: the JWT-SVID has no usable exp") from None


class DevJwtSvidFetcher:
    """JWT-SVIDs for ``audience`` signed by the dev CA's JWT key."""

    kind = "jwt-svid"

    def __init__(
        self,
        signing: JwtSigningKey,
        spiffe_id: Callable[[], SpiffeId],
        audience: str,
        *,
        ttl: timedelta = timedelta(minutes=5),
        now: Clock = utc_now,
    ) -> None:
        self._signing = signing
        self._spiffe_id = spiffe_id
        self._audience = audience
        self._ttl = ttl
        self._now = now

    async def fetch(self) -> Token:
        await trio.lowlevel.checkpoint()
        now = self._now()
        svid = mint_jwt_svid(
            self._signing, self._spiffe_id(), [self._audience], now=now, ttl=self._ttl
        )
        return Token(svid.token, svid.expiry, now)

    def changed(self) -> bool:
        return False


def _fetch_jwt_svid(target: str, audience: str, timeout: float) -> str:
    """Worker thread: one FetchJWTSVID call."""
    channel = grpc.insecure_channel(target, options=(("grpc.enable_http_proxy", 0),))
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        response: workload_pb2.JWTSVIDResponse = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[audience]),
            metadata=(SECURITY_HEADER,),
            timeout=timeout,
        )
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call):
            details = (exc.details() or "")[:_DETAILS_MAX]
            raise CredentialFetchError(
                f"Workload API FetchJWTSVID: {exc.code().name}"
                + (f": {details}" if details else "")
            ) from None
        raise CredentialFetchError("Workload API FetchJWTSVID failed") from None
    finally:
        channel.close()
    if not response.svids or not response.svids[0].svid:
        raise CredentialFetchError("Workload API FetchJWTSVID: no JWT-SVID in the response")
    return str(response.svids[0].svid)


class WorkloadApiJwtSvidFetcher:
    """JWT-SVIDs for ``audience`` from the Workload API (``target`` as
    :func:`proxy.sources.workload_api.parse_endpoint` returns it)."""

    kind = "jwt-svid"

    def __init__(
        self, target: str, audience: str, *, timeout: float = 10.0, now: Clock = utc_now
    ) -> None:
        self._target = target
        self._audience = audience
        self._timeout = timeout
        self._now = now

    async def fetch(self) -> Token:
        token = await trio.to_thread.run_sync(
            _fetch_jwt_svid, self._target, self._audience, self._timeout, abandon_on_cancel=True
        )
        return Token(token, _expiry_of(token, "Workload API FetchJWTSVID"), self._now())

    def changed(self) -> bool:
        return False


def svid_key_assertion(svid: X509Svid, client_id: str, audience: str, *, now: datetime) -> str:
    """An RFC 7523 client assertion signed with the SVID key, the chain in
    ``x5c`` (RFC 7515 4.1.6) so the IdP can tie it to the SVID's CA."""
    try:
        alg = jws_alg_for(svid.private_key.public_key())
    except ValueError as exc:
        raise CredentialFetchError(f"svid-key assertion: {exc}") from None
    x5c = [
        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")
        for c in svid.chain
    ]
    issued = int(now.timestamp())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + int(ASSERTION_TTL.total_seconds()),
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(
        claims,
        svid.private_key,
        algorithm=alg,
        headers={"x5c": x5c, "typ": "JWT"},
    )


class OAuth2Fetcher:
    """Client credentials at ``token_url``; see the module doc."""

    def __init__(
        self,
        kind: str,
        url: TokenUrl,
        form: Mapping[str, str],
        trust: TrustChoice,
        *,
        client_svid: Callable[[], X509Svid] | None = None,
        assertion: AssertionSource | None = None,
        timeout: float = 10.0,
        now: Clock = utc_now,
    ) -> None:
        self.kind = kind
        self._url = url
        self._form = dict(form)
        self._trust = trust
        self._client_svid = client_svid
        self._assertion = assertion
        self._timeout = timeout
        self._now = now

    def __repr__(self) -> str:
        return f"OAuth2Fetcher(kind={self.kind!r}, url={self._url.url!r})"

    def _side(self) -> DnsSide:
        # Rebuilt per fetch, so a rotated SVID is what the IdP sees next.
        svid = self._client_svid() if self._client_svid is not None else None
        return build_dns_side(self._url.host, self._trust, client_svid=svid, clock=self._now)

    async def fetch(self) -> Token:
        form = {"grant_type": "client_credentials", **self._form}
        if self._assertion is not None:
            try:
                form["client_assertion"] = await self._assertion()
            except CredentialFetchError as exc:
                raise CredentialFetchError(f"client assertion: {exc}") from None
            form["client_assertion_type"] = ASSERTION_TYPE
        status, body = await post_form(self._url, form, self._side(), timeout=self._timeout)
        return parse_token_response(self._url.url, status, body, self._now())

    def changed(self) -> bool:
        return False


class FileFetcher:
    """A static secret: the file's content, surrounding whitespace removed."""

    kind = "file"

    def __init__(self, path: Path, *, now: Clock = utc_now) -> None:
        self._path = path
        self._now = now
        self._seen: tuple[int, int, int, int] | None = None
        self._warned = False

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    async def fetch(self) -> Token:
        await trio.lowlevel.checkpoint()
        return self._read()

    def _read(self) -> Token:
        # A small local file, read at most once per change: no thread needed.
        signature = self._signature()
        try:
            with open(self._path, "rb") as fh:
                data = fh.read(_SECRET_MAX + 1)
        except OSError as exc:
            self._seen = signature
            raise CredentialFetchError(
                f"secret file {self._path}: {exc.strerror or type(exc).__name__}"
            ) from None
        self._seen = signature
        self._check_mode()
        if len(data) > _SECRET_MAX:
            raise CredentialFetchError(f"secret file {self._path}: larger than {_SECRET_MAX} bytes")
        try:
            secret = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CredentialFetchError(f"secret file {self._path}: not ASCII text") from None
        if not secret:
            raise CredentialFetchError(f"secret file {self._path}: empty")
        return Token(secret, None, self._now())

    def changed(self) -> bool:
        return self._signature() != self._seen

    def _check_mode(self) -> None:
        # The point of a file credential is that the agent cannot read it; a
        # world-readable file defeats that on a shared host. Said once.
        try:
            mode = stat.S_IMODE(os.stat(self._path).st_mode)
        except OSError:
            return
        if mode & 0o004 and not self._warned:
            self._warned = True
            structlog.get_logger("agent_proxy").warning(
                "secret file is world-readable; the agent may be able to read it",
                path=str(self._path),
                mode=oct(mode),
            )


def form_fields(
    client_id: str | None, scope: Sequence[str], resource: str | None
) -> dict[str, str]:
    """The client-credentials form fields a route's config adds (``scope``
    RFC 6749 3.3, ``resource`` RFC 8707)."""
    form: dict[str, str] = {}
    if client_id:
        form["client_id"] = client_id
    if scope:
        form["scope"] = " ".join(scope)
    if resource:
        form["resource"] = resource
    return form
