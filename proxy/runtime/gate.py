"""Admin routes for the guard gate: list quarantines, release one."""

from __future__ import annotations

import json

import h11
import structlog

from proxy.identity import SpiffeId, SpiffeIdError
from proxy.policy.gate import Gate
from proxy.runtime.admin import AdminServer
from proxy.runtime.admin import Response as AdminResponse

log = structlog.get_logger("agent_proxy")


def install_guard_routes(admin: AdminServer, gate: Gate) -> None:
    """Admin: list quarantines, release one (loopback clients only)."""

    async def list_quarantines(request: h11.Request, body: bytes) -> AdminResponse:
        now = gate.clock()
        items = [
            {
                "peer": str(e.peer),
                "reason": e.reason,
                "detail": e.detail,
                "remaining_s": round(max(0.0, e.until - now), 1),
            }
            for e in gate.quarantine.list()
        ]
        return 200, [("content-type", "application/json")], json.dumps(items).encode() + b"\n"

    async def release(request: h11.Request, body: bytes) -> AdminResponse:
        try:
            doc = json.loads(body or b"{}")
            peer = SpiffeId.parse(str(doc["peer"]))
        except (ValueError, KeyError, TypeError, SpiffeIdError) as exc:
            return 400, [("content-type", "text/plain")], f"bad request: {exc}\n".encode()
        if not gate.quarantine.release(peer):
            return 404, [("content-type", "text/plain")], b"not quarantined\n"
        log.info("quarantine released", peer=str(peer))
        return (
            200,
            [("content-type", "application/json")],
            json.dumps({"released": str(peer)}).encode() + b"\n",
        )

    admin.add_route("GET", "/guard/quarantines", list_quarantines, loopback_only=True)
    admin.add_route("POST", "/guard/quarantines/release", release, loopback_only=True)
