"""Audit: typed records (values the core returns), the sink that writes them
as a hash-chained, signed trail, and the tools that read it back."""

from proxy.audit.records import (
    AgentCall,
    AuditRecord,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRefused,
    ConnFacts,
    Direction,
    HttpRequest,
    Typed,
    Verdict,
    rfc3339,
    typed,
    utcnow,
)
from proxy.audit.settings import AuditSettings, parse_audit
from proxy.audit.sink import AuditSink

__all__ = [
    "AgentCall",
    "AuditRecord",
    "AuditSettings",
    "AuditSink",
    "ConnFacts",
    "ConnectionClosed",
    "ConnectionOpened",
    "ConnectionRefused",
    "Direction",
    "HttpRequest",
    "Typed",
    "Verdict",
    "parse_audit",
    "rfc3339",
    "typed",
    "utcnow",
]
