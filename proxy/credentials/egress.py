"""The egress side of a route's credential and DNS upstream (pure).

Theory of operation: the outbound router decides a request with the
route's rules first; only a request the rules allow asks the route's
provider for its credential, without waiting (the provider refreshes in the
background). Then the agent's copy of the credential's header is stripped
(``Routed.strip``, which also covers trailers) and ours added
(``Routed.add_headers``); the record gets what the audit may say of the
credential (type, exp, a short hash), never the value. No credential in
hand: the request is refused 503 ``credential_unavailable`` with our own
answer, so nothing is ever sent upstream without its credential, and
nothing of the token endpoint's answer reaches the agent.

The audit fields ride on the verdict (:class:`AuditedVerdict`), the one
value the session copies into the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.credentials.config import UpstreamTlsConfig
from proxy.credentials.provider import REASON, CredentialProvider, CredentialUnavailable
from proxy.http.routing import Routed
from proxy.policy.verdict import RequestVerdict

__all__ = ["AuditedVerdict", "dns_audit_fields", "with_route_credential"]


@dataclass(frozen=True, slots=True)
class AuditedVerdict(RequestVerdict):
    """A verdict whose record also carries the route's upstream and
    credential fields (never a secret: see Credential.audit_fields)."""

    audit_extra: tuple[tuple[str, object], ...] = ()

    def audit_fields(self) -> dict[str, object]:
        out = RequestVerdict.audit_fields(self)
        out.update(self.audit_extra)
        return out


def dns_audit_fields(upstream: UpstreamTlsConfig) -> dict[str, object]:
    """What admits a DNS route's upstream: the WebPKI name check of
    ``server_name`` against its trust (the serial and not-after of the
    certificate it presented are the record's peer_cert_* fields)."""
    if upstream.mode != "dns":
        return {}
    return {
        "upstream_verification": "dns",
        "upstream_dns_name": upstream.server_name,
        "upstream_trust": "system" if isinstance(upstream.ca_file, str) else "ca_file",
    }


def _audited(verdict: RequestVerdict, fields: Mapping[str, object]) -> AuditedVerdict:
    base = {f.name: getattr(verdict, f.name) for f in dataclasses.fields(RequestVerdict)}
    extra = (*getattr(verdict, "audit_extra", ()), *fields.items())
    return AuditedVerdict(**base, audit_extra=extra)


def with_route_credential(
    routed: Routed,
    provider: CredentialProvider | None,
    fields: Mapping[str, object],
    *,
    hooked: bool = False,
) -> Routed:
    """``routed`` as the upstream gets it: for an allowed request, the
    route's credential set (or 503 ``credential_unavailable``); ``fields``
    (the route's upstream audit fields) added either way. A decision still
    waiting for the body is wrapped, so the credential is taken after it.
    ``hooked``: an agent protocol judges the body later, and forwards only
    what it allows; the credential is taken now."""
    if routed.finish is not None:
        finish = routed.finish

        def finished(body_hash: str) -> Routed:
            return with_route_credential(finish(body_hash), provider, fields)

        routed.finish = finished
        routed.decision = _audited(routed.decision, fields)
        return routed
    decision = routed.decision
    if (not decision.allowed and not hooked) or provider is None:
        routed.decision = _audited(decision, fields)
        return routed
    try:
        cred = provider.current()
    except CredentialUnavailable as exc:
        refused = dataclasses.replace(
            RequestVerdict(False, REASON, decision.rule, decision.policy_version),
            status=CredentialUnavailable.status,
            detail=str(exc),
        )
        routed.decision = _audited(refused, {**fields, "credential_type": provider.kind})
        routed.key = None
        routed.hook = None  # an agent protocol must not judge (and forward) it
        routed.allow_upgrade = False
        return routed
    routed.strip = routed.strip | {cred.header}
    routed.add_headers = (*routed.add_headers, (cred.header, cred.value))
    routed.decision = _audited(decision, {**fields, **cred.audit_fields()})
    return routed
