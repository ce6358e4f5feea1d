"""One plan: a frozen Config becomes what runs, by one function, for every command.

Theory of operation: :func:`build_plan` turns a validated
:class:`~proxy.config.Config` into a :class:`RuntimePlan` without touching
the network: the identity source (built, not started), how the config is
re-read on SIGHUP, and how the operator named each listener (for errors).
``run``, ``check-config``, ``launch``, ``inbound`` and ``outbound`` all build
their plan here; the L4 commands only differ in building their Config from
flags. :func:`serve` is the one trio entry that runs a plan: the admin
endpoint first (``/healthz`` answers while identity loads), then the first
identity, the gate, every listener, the reloader and the identity source's
rotation loop, until a signal. :func:`run_plan` wraps it for a command:
``trio.run`` and one clear line for a bind or identity error.

A seam written twice drifts: the L4 commands once lost rotation because
they wired their own listener. Nothing outside this module builds
listeners for a command.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from proxy.audit import AuditSink, rfc3339
from proxy.audit.exposition import register as register_audit_metrics
from proxy.config import Config, InboundConfig, OutboundConfig
from proxy.errors import UsageError, find_exception
from proxy.identity import IdentityState
from proxy.metrics import Metrics, ReactorCollector
from proxy.policy.gate import Gate
from proxy.runtime.http_listeners import HttpInboundListener, HttpOutboundListener
from proxy.runtime.l4 import L4Config, L4Listener
from proxy.runtime.listener import BaseListener
from proxy.runtime.memory import release_forever
from proxy.runtime.reload import ConfigReloader
from proxy.runtime.serve import run_until_signalled
from proxy.sources.base import IdentityLoadError, IdentitySource
from proxy.tracing import Tracer
from proxy.tracing.export import TracingCollector

if TYPE_CHECKING:
    from proxy.runtime.admin import AdminServer

__all__ = [
    "Readiness",
    "RuntimePlan",
    "build_listeners",
    "build_plan",
    "check_identity",
    "make_source",
    "run_plan",
    "serve",
]


@dataclass(frozen=True)
class RuntimePlan:
    config: Config
    # Re-read the config (SIGHUP, file change). The flag front-end re-parses
    # its own flags: the same config, so a SIGHUP reloads identity only.
    reload: Callable[[], Config]
    watch: Path | None = None  # a file to poll for changes
    # Listener name (or "admin") -> how the operator named it ("--listen").
    origins: Mapping[str, str] = field(default_factory=dict)
    # What identity errors are prefixed with ("sidecar.toml: identity").
    identity_label: str = "identity"


def _identity_label(config: Config) -> str:
    return f"{config.source}: identity" if config.source else "identity"


def make_source(config: Config) -> IdentitySource:
    """The identity source the config names, built but not started. Imports
    only the source in use (the Workload API client pulls in gRPC)."""
    identity = config.identity
    try:
        if identity.source == "files":
            from proxy.sources.files import FilesSource

            assert identity.cert and identity.key and identity.bundle
            return FilesSource(identity.cert, identity.key, identity.bundle, identity.federation)
        if identity.source == "workload-api":
            from proxy.sources.workload_api import WorkloadApiSource

            return WorkloadApiSource(identity.endpoint)
        from proxy.sources.dev import DevSource

        assert identity.spiffe_id is not None and identity.state_dir is not None
        return DevSource(identity.state_dir, identity.spiffe_id, ttl=identity.ttl)
    except IdentityLoadError as exc:
        raise UsageError(f"{_identity_label(config)}: {exc}") from None


def check_identity(config: Config) -> None:
    """What can be checked without running: file identities load and verify
    now (``check-config``, ``launch``). UsageError naming the problem."""
    identity = config.identity
    if identity.source != "files":
        return
    from proxy.sources.files import load_snapshot_from_files

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
        raise UsageError(f"{_identity_label(config)}: {exc}") from None


def build_plan(
    config: Config,
    *,
    reload: Callable[[], Config] | None = None,
    watch: Path | None = None,
    origins: Mapping[str, str] | None = None,
) -> RuntimePlan:
    """The plan for ``config``, with no I/O (``check-config`` and ``launch``
    build it too). ``reload`` defaults to returning the same config (nothing
    to re-read); ``run`` passes the file's loader."""
    return RuntimePlan(
        config=config,
        reload=reload or (lambda: config),
        watch=watch,
        origins=dict(origins or {}),
        identity_label=_identity_label(config),
    )


# -- listeners ----------------------------------------------------------------


def l4_inbound(c: InboundConfig) -> L4Config:
    return L4Config(
        c.name,
        "inbound",
        c.listen,
        c.target,
        tuple(p for rule in c.guard.rules for p in rule.peers),
        c.handshake_timeout,
        c.connect_timeout,
        c.max_connections,
        c.min_tls,
        max_connection_lifetime=c.limits.max_connection_lifetime,
        write_timeout=c.write_timeout,
    )


def l4_outbound(c: OutboundConfig) -> L4Config:
    route = c.routes[0]
    return L4Config(
        c.name,
        "outbound",
        c.listen,
        route.target,
        route.expect,
        c.handshake_timeout,
        c.connect_timeout,
        c.max_connections,
        c.min_tls,
        max_connection_lifetime=c.limits.max_connection_lifetime,
        write_timeout=c.write_timeout,
    )


