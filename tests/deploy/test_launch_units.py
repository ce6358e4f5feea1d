"""The launcher's pure parts: the agent's environment, users, exit statuses."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.cli.launch import (
    agent_environment,
    egress_listener,
    exit_status,
    identity_paths,
    resolve_user,
)
from proxy.config import Config, parse_config
from proxy.errors import UsageError

ROUTE = {
    "name": "hr",
    "host": "hr-api",
    "target": "127.0.0.1:8443",
    "expect": ["spiffe://a.org/svc/hr"],
    "methods": ["GET"],
    "paths": ["/**"],
}


def _config(identity: dict[str, object], *outbound: dict[str, object]) -> Config:
    return parse_config(
        {"identity": identity, "outbound": list(outbound)}, base_dir=Path("/etc/agent-proxy")
    )


def _proxy(name: str, port: int) -> dict[str, object]:
    return {
        "name": name,
        "listen": f"127.0.0.1:{port}",
        "protocol": "http-proxy",
        "routes": [ROUTE],
    }


FILES = {
    "source": "files",
    "cert": "/run/svid/svid.pem",
    "key": "/run/svid/svid_key.pem",
    "bundle": "/run/svid/bundle.pem",
    "federation": {"b.org": "/run/fed/b.pem"},
}


def test_environment_drops_identity_and_sets_the_proxy() -> None:
    config = _config(FILES, _proxy("egress", 15001))
    environ = {
        "PATH": "/usr/bin:/bin",
        "PWD": "/",
        "HOME": "/root",
        "AGENT_PROXY_CONFIG": "/etc/agent-proxy/sidecar.toml",
        "AGENT_PROXY_USER": "nobody",
        "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock",
        "KEY": "/run/svid/svid_key.pem",
        "CERTS": "/x:/run/svid/svid.pem",
        "SVID_DIR": "/run/svid/",
        "FED": "file:///run/fed/b.pem",
        "NO_PROXY": "hr-api",
        "OTHER": "/run/svidx",
    }
    env = agent_environment(environ, config, "http://127.0.0.1:15001")
    assert env == {
        "PATH": "/usr/bin:/bin",
        "PWD": "/",
        "HOME": "/root",
        "OTHER": "/run/svidx",
        "HTTP_PROXY": "http://127.0.0.1:15001",
        "http_proxy": "http://127.0.0.1:15001",
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "no_proxy": "localhost,127.0.0.1,::1",
    }


def test_environment_for_workload_api_and_dev_sources() -> None:
    spire = _config(
        {"source": "workload-api", "endpoint": "unix:///spiffe-workload-api/spire-agent.sock"},
        _proxy("egress", 15001),
    )
    assert "/spiffe-workload-api/spire-agent.sock" in identity_paths(spire)
    env = agent_environment({"S": "/spiffe-workload-api/spire-agent.sock"}, spire, None)
    assert env == {}
    dev = _config(
        {"source": "dev", "spiffe_id": "spiffe://a.org/x", "state_dir": "/var/run/ap/dev"},
        _proxy("egress", 15001),
    )
    env = agent_environment({"D": "/var/run/ap/dev", "K": "/var/run/ap/dev/dev-ca"}, dev, None)
    assert env == {}


def test_environment_names_the_agent_user() -> None:
    config = _config(FILES, _proxy("egress", 15001))
    nobody = resolve_user("nobody", None, euid=0)
    env = agent_environment({"HOME": "/root", "USER": "root"}, config, None, nobody)
    assert env["USER"] == env["LOGNAME"] == "nobody"
    assert env["HOME"] == pwd.getpwnam("nobody").pw_dir


def test_egress_is_the_first_http_proxy_listener() -> None:
    tcp = {
        "name": "l4",
        "listen": "127.0.0.1:15002",
        "protocol": "tcp",
        "routes": [{k: v for k, v in ROUTE.items() if k in ("name", "target", "expect")}],
    }
    config = _config(FILES, tcp, _proxy("first", 15003), _proxy("second", 15004))
    found = egress_listener(config)
    assert found is not None and found.name == "first"
    assert egress_listener(_config(FILES, tcp)) is None


@pytest.mark.parametrize(("rc", "status"), [(0, 0), (7, 7), (-15, 143), (-9, 137)])
def test_exit_status_is_what_a_shell_reports(rc: int, status: int) -> None:
    assert exit_status(rc) == status


def test_resolve_user() -> None:
    assert resolve_user(None, None, euid=1000) is None
    with pytest.raises(UsageError, match="need root"):
        resolve_user("nobody", None, euid=1000)
    with pytest.raises(UsageError, match="needs --user"):
        resolve_user(None, "nogroup", euid=0)
    with pytest.raises(UsageError, match="no such user"):
        resolve_user("no-such-user-here", None, euid=0)
    nobody = pwd.getpwnam("nobody")
    by_name = resolve_user("nobody", None, euid=0)
    assert by_name is not None and (by_name.uid, by_name.gid) == (nobody.pw_uid, nobody.pw_gid)
    by_uid = resolve_user(str(nobody.pw_uid), None, euid=0)
    assert by_uid == by_name
    with pytest.raises(UsageError, match="give --group"):
        resolve_user("4000123", None, euid=0)
    numeric = resolve_user("4000123", "4000124", euid=0)
    assert numeric is not None and (numeric.uid, numeric.gid, numeric.name) == (
        4000123,
        4000124,
        None,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["launch", "--config", "x.toml"], "after '--'"),
        (["launch", "--config", "x.toml", "--"], "after '--'"),
        (["launch", "--config", "x.toml", "--ready-timeout", "soon", "--", "true"], "soon"),
        (["launch", "--config", "x.toml", "--ready-timeout", "0", "--", "true"], "greater"),
        (["launch", "--config", "/nonexistent/x.toml", "--", "true"], "/nonexistent/x.toml"),
        (["launch", "--", "true"], "--config"),
    ],
)
def test_usage_errors_are_one_line_and_status_2(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AGENT_PROXY_CONFIG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_config_may_come_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_PROXY_CONFIG", "/nonexistent/from-env.toml")
    assert main(["launch", "--", "true"]) == 2
    assert "/nonexistent/from-env.toml" in capsys.readouterr().err
    assert os.environ["AGENT_PROXY_CONFIG"]
