"""``peer.auth`` in rules: an mTLS peer is ``"x509-svid"`` (the JWT-SVID
case runs through the real process in test_brownfield_egress.py)."""

from __future__ import annotations

import trio

from tests.integration.http_support import inbound_env
from tests.pki import TestCA

PAYROLL = "spiffe://a.org/agent/payroll"


def _rule(name: str, path: str, auth: str) -> dict[str, object]:
    return {
        "name": name,
        "peers": [PAYROLL],
        "methods": ["GET"],
        "paths": [path],
        "when": f'peer.auth == "{auth}"',
    }


async def test_mtls_peers_are_x509_svid(ca_a: TestCA) -> None:
    rules = [_rule("mtls", "/mtls/**", "x509-svid"), _rule("jwt", "/jwt/**", "jwt-svid")]
    async with trio.open_nursery() as nursery:
        env = await inbound_env(
            nursery, ca_a.issue("spiffe://a.org/svc/hr"), ca_a, ca_a.issue(PAYROLL), rules
        )
        status, _, _ = await env.exchange(b"GET /mtls/x HTTP/1.1\r\nhost: hr\r\n\r\n")
        assert status == 200
        status, _, _ = await env.exchange(b"GET /jwt/x HTTP/1.1\r\nhost: hr\r\n\r\n")
        assert status == 403
        nursery.cancel_scope.cancel()
