"""The demo's brownfield leg: the payroll agent calls a bank API that knows
nothing of SPIFFE, over DNS-verified TLS, with an OAuth 2.0 token it never sees.

Two ordinary HTTPS servers stand in for the bank, with the certificates
``make certs`` wrote into ``certs/bank/``: its token endpoint (RFC 8705
``tls_client_auth``: it admits the client whose certificate carries the
registered URI SAN, our SVID's SPIFFE ID) and its API (it admits the
bearer tokens its endpoint issued). The sidecar's side is the real code:
the route's credential provider fetches and caches the token, the
request's own ``Authorization`` is replaced by ``with_credential``, and
the bank's certificate is verified for ``bank.example`` against the bank's
CA. Until the egress wires DNS routes, this leg drives those pieces
in-process; the route it prints is the config that does the same through
``agent-proxy run``.
"""

from __future__ import annotations

import http.server
import json
import secrets
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import h11
import trio
from cryptography import x509

from proxy.credentials.build import build_provider
from proxy.credentials.certs import BANK_NAME, TRUST_DOMAIN, write_certs
from proxy.credentials.config import CredentialConfig
from proxy.credentials.headers import with_credential
from proxy.credentials.provider import Credential
from proxy.identity import load_x509_svid
from proxy.tls.dns import build_dns_side, load_ca_file, open_dns_stream, verified_upstream
from proxy.tls.stream import TLSHandshakeError

__all__ = ["run_brownfield_leg"]

PAYROLL = f"spiffe://{TRUST_DOMAIN}/agent/payroll"
CLIENT_ID = "payroll"
AGENT_GUESS = b"Bearer what-the-agent-sent"


class _Https(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], ctx: ssl.SSLContext):
        super().__init__(("127.0.0.1", 0), handler)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.issued: set[str] = set()
        self.seen: list[dict[str, Any]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def _uri_san(der: bytes | None) -> str | None:
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Https

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _TokenEndpoint(_Handler):
    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        form = dict(parse_qsl(self.rfile.read(length).decode()))
        peer = _uri_san(self.connection.getpeercert(binary_form=True))
        ok = form.get("grant_type") == "client_credentials" and form.get("client_id") == CLIENT_ID
        if not ok or peer != PAYROLL:
            self._send(401, {"error": "invalid_client"})
            return
        token = secrets.token_urlsafe(24)
        self.server.issued.add(token)
        self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})


def _bank_handler(tokens: set[str]) -> type[_Handler]:
    class Bank(_Handler):
        def do_GET(self) -> None:
            auth = self.headers.get_all("authorization") or []
            admitted = len(auth) == 1 and auth[0].removeprefix("Bearer ") in tokens
            self.server.seen.append({"admitted": admitted, "headers": len(auth)})
            if not admitted:
                self._send(401, {"error": "invalid_token"})
                return
            self._send(200, {"api": "bank (brownfield)", "client": CLIENT_ID, "balance": 4200})

    return Bank


def _context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


async def _get(port: int, server_name: str, ca: Path, cred: Credential | None) -> str:
    side = build_dns_side(server_name, load_ca_file(ca))
    try:
        stream = await open_dns_stream("127.0.0.1", port, side, timeout=10)
    except TLSHandshakeError as exc:
        return f"refused: {exc.reason}"
    headers = [(b"host", server_name.encode()), (b"authorization", AGENT_GUESS)]
    if cred is not None:
        headers = with_credential(headers, cred)
    conn = h11.Connection(h11.CLIENT)
    async with stream:
        await stream.send_all(
            conn.send(h11.Request(method="GET", target="/accounts/payroll", headers=headers))
            + conn.send(h11.EndOfMessage())
        )
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    verified = verified_upstream(stream)
    fields = verified.audit_fields() if verified else {}
    return f"{status} {body.decode()}  [verified {fields.get('upstream_dns_name')}]"


def _complete(certs: Path) -> bool:
    needed = ("bank/ca.pem", "bank/idp.pem", "bank/bank.pem", "svid/payroll/svid.pem")
    return all((certs / name).exists() for name in needed) and (certs / "dev-ca").is_dir()


def run_brownfield_leg(
    certs: Path, out: Callable[[str], None] = print, *, scratch: Path | None = None
) -> bool:
    """Run the leg with ``certs/`` from ``make certs`` (or, when that is not
    there and ``scratch`` is given, a fresh set written into ``scratch``).
    True if it went as it should."""
    if not _complete(certs):
        if scratch is None:
            out(f"   (skipped: no complete {certs}/; run 'make certs')")
            return False
        write_certs(scratch)
        certs = scratch
    out(f"   certificates from {certs}/ (see certs/README.md)")
    bank_dir = certs / "bank"
    svid_dir = certs / "svid" / "payroll"
    svid = load_x509_svid(
        (svid_dir / "svid.pem").read_bytes(), (svid_dir / "svid_key.pem").read_bytes()
    )
    idp = _Https(
        _TokenEndpoint,
        _context(bank_dir / "idp.pem", bank_dir / "idp_key.pem", certs / "dev-ca" / "ca.pem"),
    )
    bank = _Https(
        _bank_handler(idp.issued), _context(bank_dir / "bank.pem", bank_dir / "bank_key.pem", None)
    )
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (idp, bank)]
    for thread in threads:
        thread.start()
    token_url = f"https://127.0.0.1:{idp.port}/oauth2/token"
    out(
        '   route: upstream_tls = "dns", server_name = "bank.example", '
        f'ca_file = "{bank_dir / "ca.pem"}",\n'
        f'          credential = {{ type = "oauth2-mtls", token_url = "{token_url}", '
        f'client_id = "{CLIENT_ID}" }}'
    )
    cfg = CredentialConfig(
        type="oauth2-mtls",
        token_url=token_url,
        token_ca_file=bank_dir / "ca.pem",
        client_id=CLIENT_ID,
    )
    provider = build_provider("bank-brownfield", cfg, identity=lambda: svid)
    results: list[str] = []

    async def leg() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.run)
            for _ in range(2):
                cred = await provider.credential()
                results.append(await _get(bank.port, BANK_NAME, bank_dir / "ca.pem", cred))
            results.append(await _get(bank.port, "evil.example", bank_dir / "ca.pem", None))
            nursery.cancel_scope.cancel()

    try:
        trio.run(leg)
    finally:
        idp.shutdown()
        bank.shutdown()
    out(f"   payroll  GET https://bank.example/accounts/payroll  -> {results[0]}")
    out(f"   payroll  (again: the cached token)                  -> {results[1]}")
    out(f"   payroll  GET https://evil.example/... (wrong name)  -> {results[2]}")
    out(
        f"   tokens issued: {len(idp.issued)}; the agent's own Authorization reached the bank: "
        f"{'no' if all(s['headers'] == 1 and s['admitted'] for s in bank.seen) else 'YES'}"
    )
    return (
        results[0].startswith("200")
        and results[1].startswith("200")
        and results[2] == "refused: upstream_name_mismatch"
        and len(idp.issued) == 1
    )
