"""The ``[tracing]`` config section: off unless ``otlp_endpoint`` is set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config package imports this module's settings type
    from proxy.config.walker import Table


@dataclass(frozen=True, slots=True)
class TracingSettings:
    otlp_endpoint: str | None = None  # http(s)://collector:4318 (OTLP/HTTP protobuf)
    service_name: str = "agent-proxy"
    timeout: float = 5.0  # one export attempt, seconds (on the export thread)
    max_queue: int = 2048  # spans waiting for export; more are dropped and counted
    batch_size: int = 512
    schedule_delay: float = 1.0  # seconds between exports

    @property
    def traces_url(self) -> str | None:
        if self.otlp_endpoint is None:
            return None
        base = self.otlp_endpoint.rstrip("/")
        return base if base.endswith("/v1/traces") else base + "/v1/traces"


def parse_tracing(t: Table) -> TracingSettings:
    d = TracingSettings()
    endpoint = t.text("otlp_endpoint", "") or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        t.fail("otlp_endpoint", f"expected an http:// or https:// URL, got {t.show(endpoint)}")
    settings = TracingSettings(
        otlp_endpoint=endpoint,
        service_name=t.text("service_name", d.service_name),
        timeout=t.duration("timeout", default=d.timeout),
        max_queue=t.integer("max_queue", default=d.max_queue),
        batch_size=t.integer("batch_size", default=d.batch_size),
        schedule_delay=t.duration("schedule_delay", default=d.schedule_delay),
    )
    t.done()
    return settings
