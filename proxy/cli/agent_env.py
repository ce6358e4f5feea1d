"""What ``agent-proxy launch`` gives the agent: pure functions of the config,
the environment and the user database (tested without processes).

* :func:`agent_environment`: ours, minus every path to the sidecar's
  identity, plus the proxy variables;
* :func:`resolve_user`: the user and group ``--user``/``--group`` name;
* :func:`exit_status`: a child's status as a shell reports it.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.cli.envflags import ENV_PREFIX
from proxy.config import Config, OutboundConfig
from proxy.errors import UsageError
from proxy.netaddr import HostPort

__all__ = [
    "AgentUser",
    "agent_environment",
    "client_address",
    "egress_listener",
    "exit_status",
    "identity_paths",
    "readable_by",
    "resolve_user",
]

_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


@dataclass(frozen=True, slots=True)
class AgentUser:
    uid: int
    gid: int
    name: str | None  # None: a numeric UID with no passwd entry
    home: str | None


def _lookup_group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise UsageError(f"--group {text!r}: no such group") from None


def resolve_user(user: str | None, group: str | None, euid: int) -> AgentUser | None:
    """The user to run the agent as, or None to run it as ourselves."""
    if user is None and group is None:
        return None
    if euid != 0:
        raise UsageError("--user/--group need root: only root can start the agent as another user")
    if user is None:
        raise UsageError("--group needs --user")
    entry: pwd.struct_passwd | None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise UsageError(f"--user {user!r}: no such user") from None
        entry = None
    if entry is None and group is None:
        raise UsageError(f"--user {user}: no passwd entry for this UID, so give --group too")
    uid = int(user) if entry is None else entry.pw_uid
    gid = _lookup_group(group) if group is not None else entry.pw_gid  # type: ignore[union-attr]
    if entry is None:
        return AgentUser(uid, gid, None, None)
    return AgentUser(uid, gid, entry.pw_name, entry.pw_dir)


def egress_listener(config: Config) -> OutboundConfig | None:
    """The listener HTTP_PROXY points at: the first ``http-proxy`` outbound."""
    return next((o for o in config.outbound if o.protocol == "http-proxy"), None)


def identity_paths(config: Config) -> list[str]:
    """Every path through which the sidecar's identity could be read."""
    ident = config.identity
    paths: list[str] = []
    if ident.source == "files":
        for p in (ident.cert, ident.key, ident.bundle, *ident.federation.values()):
            if p is not None:
                paths.append(str(p))
    elif ident.source == "dev" and ident.state_dir is not None:
        paths.append(str(ident.state_dir))
    elif ident.source == "workload-api" and ident.endpoint and ident.endpoint.startswith("unix:"):
        paths.append(ident.endpoint.removeprefix("unix://"))
    real = [os.path.realpath(p) for p in paths]
    return sorted({*paths, *real})


def _mentions(value: str, paths: Sequence[str]) -> bool:
    """True when ``value`` contains one of ``paths``, or one of its
    ``os.pathsep`` parts is the directory that holds one of them."""
    if any(p and p in value for p in paths):
        return True
    dirs = {os.path.dirname(p).rstrip("/") for p in paths} - {""}
    return any(part.rstrip("/") in dirs for part in value.split(os.pathsep) if part)


def agent_environment(
    environ: Mapping[str, str],
    config: Config,
    proxy_url: str | None,
    user: AgentUser | None = None,
) -> dict[str, str]:
    """The agent's environment: ours, minus anything that leads to the
    sidecar's identity, plus the proxy variables.

    Removed: ``AGENT_PROXY_*`` (our own flags, the config path among them),
    ``SPIFFE_ENDPOINT_SOCKET``, and every variable whose value names an
    identity file, the dev CA's directory, the Workload API socket or a
    directory holding one of them. Set: ``HTTP_PROXY``/``http_proxy`` to the
    egress listener, and ``NO_PROXY``/``no_proxy`` to loopback only, so an
    inherited exclusion cannot send a routed host around the sidecar while
    the agent still reaches its own loopback services directly.
    """
    paths = identity_paths(config)
    env: dict[str, str] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) or name == "SPIFFE_ENDPOINT_SOCKET":
            continue
        if _mentions(value, paths):
            continue
        env[name] = value
    if proxy_url is not None:
        env["HTTP_PROXY"] = env["http_proxy"] = proxy_url
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    if user is not None and user.name is not None:
        env["USER"] = env["LOGNAME"] = user.name
        if user.home:
            env["HOME"] = user.home
    return env


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when killed by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def client_address(hp: HostPort) -> HostPort:
    """Where to connect to reach a listener bound to ``hp``."""
    return HostPort(_LOOPBACK_FOR.get(hp.host, hp.host), hp.port)


def readable_by(path: str, user: AgentUser) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid == user.gid:
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)
