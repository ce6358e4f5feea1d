"""Guardrails for agent traffic: the request policy model (CEL conditions,
deny overrides allow, dry-run), per-peer rate limits, the anomaly tripwire
and quarantine, and step-up approvals for high-impact actions.

Pure code: every decision is a function of data and an injected clock; the
HTTP relay (proxy.runtime) does the I/O and writes the audit records.
"""
