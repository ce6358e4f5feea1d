"""A real OAuth 2.0 token endpoint for tests, built on Authlib, served over
TLS (Python's ssl, trustme certificate) with h11, inside the test's trio run.

Client authentication methods, each the real check an IdP makes:
- ``tls_client_auth`` (RFC 8705 2.1.2): the client certificate's URI SAN
  must be the one registered for ``client_id``.
- ``private_key_jwt`` (RFC 7523 via Authlib's JWTBearerClientAssertion): the
  assertion's ``x5c`` leaf must chain to the SPIFFE CA, carry the registered
  URI SAN, and its key must verify the signature.
- ``spiffe_jwt_svid`` (workload identity federation): the assertion is a
  JWT-SVID verified with the trust domain's JWT bundle; ``sub`` is the
  registered SPIFFE ID, ``aud`` the token URL (no iss/jti: JWT-SVIDs have none).

Also a "bank API" upstream that records the Authorization headers it gets.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import h11
import trio
import trustme
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jwk, jws
from joserfc import jwt as jose_jwt

from tests.pki import TestCA


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    method: str
    spiffe_id: str  # the URI SAN / sub this client is bound to
    scopes: frozenset[str] = frozenset({"payments:read", "accounts:read"})

    def get_client_id(self) -> str:
        return self.client_id

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.method

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        return " ".join(s for s in scope.split() if s in self.scopes)


class FormRequest(OAuth2Request):  # type: ignore[misc]
    def __init__(self, uri: str, form: dict[str, str], peer_uri: str | None) -> None:
        super().__init__("POST", uri, headers={})
        self._form = form
        self.payload = BasicOAuth2Payload(form)
        self.peer_uri = peer_uri

    @property
    def args(self) -> dict[str, str]:
        return {}

    @property
    def form(self) -> dict[str, str]:
        return self._form


class Grant(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["tls_client_auth", "private_key_jwt", "spiffe_jwt_svid"]


def _leaf_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


class _X5cRegistry(jws.JWSRegistry):  # type: ignore[misc]
    # joserfc caps a JWS header at 512 bytes by default; an x5c chain is larger.
    max_header_length = 8192


_X5C_REGISTRY = _X5cRegistry(algorithms=["ES256", "ES384", "RS256", "PS256"])


class X5cAssertion(JWTBearerClientAssertion):  # type: ignore[misc]
    """RFC 7523 private_key_jwt where the key is the SVID's, proven by x5c."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, audience: str, ca: TestCA) -> None:
        super().__init__(validate_jti=True, leeway=0)
        self._audience = audience
        self._ca = ca
        self._headers: dict[str, Any] = {}
        self._jtis: set[str] = set()

    def get_audiences(self) -> list[str]:
        return [self._audience]

    def validate_jti(self, claims: Any, jti: str) -> bool:
        if jti in self._jtis:
            return False
        self._jtis.add(jti)
        return True

    def extract_assertion(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            obj = jws.extract_compact(assertion.encode(), registry=_X5C_REGISTRY)
        except Exception as exc:
            raise InvalidClientError(description="Invalid JWT assertion.") from exc
        self._headers = dict(obj.headers())
        return self._headers, json.loads(obj.payload)

    def process_assertion_claims(self, assertion: str, key: Any) -> Any:
        try:
            token = jose_jwt.decode(assertion, key, registry=_X5C_REGISTRY)
        except Exception as exc:
            raise InvalidClientError(description="bad assertion signature") from exc
        self.verify_claims(token.claims)
        return token.claims

    def resolve_client_public_key(self, client: Client) -> jwk.Key:
        x5c = self._headers.get("x5c")
        if not isinstance(x5c, list) or not x5c:
            raise InvalidClientError(description="no x5c")
        leaf = x509.load_der_x509_certificate(base64.b64decode(x5c[0]))
        try:
            leaf.verify_directly_issued_by(self._ca.cert)
        except (ValueError, TypeError, Exception) as exc:
            raise InvalidClientError(description="x5c does not chain to the CA") from exc
        if _leaf_uri(leaf) != client.spiffe_id:
            raise InvalidClientError(description="x5c leaf is not the registered SPIFFE ID")
        pem = leaf.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return jwk.import_key(pem, "EC")


class JwtSvidAssertion(JWTBearerClientAssertion):  # type: ignore[misc]
    """A JWT-SVID as the client assertion, verified with the JWT bundle."""

    CLIENT_AUTH_METHOD = "spiffe_jwt_svid"

    def __init__(self, audience: str, jwks: dict[str, Any]) -> None:
        super().__init__(validate_jti=False, leeway=0)
        self._audience = audience
        # A SPIFFE bundle's "use" is "jwt-svid"; as an IdP's JWKS it is "sig".
        keys = [{**k, "use": "sig"} for k in jwks["keys"] if k.get("use") == "jwt-svid"]
        self._keys = jwk.KeySet.import_key_set({"keys": keys})

    def get_audiences(self) -> list[str]:
        return [self._audience]

    def resolve_client_public_key(self, client: Client) -> jwk.KeySet:
        return self._keys

    def verify_claims(self, claims: Any) -> None:
        registry = jose_jwt.JWTClaimsRegistry(
            leeway=0,
            sub={"essential": True},
            aud={"essential": True, "values": [self._audience]},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except Exception as exc:
            raise InvalidClientError(description="JWT-SVID claims refused") from exc


class TokenServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, expires_in: int) -> None:
        super().__init__(scopes_supported=["payments:read", "accounts:read"])
        self.clients: dict[str, Client] = {}
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.refused = 0
        self.down = False
        self.register_grant(Grant)
        self.register_token_generator("default", self._token)
        self.register_client_auth_method("tls_client_auth", self._tls_client_auth)
        # Tests that use these register the real ones (they need the URL).
        for method in ("private_key_jwt", "spiffe_jwt_svid"):
            self.register_client_auth_method(method, lambda query_client, request: None)

    def _token(self, **kw: Any) -> dict[str, Any]:
        token = "at-" + secrets.token_urlsafe(24)
        self.issued.append(token)
        return {"token_type": "Bearer", "access_token": token, "expires_in": self.expires_in}

    @staticmethod
    def _tls_client_auth(query_client: Any, request: FormRequest) -> Client | None:
        client = query_client(request.payload.client_id)
        if client is None or client.method != "tls_client_auth":
            return None
        # RFC 8705 2.1.2: tls_client_auth_san_uri, the SVID's URI SAN.
        if request.peer_uri != client.spiffe_id:
            raise InvalidClientError(description="client certificate does not match")
        return client  # type: ignore[no-any-return]

    def query_client(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)

    def save_token(self, token: Any, request: Any) -> None:
        pass

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def create_oauth2_request(self, request: FormRequest) -> FormRequest:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, bytes]:
        if status != 200:
            self.refused += 1
        return status, json.dumps(body).encode()


