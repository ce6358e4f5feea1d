"""The config package's newer rules and the L4 flag front-end: did-you-mean
for a misspelt required key, ":PORT" listen addresses, paths that cannot
exist, reload key paths, and flags that become the same Config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import build_parser
from proxy.cli.envflags import fill_from_env
from proxy.cli.sidecar import _INBOUND, _OUTBOUND, flags_config
from proxy.config import DEFAULT_ADMIN, ConfigError, parse_config
from proxy.errors import UsageError
from proxy.netaddr import HostPort
from proxy.runtime.reload import restart_needed

PAYROLL = "spiffe://a.org/agent/payroll"
IDENTITY = {"source": "files", "cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}


def _tcp_in(**kw: Any) -> dict[str, Any]:
    return {
        "name": "hr",
        "listen": "127.0.0.1:8443",
        "target": "127.0.0.1:8080",
        "protocol": "tcp",
        "rules": [{"peers": [PAYROLL]}],
        **kw,
    }


def _doc(**kw: Any) -> dict[str, Any]:
    return {"identity": dict(IDENTITY), "inbound": [_tcp_in()], **kw}


def _error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "sidecar.toml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_misspelt_required_key_is_named_with_a_hint() -> None:
    inbound = _tcp_in()
    inbound["lisen"] = inbound.pop("listen")
    assert _error(_doc(inbound=[inbound])) == (
        "sidecar.toml: unknown key 'inbound[0].lisen' (did you mean 'listen'?)"
    )
    inbound = _tcp_in()
    inbound["rule"] = inbound.pop("rules")
    assert "unknown key 'inbound[0].rule' (did you mean 'rules'?)" in _error(
        _doc(inbound=[inbound])
    )
    # With nothing close, the key is just required.
    inbound = _tcp_in()
    del inbound["listen"]
    assert _error(_doc(inbound=[inbound])) == "sidecar.toml: inbound[0].listen: required"


def test_any_address_listen() -> None:
    config = parse_config(_doc(inbound=[_tcp_in(listen=":8443")]), "s.toml")
    assert config.inbound[0].listen == HostPort("", 8443)
    outbound = {
        "name": "egress",
        "listen": ":7071",
        "protocol": "tcp",
        "routes": [{"target": "hr:8443", "expect": [PAYROLL]}],
    }
    message = _error({"identity": IDENTITY, "outbound": [outbound]})
    assert "outbound[0].listen: :7071 listens on every address" in message
    assert "127.0.0.1:7071" in message and "allow_public_listen = true" in message
    opened = parse_config(
        {"identity": IDENTITY, "outbound": [{**outbound, "allow_public_listen": True}]}, "s.toml"
    )
    assert opened.outbound[0].listen.host == ""
    assert "a host is required" in _error(_doc(inbound=[_tcp_in(target=":8080")]))


def test_default_ports_are_off_other_sidecars_ranges() -> None:
    assert HostPort("127.0.0.1", 7070) == DEFAULT_ADMIN
    reserved = [*range(15000, 15091), 9901, *range(4140, 4192), 19000]
    assert DEFAULT_ADMIN.port not in reserved


@pytest.mark.parametrize(
    ("where", "value", "needle"),
    [
        (
            "cert",
            "~nosuchuser-ap/svid.pem",
            "identity.cert: cannot expand '~nosuchuser-ap/svid.pem'",
        ),
        ("bundle", "b\x00.pem", "identity.bundle: must not contain a NUL byte"),
        ("audit", "audit/a\x00b", "audit.path: must not contain a NUL byte"),
        ("audit", "~nosuchuser-ap/a", "audit.path: cannot expand"),
    ],
)
def test_paths_that_cannot_exist(where: str, value: str, needle: str) -> None:
    doc = _doc()
    if where == "audit":
        doc["audit"] = {"path": value}
    else:
        doc["identity"][where] = value
    assert needle in _error(doc)


def test_restart_needed_names_keys() -> None:
    old = parse_config(_doc(), "s.toml")
    revoked = _doc(inbound=[_tcp_in(rules=[{"peers": ["spiffe://a.org/agent/other"]}])])
    assert restart_needed(old, parse_config(revoked, "s.toml")) == []
    moved = _doc(inbound=[_tcp_in(listen="127.0.0.1:9443", idle_timeout=5)])
    with pytest.raises(ConfigError):
        parse_config(moved, "s.toml")  # idle_timeout is HTTP only
    moved = _doc(inbound=[_tcp_in(listen="127.0.0.1:9443", max_connection_lifetime="1m")])
    assert restart_needed(old, parse_config(moved, "s.toml")) == [
        "inbound[0].listen",
        "inbound[0].max_connection_lifetime",
    ]
    added = _doc(inbound=[_tcp_in(), _tcp_in(name="b", listen="127.0.0.1:9")])
    assert restart_needed(old, parse_config(added, "s.toml")) == ["inbound[1]"]
    admin = _doc(admin={"listen": "127.0.0.1:9"})
    assert restart_needed(old, parse_config(admin, "s.toml")) == ["admin.listen"]


def _flags(direction: str, *argv: str) -> argparse.Namespace:
    args = build_parser().parse_args([direction, *argv])
    fill_from_env(args, _INBOUND if direction == "inbound" else _OUTBOUND, environ={})
    return args


BASE = ("--listen", "127.0.0.1:0", "--target", "127.0.0.1:8080")
FILES = ("--cert", "c.pem", "--key", "k.pem", "--bundle", "b.pem")


def test_flags_build_a_one_listener_files_config() -> None:
    args = _flags(
        "inbound", *BASE, *FILES, "--allow", PAYROLL, "--handshake-timeout", "1m30s",
        "--connect-timeout", "2.5", "--write-timeout", "10s", "--drain-timeout", "0",
        "--max-connection-lifetime", "1h", "--admin", "127.0.0.1:0", "--federate", "b.org=fed.pem",
    )  # fmt: skip
    config = flags_config(args, "inbound")
    (inb,) = config.inbound
    assert (inb.name, inb.protocol, inb.handshake_timeout, inb.connect_timeout) == (
        "inbound", "tcp", 90.0, 2.5,
    )  # fmt: skip
    assert inb.write_timeout == 10.0 and inb.limits.max_connection_lifetime == 3600.0
    assert config.drain_timeout == 0.0 and config.admin.listen == HostPort("127.0.0.1", 0)
    assert config.identity.source == "files"
    assert config.identity.cert == Path.cwd() / "c.pem"
    assert [str(td) for td in config.identity.federation] == ["b.org"]
    assert [p.text for r in inb.guard.rules for p in r.peers] == [PAYROLL]
    no_admin = flags_config(_flags("inbound", *BASE, *FILES, "--allow", PAYROLL), "inbound")
    assert no_admin.admin.listen is None


A = ("--allow", PAYROLL)
E = ("--expect", PAYROLL)
FLAG_ERRORS = [
    ("inbound", ("--allow", "spiffe://A.org/x"), "--allow[0]: "),
    ("inbound", (*A, "--handshake-timeout", "soon"), "--handshake-timeout: invalid duration"),
    ("inbound", (*A, "--connect-timeout", "0"), "--connect-timeout: must be greater than zero"),
    ("inbound", (*A, "--max-connections", "x"), "--max-connections: expected a positive integer"),
    ("inbound", (*A, "--min-tls", "1.1"), "--min-tls: "),
    ("inbound", (*A, "--admin", "0.0.0.0:1"), "--admin: 0.0.0.0:1 is not a loopback"),
    ("inbound", (*A, "--name", "bad name"), "--name: invalid name"),
    ("inbound", (*A, "--federate", "b.org"), "--federate 'b.org': expected"),
    ("outbound", (*E, "--listen", ":7071"), "--listen: :7071 listens on every address"),
    ("outbound", (*E, "--listen", ":7071"), "pass --allow-public-listen"),
]


@pytest.mark.parametrize(("direction", "extra", "needle"), FLAG_ERRORS)
def test_flag_errors_name_the_flag(direction: str, extra: tuple[str, ...], needle: str) -> None:
    args = _flags(direction, *BASE, *FILES, *extra)
    with pytest.raises(UsageError) as info:
        flags_config(args, direction)
    assert needle in str(info.value)
    assert "inbound[0]" not in str(info.value) and "outbound[0]" not in str(info.value)
