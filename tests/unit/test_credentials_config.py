"""Config parsers for DNS routes, credentials and inbound JWT-SVIDs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError
from proxy.config.walker import Ctx, Table
from proxy.credentials.config import (
    CredentialConfig,
    InboundJwtConfig,
    UpstreamTlsConfig,
    parse_credential,
    parse_inbound_jwt,
    parse_upstream_tls,
)
from proxy.identity import TrustDomain

BASE = Path("/etc/agent-proxy")
ROUTE = "outbound[0].routes[1]"


def toml(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


CTX = Ctx("c.toml", BASE)


def table(text: str, path: str = ROUTE) -> Table:
    return Table(CTX, path, toml(text))


def tls(
    text: str, target: str | None = "api.bank.example", host: str | None = "bank-api"
) -> UpstreamTlsConfig:
    return parse_upstream_tls(table(text), target_host=target, route_host=host)


def credential(text: str) -> CredentialConfig:
    got = parse_credential(table(text))
    assert got is not None
    return got


def error(fn: Any, *args: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def test_upstream_tls_defaults_and_dns() -> None:
    assert tls('expect = ["spiffe://a.org/x"]') == UpstreamTlsConfig()
    got = tls('upstream_tls = "dns"\nca_file = "certs/bank-ca.pem"\nclient_cert = "svid"')
    assert got == UpstreamTlsConfig("dns", BASE / "certs/bank-ca.pem", "api.bank.example", "svid")
    assert tls('upstream_tls = "dns"').ca_file == "system"
    assert tls('upstream_tls = "dns"\nserver_name = "API.Bank.Example"').server_name == (
        "api.bank.example"
    )
    # A target IP: the name the agent asked for; neither: the IP itself is not
    # guessed, server_name is required.
    assert tls('upstream_tls = "dns"', "10.0.0.5", "bank.example:443").server_name == (
        "bank.example"
    )
    assert tls('upstream_tls = "dns"', "10.0.0.5", "[::1]:8443").server_name == "::1"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'upstream_tls = "tls"',
            'c.toml: outbound[0].routes[1].upstream_tls: expected one of "spiffe", "dns"',
        ),
        ('ca_file = "x.pem"', 'ca_file: only for upstream_tls = "dns"'),
        ('upstream_tls = "dns"\nexpect = ["spiffe://a.org/x"]', "expect: not for upstream_tls"),
        ('upstream_tls = "dns"\nserver_name = "bad name"', "server_name: server_name 'bad name'"),
        (
            'upstream_tls = "dns"\nclient_cert = "yes"',
            'client_cert: expected one of "none", "svid"',
        ),
    ],
)
def test_upstream_tls_errors(text: str, problem: str) -> None:
    assert problem in error(tls, text)


def test_upstream_tls_needs_a_name() -> None:
    assert "server_name: required" in error(tls, 'upstream_tls = "dns"', "10.0.0.5", None)


def test_credential_types() -> None:
    assert credential('[credential]\ntype = "jwt-svid"\naudience = "https://bank"') == (
        CredentialConfig(type="jwt-svid", audience="https://bank")
    )
    mtls = credential(
        '[credential]\ntype = "oauth2-mtls"\ntoken_url = "https://idp/token"\n'
        'client_id = "payroll"\nscope = "payments:read accounts:read"\n'
        'resource = "https://bank"\ntoken_ca_file = "idp-ca.pem"\ntimeout = 5'
    )
    assert mtls.scope == ("payments:read", "accounts:read")
    assert mtls.token_ca_file == BASE / "idp-ca.pem" and mtls.timeout == 5.0
    bearer = credential(
        '[credential]\ntype = "oauth2-jwt-bearer"\ntoken_url = "https://idp/token"\n'
        'assertion = "svid-key"\nscope = ["a", "b"]'
    )
    assert bearer.assertion == "svid-key" and bearer.scope == ("a", "b")
    assert bearer.token_ca_file == "system"
    f = credential(
        '[credential]\ntype = "file"\npath = "/run/secrets/key"\n'
        'header = "X-API-Key"\nformat = "{secret}"'
    )
    assert (f.path, f.header, f.format) == (Path("/run/secrets/key"), "x-api-key", "{secret}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('type = "basic"', "credential.type: expected one of"),
        ('type = "jwt-svid"', "credential.audience: required"),
        ('type = "file"\npath = "k"\naudience = "x"', 'credential.audience: not for type = "file"'),
        (
            'type = "file"\npath = "k"\npaht = "x"',
            "unknown key 'outbound[0].routes[1].credential.paht' (did you mean 'path'?)",
        ),
        (
            'type = "oauth2-mtls"\ntoken_url = "http://idp/t"\nclient_id = "c"',
            "must be an https URL",
        ),
        (
            'type = "oauth2-mtls"\ntoken_url = "https://idp/t"',
            "client_id: required for oauth2-mtls",
        ),
        ('type = "file"\npath = "k"\nheader = "Host"', "header: 'host' cannot carry"),
        ('type = "file"\npath = "k"\nformat = "Bearer"', 'format: must hold "{secret}" once'),
        (
            'type = "file"\npath = "k"\nformat = "{secret}\\r\\n"',
            'format: must hold "{secret}" once',
        ),
        (
            'type = "oauth2-mtls"\ntoken_url = "https://i/t"\nclient_id = "c"\nscope = "a\\"b"',
            "invalid scope token",
        ),
        (
            'type = "oauth2-mtls"\ntoken_url = "https://i/t"\nclient_id = "c"\ntimeout = 0',
            "timeout: expected seconds",
        ),
        (
            'type = "oauth2-jwt-bearer"\ntoken_url = "https://i/t"\n'
            'assertion = "svid-key"\naudience = "a"',
            'audience: only for assertion = "jwt-svid"',
        ),
    ],
)
def test_credential_errors(text: str, problem: str) -> None:
    message = error(credential, f"[credential]\n{text}")
    assert message.startswith("c.toml: ")
    assert problem in message
    assert "\n" not in message


def test_inbound_jwt_svid() -> None:
    parse = lambda text: parse_inbound_jwt(table(text, "inbound[0]"))  # noqa: E731
    assert parse('name = "x"') is None
    got = parse('jwt_svid = { audience = "spiffe://a.org/svc/hr" }')
    assert got == InboundJwtConfig("spiffe://a.org/svc/hr", {})
    fed = parse('jwt_svid = { audience = "a", bundles = { "b.org" = "b.jwks" } }')
    assert fed is not None and fed.bundles == {TrustDomain.parse("b.org"): BASE / "b.jwks"}
    assert "jwt_svid.audience: required" in error(parse, "jwt_svid = {}")
    assert "jwt_svid: expected a table" in error(parse, 'jwt_svid = "a"')
    assert "jwt_svid.bundles.B_ORG" in error(
        parse, 'jwt_svid = { audience = "a", bundles = { "B_ORG" = "x" } }'
    )
    assert "unknown key 'inbound[0].jwt_svid.audiance'" in error(
        parse, 'jwt_svid = { audience = "a", audiance = "b" }'
    )


def test_readme_brownfield_examples_parse() -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Brownfield and credentials", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    kinds: set[str] = set()
    for i, block in enumerate(blocks):
        doc = tomllib.loads(block)
        for j, route in enumerate(doc.get("outbound", {}).get("routes", [])):
            rt = Table(Ctx(f"README[{i}]", BASE), f"outbound.routes[{j}]", route)
            got = parse_upstream_tls(
                rt, target_host=route["target"].rsplit(":", 1)[0], route_host=route["host"]
            )
            assert got.mode == "dns"
            cred = parse_credential(rt)
            assert cred is not None
            kinds.add(cred.type)
        for j, inbound in enumerate(doc.get("inbound", [])):
            assert parse_inbound_jwt(Table(CTX, f"inbound[{j}]", inbound))
            kinds.add("inbound")
    assert kinds == {"jwt-svid", "oauth2-mtls", "oauth2-jwt-bearer", "file", "inbound"}
