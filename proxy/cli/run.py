"""``agent-proxy run --config FILE`` and ``agent-proxy check-config FILE``.

``run`` starts every listener the file names in one process, with one
identity source and the admin endpoint. ``check-config`` validates the file
(and, for file identities, that the SVID and bundles load) and prints a
summary. Problems are one line naming the key, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from functools import partial
from typing import Any

import structlog
import trio

from proxy import logs
from proxy.audit import AuditSink, rfc3339
from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.cli.sidecar import raise_fd_limit
from proxy.config import Config, InboundConfig, OutboundConfig, load_config, summarize
from proxy.errors import UsageError, find_exception
from proxy.metrics import Metrics
from proxy.runtime.admin import AdminServer
from proxy.runtime.gate import Gate, install_guard_routes
from proxy.runtime.http_listeners import HttpInboundListener, HttpOutboundListener
from proxy.runtime.identity_state import IdentityState
from proxy.runtime.l4 import L4Config, L4Listener
from proxy.runtime.listener import BaseListener
from proxy.runtime.reload import ConfigReloader
from proxy.runtime.serve import run_until_signalled
from proxy.sources.base import IdentityLoadError, IdentitySource
from proxy.sources.dev import DevSource
from proxy.sources.files import FilesSource, load_snapshot_from_files

log = structlog.get_logger("agent_proxy")

_RUN_FLAGS = (EnvFlag("config", "--config", required=True),)


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run the listeners a config file describes",
        description="Run every inbound and outbound listener in FILE.toml.",
    )
    run.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help=env_help("the configuration file", "--config"),
    )
    run.set_defaults(handler=_run)
    check = sub.add_parser(
        "check-config",
        help="validate a config file and print a summary",
        description="Validate FILE.toml and print what it would run.",
    )
    check.add_argument("file", metavar="FILE.toml")
    check.set_defaults(handler=_check)


def make_source(config: Config) -> IdentitySource:
    identity = config.identity
    try:
        if identity.source == "files":
            assert identity.cert and identity.key and identity.bundle
            return FilesSource(identity.cert, identity.key, identity.bundle, identity.federation)
        if identity.source == "workload-api":
            from proxy.sources.workload_api import WorkloadApiSource  # grpc: only for SPIRE

            return WorkloadApiSource(identity.endpoint)
        assert identity.spiffe_id is not None and identity.state_dir is not None
        return DevSource(identity.state_dir, identity.spiffe_id, ttl=identity.ttl)
    except IdentityLoadError as exc:
        raise UsageError(f"{config.source}: identity: {exc}") from None


def build_listeners(
    config: Config, state: IdentityState, audit: AuditSink, gate: Gate
) -> list[BaseListener]:
    listeners: list[BaseListener] = []
    for inbound in config.inbound:
        listeners.append(_inbound(inbound, state, audit, gate))
    for outbound in config.outbound:
        listeners.append(_outbound(outbound, state, audit, gate))
    return listeners


def _inbound(c: InboundConfig, state: IdentityState, audit: AuditSink, gate: Gate) -> BaseListener:
    if c.protocol != "tcp":  # http, mcp, a2a: all through the HTTP relay
        return HttpInboundListener(c, state, audit, gate)
    peers = tuple(p for rule in c.rules for p in rule.peers)
    return L4Listener(
        L4Config(
            c.name,
            "inbound",
            c.listen,
            c.target,
            peers,
            c.handshake_timeout,
            c.connect_timeout,
            c.max_connections,
            c.min_tls,
        ),
        state,
        audit,
    )


def _outbound(
    c: OutboundConfig, state: IdentityState, audit: AuditSink, gate: Gate
) -> BaseListener:
    if c.protocol in ("http", "http-proxy"):
        return HttpOutboundListener(c, state, audit, gate)
    route = c.routes[0]
    return L4Listener(
        L4Config(
            c.name,
            "outbound",
            c.listen,
            route.target,
            route.expect,
            c.handshake_timeout,
            c.connect_timeout,
            c.max_connections,
            c.min_tls,
        ),
        state,
        audit,
    )


class Readiness:
    """/readyz: identity loaded, every listener bound, our SVID not expired."""

    def __init__(self) -> None:
        self.state: IdentityState | None = None
        self.listening = False

    def __call__(self) -> tuple[bool, str]:
        if self.state is None:
            return False, "identity not loaded"
        if not self.listening:
            return False, "listeners not bound"
        svid = self.state.current.svid
        if _dt.datetime.now(_dt.UTC) >= svid.not_after:
            return False, f"our SVID expired at {rfc3339(svid.not_after)}"
        return True, "ready"


async def _serve(
    config: Config, source: IdentitySource, audit: AuditSink, metrics: Metrics
) -> None:
    readiness = Readiness()
    admin = AdminServer(config.admin.listen, metrics, readiness) if config.admin.listen else None
    async with trio.open_nursery() as nursery:
        if admin is not None:
            await nursery.start(admin.serve)
        try:
            snapshot = await source.initial()
        except IdentityLoadError as exc:
            raise UsageError(f"{config.source}: identity: {exc}") from None
        state = IdentityState(snapshot)
        readiness.state = state
        state.subscribe(lambda snap: metrics.set_svid_not_after(snap.svid.not_after))
        gate = Gate(config.guard)
        install_guard_routes(admin, gate) if admin is not None else None
        listeners = build_listeners(config, state, audit, gate)
        for listener in listeners:
            listener.metrics = metrics

        reloader = ConfigReloader(config.source, config, listeners, metrics)

        def ready() -> None:
            readiness.listening = True

        def hup() -> None:
            source.request_reload()
            reloader.reload("SIGHUP")

        await run_until_signalled(
            listeners,
            drain_timeout=config.drain_timeout,
            background=[partial(source.run, state), audit.flush_forever, reloader.watch],
            on_hup=hup,
            on_ready=ready,
        )
        nursery.cancel_scope.cancel()


def _run(args: argparse.Namespace) -> int:
    fill_from_env(args, _RUN_FLAGS)
    config = load_config(args.config)
    logs.configure(config.log_level)
    source = make_source(config)
    audit = AuditSink.open(config.audit.path)
    metrics = Metrics()
    raise_fd_limit()
    try:
        trio.run(_serve, config, source, audit, metrics)
    except BaseException as exc:
        usage = find_exception(exc, UsageError)
        if usage is not None:
            raise usage from None
        bind_error = find_exception(exc, OSError)
        if bind_error is None:
            raise
        raise UsageError(
            f"{config.source}: cannot listen: {bind_error.strerror or bind_error}"
        ) from None
    finally:
        audit.close()
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    identity = config.identity
    if identity.source == "files":
        assert identity.cert and identity.key and identity.bundle
        try:
            load_snapshot_from_files(
                identity.cert,
                identity.key,
                identity.bundle,
                identity.federation,
                _dt.datetime.now(_dt.UTC),
            )
        except IdentityLoadError as exc:
            raise UsageError(f"{config.source}: identity: {exc}") from None
    sys.stdout.write(summarize(config).rstrip("\n") + "\n")
    return 0
