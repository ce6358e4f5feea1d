"""The brownfield keys through parse_config, and the egress's credential
step (pure): what the outbound router does with a route's credential."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import ConfigError, parse_config
from proxy.credentials.config import UpstreamTlsConfig
from proxy.credentials.egress import dns_audit_fields, with_route_credential
from proxy.credentials.provider import REASON, CredentialProvider, Token
from proxy.http.routing import Routed
from proxy.policy.conditions import compile_condition
from proxy.policy.verdict import RequestVerdict, refused

README = Path(__file__).resolve().parents[2] / "README.md"
IDENTITY = '[identity]\nsource = "dev"\nspiffe_id = "spiffe://a.org/agent/payroll"\n'
EGRESS = '[[outbound]]\nname = "egress"\nlisten = "127.0.0.1:7071"\nprotocol = "{protocol}"\n'
ROUTE = (
    '[[outbound.routes]]\nname = "bank"\nhost = "bank-api"\ntarget = "10.0.0.7:443"\n'
    'methods = ["GET"]\npaths = ["/**"]\n'
)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def parse(text: str) -> Any:
    return parse_config(tomllib.loads(text), "c.toml", base_dir=Path("/etc/ap"))


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def test_dns_route_with_a_credential() -> None:
    config = parse(
        IDENTITY
        + EGRESS.format(protocol="http-proxy")
        + ROUTE
        + 'upstream_tls = "dns"\nserver_name = "api.bank.example"\nca_file = "bank.pem"\n'
        + '[outbound.routes.credential]\ntype = "file"\npath = "key"\nheader = "X-API-Key"\n'
    )
    route = config.outbound[0].routes[0]
    assert route.upstream_tls == UpstreamTlsConfig(
        "dns", Path("/etc/ap/bank.pem"), "api.bank.example", "none"
    )
    assert route.expect == ()
    assert route.credential is not None and route.credential.header == "x-api-key"
    assert route.credential.path == Path("/etc/ap/key")
    spiffe = parse(
        IDENTITY
        + EGRESS.format(protocol="http-proxy")
        + ROUTE
        + 'expect = ["spiffe://b.org/svc/bank"]\n'
    )
    assert spiffe.outbound[0].routes[0].upstream_tls.mode == "spiffe"


@pytest.mark.parametrize(
    ("protocol", "extra", "problem"),
    [
        (
            "tcp",
            'expect = ["spiffe://b.org/svc/bank"]\n[outbound.routes.credential]\ntype = "file"\n',
            "credential",
        ),
        ("tcp", 'upstream_tls = "dns"\nserver_name = "api.bank.example"\n', "upstream_tls"),
        ("http-proxy", 'upstream_tls = "dns"\nexpect = ["spiffe://b.org/svc/bank"]\n', "expect"),
        (
            "http-proxy",
            'expect = ["spiffe://b.org/svc/bank"]\nserver_name = "x.example"\n',
            "server_name",
        ),
    ],
)
def test_route_errors_name_the_key(protocol: str, extra: str, problem: str) -> None:
    route = (
        ROUTE
        if protocol == "http-proxy"
        else re.sub(r"host = .*\n|methods.*\n|paths.*\n", "", ROUTE)
    )
    message = error(IDENTITY + EGRESS.format(protocol=protocol) + route + extra)
    assert f"routes[0].{problem}" in message, message


INBOUND = (
    '[[inbound]]\nname = "hr"\nlisten = "127.0.0.1:8443"\ntarget = "127.0.0.1:8080"\n'
    'protocol = "{protocol}"\njwt_svid = {{ audience = "spiffe://a.org/svc/hr" }}\n'
    '[[inbound.rules]]\npeers = ["spiffe://a.org/agent/*"]\n{rules}'
)


def test_inbound_jwt_svid_and_peer_auth() -> None:
    rules = 'methods = ["GET"]\npaths = ["/**"]\nwhen = \'peer.auth == "jwt-svid"\'\n'
    config = parse(IDENTITY + INBOUND.format(protocol="http", rules=rules))
    assert config.inbound[0].jwt_svid is not None
    assert config.inbound[0].jwt_svid.audience == "spiffe://a.org/svc/hr"
    message = error(IDENTITY + INBOUND.format(protocol="tcp", rules=""))
    assert "inbound[0].jwt_svid" in message
    assert compile_condition('peer.auth == "x509-svid"').evaluate({"peer": {"auth": "x509-svid"}})


def test_readme_brownfield_examples_parse_whole() -> None:
    """Each example, in a listener of its own, is a config ``run`` accepts."""
    section = README.read_text().split("## Brownfield and credentials", 1)[1].split("\n## ")[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        if block.startswith("[[outbound.routes]]"):
            block = EGRESS.format(protocol="http-proxy") + block
        parse(IDENTITY + block)


class _Fixed:
    kind = "oauth2-mtls"

    def __init__(self, token: Token | None) -> None:
        self.token = token

    async def fetch(self) -> Token:
        if self.token is None:
            raise RuntimeError("down")
        return self.token

    def changed(self) -> bool:
        return False


def _provider(token: Token | None) -> CredentialProvider:
    provider = CredentialProvider("bank", _Fixed(token), now=lambda: NOW)

    async def once() -> None:
        await provider._attempt()

    trio.run(once)
    return provider


def _allowed() -> Routed:
    return Routed(
        RequestVerdict(True, "rule_matched", "bank", status=200),
        key="bank",
        strip=frozenset({b"x-forwarded-client-cert"}),
    )


FIELDS = dns_audit_fields(UpstreamTlsConfig("dns", Path("/ca.pem"), "api.bank.example"))


def test_allowed_request_gets_ours_and_loses_the_agents() -> None:
    token = Token("tok-123", NOW + timedelta(hours=1), NOW)
    routed = with_route_credential(_allowed(), _provider(token), FIELDS)
    assert b"authorization" in routed.strip
    assert tuple(routed.add_headers) == ((b"authorization", b"Bearer tok-123"),)
    audit = routed.decision.audit_fields()
    assert audit["upstream_dns_name"] == "api.bank.example"
    assert audit["upstream_trust"] == "ca_file"
    assert audit["credential_type"] == "oauth2-mtls"
    assert "tok-123" not in repr(audit) and "tok-123" not in repr(routed.decision)


def test_no_credential_is_503_and_goes_nowhere() -> None:
    routed = with_route_credential(_allowed(), _provider(None), FIELDS)
    assert not routed.decision.allowed
    assert (routed.decision.status, routed.decision.reason) == (503, REASON)
    assert routed.key is None and routed.add_headers == ()
    assert routed.decision.audit_fields()["credential_type"] == "oauth2-mtls"


def test_denied_request_never_asks_for_the_credential() -> None:
    provider = _provider(None)
    routed = with_route_credential(Routed(refused("no_matching_rule")), provider, FIELDS)
    assert routed.decision.reason == "no_matching_rule" and provider.unavailable == 0


def test_a_decision_that_waits_for_the_body_takes_the_credential_after() -> None:
    token = Token("tok-9", NOW + timedelta(hours=1), NOW)
    pending = _allowed()
    pending.finish = lambda body_hash: _allowed()
    routed = with_route_credential(pending, _provider(token), FIELDS)
    assert routed.add_headers == ()
    assert routed.finish is not None
    done = routed.finish("0" * 64)
    assert tuple(done.add_headers) == ((b"authorization", b"Bearer tok-9"),)


def test_a_hooked_request_takes_the_credential_before_the_hook() -> None:
    token = Token("tok-7", NOW + timedelta(hours=1), NOW)
    pending = Routed(refused("no_matching_rule"), key="bank")  # the hook decides later
    routed = with_route_credential(pending, _provider(token), {}, hooked=True)
    assert tuple(routed.add_headers) == ((b"authorization", b"Bearer tok-7"),)
