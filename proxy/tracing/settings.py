"""The ``[tracing]`` config section: off unless ``otlp_endpoint`` is set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.audit.settings import SectionReader


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


def parse_tracing(
    table: Mapping[str, Any], at: str = "tracing", *, source: str | None = None
) -> TracingSettings:
    r = SectionReader(table if isinstance(table, Mapping) else {}, at, source)
    if not isinstance(table, Mapping):
        r.fail("", "expected a table")
    d = TracingSettings()
    endpoint = r.string("otlp_endpoint", None)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        r.fail("otlp_endpoint", f'expected an http:// or https:// URL, got "{endpoint}"')
    settings = TracingSettings(
        otlp_endpoint=endpoint,
        service_name=r.string("service_name", d.service_name) or d.service_name,
        timeout=r.seconds("timeout", d.timeout) or d.timeout,
        max_queue=r.integer("max_queue", d.max_queue, minimum=1) or d.max_queue,
        batch_size=r.integer("batch_size", d.batch_size, minimum=1) or d.batch_size,
        schedule_delay=r.seconds("schedule_delay", d.schedule_delay) or d.schedule_delay,
    )
    r.done()
    return settings
