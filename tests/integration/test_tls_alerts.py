"""The TLS alert a refused peer receives says why (issue 12, item 28).

Real handshakes on loopback: Python's ssl as the peer surfaces the alert it
received in ``SSLError.reason``. OpenSSL maps no verify error to
``access_denied`` (see proxy/tls/peercheck.py), so a policy refusal is
``handshake_failure``: never ``internal_error``, and never an alert that
blames a certificate that is fine.
"""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from pathlib import Path

import pytest
import trio

from proxy.tls import TLSHandshakeError, TLSStream
from tests.integration.tls_support import side
from tests.pki import Issued, TestCA


def _ssl_context(issued: Issued, ca: TestCA, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # these tests judge our verdict on the peer
    cert, key = issued.write(Path(tempfile.mkdtemp()))
    ctx.load_cert_chain(cert, key)
    return ctx


def _alert(exc: BaseException) -> str | None:
    while exc is not None:
        if isinstance(exc, ssl.SSLError):
            return exc.reason
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


async def _refused_client(server_side, client_ctx: ssl.SSLContext) -> tuple[str | None, str]:  # type: ignore[no-untyped-def]
    """Our TLSStream as the server; Python's ssl as the client. Returns the
    alert the client received and our audit reason."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    result: dict[str, object] = {}

    async def serve() -> None:
        tls = TLSStream(await listener.accept(), server_side)
        try:
            await tls.do_handshake()
            await tls.receive_some()
        except TLSHandshakeError as exc:
            result["reason"] = exc.reason
        finally:
            await tls.aclose()

    async def connect() -> None:
        client = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx)
        try:
            # TLS 1.3: the client's handshake ends before the server judges
            # its certificate, so the alert arrives on the first read.
            await client.do_handshake()
            await client.send_all(b"ping")
            await client.receive_some()
        except trio.BrokenResourceError as exc:
            result["alert"] = _alert(exc)
        finally:
            await trio.aclose_forcefully(client)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(connect)
    await listener.aclose()
    return result.get("alert"), str(result.get("reason"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def hr(ca_a: TestCA) -> Issued:
    return ca_a.issue("spiffe://a.org/svc/hr")


@pytest.mark.parametrize(
    ("client", "alert", "reason"),
    [
        ("refused_by_policy", "SSLV3_ALERT_HANDSHAKE_FAILURE", "peer_not_allowed"),
        ("other_ca", "TLSV1_ALERT_UNKNOWN_CA", "untrusted_chain"),
        ("cross_domain_forgery", "TLSV1_ALERT_UNKNOWN_CA", "untrusted_chain"),
        ("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "certificate_expired"),
        ("two_uri_sans", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "invalid_svid"),
        ("ca_leaf", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "invalid_svid"),
    ],
)
async def test_inbound_refusal_alert_names_the_cause(
    ca_a: TestCA, ca_b: TestCA, hr: Issued, client: str, alert: str, reason: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    issued = {
        "refused_by_policy": lambda: ca_a.issue("spiffe://a.org/agent/marketing"),
        "other_ca": lambda: TestCA.create("a.org").issue("spiffe://a.org/agent/payroll"),
        "cross_domain_forgery": lambda: ca_a.issue("spiffe://b.org/agent/payroll"),
        "expired": lambda: ca_a.issue(
            "spiffe://a.org/agent/payroll",
            not_before=now - dt.timedelta(hours=2),
            not_after=now - dt.timedelta(hours=1),
        ),
        "two_uri_sans": lambda: ca_a.issue(
            "spiffe://a.org/agent/payroll", extra_uris=["spiffe://a.org/agent/other"]
        ),
        "ca_leaf": lambda: ca_a.issue("spiffe://a.org/agent/payroll", ca=True),
    }[client]()
    server_side = side(
        hr, (ca_a, ca_b), ["spiffe://a.org/agent/payroll", "spiffe://b.org/**"], server=True
    )
    got_alert, got_reason = await _refused_client(
        server_side, _ssl_context(issued, ca_a, server=False)
    )
    assert got_reason == reason
    assert got_alert == alert


async def test_outbound_unexpected_upstream_gets_handshake_failure(
    ca_a: TestCA, hr: Issued
) -> None:
    """Our client refusing an upstream by its expected ID: the upstream (a
    Python ssl server) learns it from the alert, not from a silent close."""
    server_ctx = _ssl_context(ca_a.issue("spiffe://a.org/svc/bank"), ca_a, server=True)
    client_side = side(
        ca_a.issue("spiffe://a.org/agent/payroll"), (ca_a,), ["spiffe://a.org/svc/hr"], server=False
    )
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    result: dict[str, object] = {}

    async def serve() -> None:
        upstream = trio.SSLStream(await listener.accept(), server_ctx, server_side=True)
        try:
            await upstream.do_handshake()
        except trio.BrokenResourceError as exc:
            result["alert"] = _alert(exc)
        finally:
            await trio.aclose_forcefully(upstream)

    async def connect() -> None:
        tls = TLSStream(await trio.open_tcp_stream("127.0.0.1", port), client_side)
        try:
            await tls.do_handshake()
        except TLSHandshakeError as exc:
            result["reason"] = exc.reason
        finally:
            await tls.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(connect)
    await listener.aclose()
    assert result == {"reason": "peer_not_allowed", "alert": "SSLV3_ALERT_HANDSHAKE_FAILURE"}