def build_listeners(
    config: Config, state: IdentityState, audit: AuditSink, gate: Gate
) -> list[BaseListener]:
    listeners: list[BaseListener] = []
    for inbound in config.inbound:
        if inbound.protocol == "tcp":
            listeners.append(L4Listener(l4_inbound(inbound), state, audit))
        else:  # http, mcp, a2a: all through the HTTP relay
            listeners.append(HttpInboundListener(inbound, state, audit, gate, config.identity))
    for outbound in config.outbound:
        if outbound.protocol == "tcp":
            listeners.append(L4Listener(l4_outbound(outbound), state, audit))
        else:
            listeners.append(HttpOutboundListener(outbound, state, audit, gate, config.identity))
    return listeners


# -- running ------------------------------------------------------------------


class Readiness:
    """/readyz: identity loaded, every listener bound, our SVID not expired."""

    def __init__(self) -> None:
        self.state: IdentityState | None = None
        self.listening = False
        self.audit: AuditSink | None = None

    def __call__(self) -> tuple[bool, str]:
        if self.state is None:
            return False, "identity not loaded"
        if not self.listening:
            return False, "listeners not bound"
        if self.audit is not None and not self.audit.accepting():
            return False, f"audit trail unavailable: {self.audit.last_error}"
        svid = self.state.current.svid
        if _dt.datetime.now(_dt.UTC) >= svid.not_after:
            return False, f"our SVID expired at {rfc3339(svid.not_after)}"
        return True, "ready"


def _publish_policy(gate: Gate, metrics: Metrics, config: Config) -> None:
    # One policy version: what check-config prints is what records carry.
    gate.policy_version = config.policy_version
    metrics.set_policy_version(config.policy_version)


async def serve(
    plan: RuntimePlan, source: IdentitySource, audit: AuditSink, metrics: Metrics
) -> None:
    config = plan.config
    # Off by default: ids are still made and propagated, nothing exported.
    tracer = Tracer(config.tracing)
    try:
        await _serve(plan, source, audit, metrics, tracer)
    finally:
        tracer.shutdown()  # what is queued gets one bounded try (its own thread)


async def _serve(
    plan: RuntimePlan, source: IdentitySource, audit: AuditSink, metrics: Metrics, tracer: Tracer
) -> None:
    config = plan.config
    readiness = Readiness()
    readiness.audit = audit
    register_audit_metrics(metrics, audit)
    reactor_metrics = ReactorCollector()
    metrics.register(reactor_metrics)
    if tracer.enabled:
        metrics.register(TracingCollector(tracer))
    admin: AdminServer | None = None
    if config.admin.listen is not None:
        # Here, not at the top: h11 and the admin routes only when enabled.
        from proxy.runtime.admin import AdminServer

        admin = AdminServer(config.admin.listen, metrics, readiness)
        admin.origin = plan.origins.get("admin")
    async with trio.open_nursery() as nursery:
        if admin is not None:
            await nursery.start(admin.serve)
        try:
            snapshot = await source.initial()
        except IdentityLoadError as exc:
            raise UsageError(f"{plan.identity_label}: {exc}") from None
        state = IdentityState(snapshot)
        readiness.state = state
        audit.signer = lambda: (state.current.svid.private_key, state.current.svid.chain)
        metrics.watch_identity(state, source.stats)
        gate = Gate(config.guard)
        if admin is not None:
            from proxy.runtime.gate import install_guard_routes

            install_guard_routes(admin, gate)
        try:
            listeners = build_listeners(config, state, audit, gate)
        except IdentityLoadError as exc:  # a TLS context OpenSSL refuses to build
            raise UsageError(f"{plan.identity_label}: {exc}") from None
        for listener in listeners:
            listener.metrics = metrics
            listener.tracer = tracer
            listener.origin = plan.origins.get(listener.name)
        providers = [p for lst in listeners for p in getattr(lst, "providers", {}).values()]
        if providers:
            from proxy.credentials.metrics import CredentialCollector

            metrics.register(CredentialCollector(lambda: providers))
        _publish_policy(gate, metrics, config)
        reloader = ConfigReloader(plan.reload, config, listeners, metrics, watch=plan.watch)
        reloader.on_reload.append(partial(_publish_policy, gate, metrics))

        def ready() -> None:
            readiness.listening = True

        def hup() -> None:
            source.request_reload()
            reloader.reload("SIGHUP")

        await run_until_signalled(
            listeners,
            drain_timeout=config.drain_timeout,
            background=[
                partial(source.run, state),
                audit.flush_forever,
                reloader.watch,
                release_forever,  # the heap back to the system after a burst
            ],
            on_hup=hup,
            on_ready=ready,
            on_reactor=reactor_metrics.attach,
        )
        nursery.cancel_scope.cancel()


def raise_fd_limit() -> None:
    # Each relayed connection holds two descriptors; the default soft limit
    # (often 1024) would cap us far below max_connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_plan(plan: RuntimePlan) -> int:
    """Run ``plan`` until a signal: the body of ``run``, ``inbound``, ``outbound``."""
    source = make_source(plan.config)
    audit = AuditSink.open(plan.config.audit)
    raise_fd_limit()
    try:
        trio.run(serve, plan, source, audit, Metrics())
    except BaseException as exc:
        usage = find_exception(exc, UsageError)
        if usage is not None:
            raise usage from None
        raise
    finally:
        audit.close()
    return 0