@dataclass
class Served:
    port: int
    server: TokenServer | None = None
    requests: list[list[tuple[bytes, bytes]]] = field(default_factory=list)

    def url(self, path: str = "/token") -> str:
        return f"https://127.0.0.1:{self.port}{path}"


async def _read_request(
    stream: trio.abc.Stream, conn: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _respond(stream: trio.abc.Stream, conn: h11.Connection, status: int, body: bytes) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


def server_context(cert: trustme.LeafCert, client_ca: TestCA | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=client_ca.bundle_pem().decode())
    return ctx


@asynccontextmanager
async def serve_https(ctx: ssl.SSLContext, handle: Any, served: Served) -> AsyncIterator[Served]:
    async def on_connection(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            peer = _leaf_uri(x509.load_der_x509_certificate(der)) if der else None
            conn = h11.Connection(h11.SERVER)
            while True:
                got = await _read_request(stream, conn)
                if got is None:
                    break
                status, body = handle(got[0], got[1], peer)
                await _respond(stream, conn, status, body)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError, h11.ProtocolError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        served.port = listeners[0].socket.getsockname()[1]
        yield served
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def token_endpoint(
    server: TokenServer, cert: trustme.LeafCert, *, client_ca: TestCA | None = None
) -> AsyncIterator[Served]:
    served = Served(0, server)

    def handle(request: h11.Request, body: bytes, peer: str | None) -> tuple[int, bytes]:
        if server.down:
            return 503, b'{"error": "temporarily_unavailable"}'
        form = dict(parse_qsl(body.decode()))
        uri = served.url(request.target.decode())
        req = FormRequest(uri, form, peer)
        return server.create_token_response(req)  # type: ignore[no-any-return]

    async with serve_https(server_context(cert, client_ca), handle, served) as s:
        yield s


@asynccontextmanager
async def bank_api(cert: trustme.LeafCert) -> AsyncIterator[Served]:
    """An upstream that records each request's headers and answers 200."""
    served = Served(0)

    def handle(request: h11.Request, body: bytes, peer: str | None) -> tuple[int, bytes]:
        served.requests.append([(n.lower(), v) for n, v in request.headers])
        return 200, b'{"balance": 42}'

    async with serve_https(server_context(cert, None), handle, served) as s:
        yield s
