"""Hot reload of the rules: on SIGHUP, or when the config file changes.

A new config is parsed and validated in full first. When it differs from
the running one only in rules (``[[inbound.rules]]`` of every listener, TCP
included, and the guard keys of routes), the new policies are swapped in
at once: each request or handshake reads its listener's or route's policy
when it starts, so none sees a mix. Anything else (addresses, timeouts,
the identity source, the admin endpoint, [guard] tables) needs a restart:
the reload names each such key (``inbound[0].listen``) and changes
nothing. A config that does not validate keeps the old rules; the error is
logged and counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
import trio

from proxy.config import Config, ConfigError
from proxy.metrics import Metrics
from proxy.netaddr import HostPort
from proxy.runtime.http_listeners import HttpInboundListener, HttpOutboundListener
from proxy.runtime.l4 import L4Listener
from proxy.runtime.listener import BaseListener

log = structlog.get_logger("agent_proxy")

# Dataclass fields spelled differently from their TOML key. HttpLimits'
# fields sit directly in the listener's table; the others are sub-tables.
_FLAT = ("limits",)


def _section(value: object) -> bool:
    # A table of the config, as opposed to a value such as an address.
    return dataclasses.is_dataclass(value) and not isinstance(value, HostPort | type)


def _diff(old: object, new: object, path: str, out: list[str]) -> None:
    """Append the key path of every compared field that differs."""
    if _section(old) and _section(new) and dataclasses.is_dataclass(old):
        for f in dataclasses.fields(old):
            if not f.compare:
                continue  # rules (PolicySet, GuardRule): what a reload applies
            prefix = path if f.name in _FLAT else (f"{path}.{f.name}" if path else f.name)
            _diff(getattr(old, f.name), getattr(new, f.name), prefix, out)
        return
    if isinstance(old, tuple) and isinstance(new, tuple) and any(_section(x) for x in (*old, *new)):
        for i in range(max(len(old), len(new))):
            if i >= len(old) or i >= len(new):
                out.append(f"{path}[{i}]")  # a listener or route added or removed
            else:
                _diff(old[i], new[i], f"{path}[{i}]", out)
        return
    if old != new:
        out.append(path)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The key paths that differ beyond rules, i.e. what a reload cannot apply."""
    out: list[str] = []
    for name in ("identity", "admin", "audit", "tracing", "guard", "drain_timeout", "log_level"):
        _diff(getattr(old, name), getattr(new, name), name, out)
    _diff(old.inbound, new.inbound, "inbound", out)
    _diff(old.outbound, new.outbound, "outbound", out)
    return out


class ConfigReloader:
    """Re-reads the config with ``load`` and applies new rules to every
    listener. ``watch``: a file polled for changes (``run``); without one,
    only SIGHUP triggers a reload."""

    def __init__(
        self,
        load: Callable[[], Config],
        config: Config,
        listeners: Sequence[BaseListener],
        metrics: Metrics | None = None,
        *,
        watch: str | os.PathLike[str] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.load = load
        self.config = config
        self.listeners = listeners
        self.metrics = metrics
        self.watch_path = Path(watch) if watch is not None else None
        self.poll_interval = poll_interval
        self._seen = self._signature()
        self.reloads = 0
        self.failures = 0
        self.on_reload: list[Callable[[Config], None]] = []

    def _signature(self) -> tuple[int, int, int] | None:
        if self.watch_path is None:
            return None
        try:
            st = os.stat(self.watch_path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, why: str) -> bool:
        """Try to apply the config now; True when new rules took effect."""
        try:
            new = self.load()
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
        for callback in self.on_reload:
            callback(new)
        return True

    def _apply(self, new: Config) -> None:
        inbound = {c.name: c for c in new.inbound}
        outbound = {c.name: c for c in new.outbound}
        for listener in self.listeners:
            if isinstance(listener, HttpInboundListener | L4Listener) and listener.name in inbound:
                listener.set_policy(inbound[listener.name].guard)
            elif isinstance(listener, HttpOutboundListener):
                listener.set_routes(outbound[listener.name].routes)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.config_reload(result)

    async def watch(self) -> None:
        """Poll the file; reload when it changes (editors, ConfigMap swaps)."""
        if self.watch_path is None:
            return
        while True:
            await trio.sleep(self.poll_interval)
            signature = self._signature()
            if signature != self._seen and signature is not None:
                self._seen = signature
                self.reload("file changed")
