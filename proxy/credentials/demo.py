"""The demo's brownfield leg: the payroll agent calls a bank API that knows
nothing of SPIFFE, over DNS-verified TLS, with an OAuth 2.0 token it never sees.

Two ordinary HTTPS servers stand in for the bank, with the certificates
``make certs`` wrote into ``certs/bank/``: its token endpoint (RFC 8705
``tls_client_auth``: it admits the client whose certificate chains to the
demo's CA and carries the registered URI SAN, our SVID's SPIFFE ID) and its
API (it admits only the bearer tokens its endpoint issued). The payroll
agent's own sidecar (``agent-proxy run``) gets :meth:`BrownfieldBank.routes`
in its egress: a DNS route with an ``oauth2-mtls`` credential, and a route
whose server name the bank's certificate does not carry.
"""

from __future__ import annotations

import http.server
import json
import secrets
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from cryptography import x509

from proxy.credentials.certs import BANK_NAME, TRUST_DOMAIN, write_certs

__all__ = ["AGENT_GUESS", "BrownfieldBank"]

PAYROLL = f"spiffe://{TRUST_DOMAIN}/agent/payroll"
CLIENT_ID = "payroll"
AGENT_GUESS = b"Bearer what-the-agent-sent"


class _Https(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], ctx: ssl.SSLContext):
        super().__init__(("127.0.0.1", 0), handler)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.issued: set[str] = set()
        self.first_token = threading.Event()
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
        self.server.first_token.set()


def _bank_handler(tokens: set[str]) -> type[_Handler]:
    class Bank(_Handler):
        def do_GET(self) -> None:
            auth = self.headers.get_all("authorization") or []
            admitted = len(auth) == 1 and auth[0].removeprefix("Bearer ") in tokens
            agent = any(AGENT_GUESS.decode() in a for a in auth)
            self.server.seen.append({"admitted": admitted, "agent_header": agent})
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


def _complete(certs: Path) -> bool:
    needed = ("bank/ca.pem", "bank/idp.pem", "bank/bank.pem")
    return all((certs / name).exists() for name in needed)


class BrownfieldBank:
    """The bank's token endpoint and API, serving on loopback until :meth:`stop`."""

    def __init__(self, certs: Path, client_ca: Path) -> None:
        self.certs = certs
        bank_dir = certs / "bank"
        self.ca_file = bank_dir / "ca.pem"
        self.idp = _Https(
            _TokenEndpoint, _context(bank_dir / "idp.pem", bank_dir / "idp_key.pem", client_ca)
        )
        self.bank = _Https(
            _bank_handler(self.idp.issued),
            _context(bank_dir / "bank.pem", bank_dir / "bank_key.pem", None),
        )
        for server in (self.idp, self.bank):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @classmethod
    def start(
        cls, certs: Path, client_ca: Path, *, scratch: Path | None = None
    ) -> BrownfieldBank | None:
        """With ``certs/`` from ``make certs`` (or, when that is not there
        and ``scratch`` is given, a fresh set written into ``scratch``);
        None if neither."""
        if not _complete(certs):
            if scratch is None:
                return None
            write_certs(scratch)
            certs = scratch
        return cls(certs, client_ca)

    def routes(self) -> str:
        """The payroll egress's brownfield routes (TOML)."""
        common = (
            f'target = "127.0.0.1:{self.bank.port}"\nupstream_tls = "dns"\n'
            f'ca_file = "{self.ca_file}"\nmethods = ["GET"]\npaths = ["/accounts/**"]\n'
        )
        return (
            f'[[outbound.routes]]\nname = "bank-brownfield"\nhost = "{BANK_NAME}"\n{common}'
            f'[outbound.routes.credential]\ntype = "oauth2-mtls"\n'
            f'token_url = "https://127.0.0.1:{self.idp.port}/oauth2/token"\n'
            f'token_ca_file = "{self.ca_file}"\nclient_id = "{CLIENT_ID}"\n'
            # The same server under a name its certificate does not carry.
            f'[[outbound.routes]]\nname = "bank-impostor"\nhost = "evil.example"\n{common}'
        )

    def wait_token(self, timeout: float = 30.0) -> bool:
        """Wait until the sidecar fetched its first token (in the background)."""
        return self.idp.first_token.wait(timeout)

    def summary(self) -> str:
        reached = any(s["agent_header"] for s in self.bank.seen)
        return (
            f"tokens issued: {len(self.idp.issued)}; requests the bank admitted: "
            f"{sum(1 for s in self.bank.seen if s['admitted'])}; the agent's own "
            f"Authorization reached the bank: {'YES' if reached else 'no'}"
        )

    def stop(self) -> None:
        for server in (self.idp, self.bank):
            server.shutdown()
            server.server_close()
