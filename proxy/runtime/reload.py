"""Hot reload of the rules: on SIGHUP, or when the config file changes.

A new file is parsed and validated in full first. When it differs from the
running one only in rules (policies, guard keys of routes), the new
policies are swapped in at once: each request reads its listener's or
route's policy when it starts, so none sees a mix. Anything else (listeners,
addresses, the identity source, the admin endpoint, [guard] tables) needs a
restart: the reload says so and changes nothing. A file that does not
validate keeps the old rules; the error is logged and counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
import trio

from proxy.config import Config, ConfigError, InboundConfig, OutboundConfig, load_config
from proxy.metrics import Metrics
from proxy.runtime.http_listeners import HttpInboundListener, HttpOutboundListener
from proxy.runtime.listener import BaseListener

log = structlog.get_logger("agent_proxy")


def _shape_in(c: InboundConfig) -> InboundConfig:
    return dataclasses.replace(c, rules=())


def _shape_out(c: OutboundConfig) -> OutboundConfig:
    return dataclasses.replace(c, routes=tuple(dataclasses.replace(r, rule=None) for r in c.routes))


def restart_needed(old: Config, new: Config) -> list[str]:
    """What differs beyond rules, i.e. what a reload cannot apply."""
    problems = []
    for name in ("identity", "admin", "audit", "guard", "drain_timeout", "log_level"):
        if getattr(old, name) != getattr(new, name):
            problems.append(name)
    if [_shape_in(c) for c in old.inbound] != [_shape_in(c) for c in new.inbound]:
        problems.append("inbound listeners")
    if [_shape_out(c) for c in old.outbound] != [_shape_out(c) for c in new.outbound]:
        problems.append("outbound listeners")
    return problems


class ConfigReloader:
    def __init__(
        self,
        path: str | os.PathLike[str],
        config: Config,
        listeners: Sequence[BaseListener],
        metrics: Metrics | None = None,
        *,
        poll_interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.listeners = listeners
        self.metrics = metrics
        self.poll_interval = poll_interval
        self._seen = self._signature()
        self.reloads = 0
        self.failures = 0
        self.on_reload: Callable[[str], None] | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, why: str) -> bool:
        """Try to apply the file now; True when new rules took effect."""
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            self.failures += 1
            self._count("error")
            log.error(
                "config reload failed; keeping the current rules", trigger=why, error=str(exc)
            )
            return False
        needs = restart_needed(self.config, new)
        if needs:
            self.failures += 1
            self._count("restart_required")
            log.warning(
                "config changed in ways a reload cannot apply; restart to use them "
                "(rules unchanged)",
                trigger=why,
                changed=needs,
            )
            return False
        if new.policy_version == self.config.policy_version:
            log.info("config reloaded; rules unchanged", trigger=why)
            return False
        self._apply(new)
        self.config = new
        self.reloads += 1
        self._count("ok")
        log.info("rules reloaded", trigger=why, policy_version=new.policy_version)
        if self.on_reload is not None:
            self.on_reload(new.policy_version)
        return True

    def _apply(self, new: Config) -> None:
        inbound = {c.name: c for c in new.inbound}
        outbound = {c.name: c for c in new.outbound}
        for listener in self.listeners:
            if isinstance(listener, HttpInboundListener):
                listener.set_policy(inbound[listener.name].guard)
            elif isinstance(listener, HttpOutboundListener):
                listener.set_routes(outbound[listener.name].routes)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.config_reload(result)

    async def watch(self) -> None:
        """Poll the file; reload when it changes (editors, ConfigMap swaps)."""
        while True:
            await trio.sleep(self.poll_interval)
            signature = self._signature()
            if signature != self._seen and signature is not None:
                self._seen = signature
                self.reload("file changed")
