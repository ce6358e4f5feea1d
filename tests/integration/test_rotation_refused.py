"""A rotation that passes every X.509 check but that OpenSSL refuses (an
RSA-1024 key: "ee key too small" at context build time) is refused whole:
the old identity keeps serving real handshakes in both directions, one
error is logged naming the cause, and agent_proxy_identity_reloads_total
counts it (issue 10 deliverable 3, issue 12 item 3)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from proxy.identity import IdentityLoadError, IdentityState
from proxy.metrics import Metrics
from proxy.netaddr import HostPort
from proxy.policy import parse_patterns
from proxy.runtime.l4 import L4Config, L4Listener
from proxy.sources import FilesSource
from tests.integration.http_support import client_context, tls_connect
from tests.integration.test_sources_files import polls_pass, wait_until, write_pair
from tests.integration.tls_support import MemoryAudit, snapshot, start_echo
from tests.pki import Issued, TestCA
from tests.unit.test_metrics import samples

AGENT = "spiffe://a.org/agent/payroll"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create("a.org")


def weak(ca: TestCA) -> Issued:
    """A valid X509-SVID whose key OpenSSL's default security level refuses."""
    return ca.issue(AGENT, key=rsa.generate_private_key(65537, 1024))  # type: ignore[arg-type]


@dataclass
class Sidecar:
    """Our sidecar's two sides on one state, and the upstream it talks to."""

    state: IdentityState
    inbound: int  # terminates mTLS in front of an echo server
    outbound: int  # plain TCP in, mTLS out to ``upstream``
    upstream_audit: MemoryAudit

    async def presented_inbound(self, client: Issued) -> str:
        """The serial our inbound listener presents in a real handshake."""
        stream = await tls_connect(self.inbound, client_context(client))
        der = stream.getpeercert(binary_form=True)
        await stream.send_all(b"ping")
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b"ping"
        await stream.aclose()
        assert der is not None
        return format(x509.load_der_x509_certificate(der).serial_number, "x")

    async def presented_outbound(self) -> str:
        """The serial our outbound listener presented, as the upstream recorded it."""
        seen = len(self._upstream_opens())
        stream = await trio.open_tcp_stream("127.0.0.1", self.outbound)
        await stream.send_all(b"pong")
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b"pong"
        await stream.aclose()
        opens = self._upstream_opens()
        assert len(opens) == seen + 1
        return str(opens[-1]["peer_cert_serial"])

    def _upstream_opens(self) -> list[dict[str, object]]:
        return [r for r in self.upstream_audit.records() if r["event"] == "connection.open"]


def _l4(
    name: str,
    direction: str,
    target: int,
    pattern: str,
    state: IdentityState,
    audit: MemoryAudit | None = None,
) -> L4Listener:
    return L4Listener(
        L4Config(
            name,
            "inbound" if direction == "inbound" else "outbound",
            HostPort("127.0.0.1", 0),
            HostPort("127.0.0.1", target),
            parse_patterns([pattern]),
        ),
        state,
        (audit or MemoryAudit()).sink,
    )


async def _serve(nursery: trio.Nursery, listener: L4Listener) -> int:
    bound = await nursery.start(listener.serve, nursery)
    return int(bound[0].rpartition(":")[2])


@asynccontextmanager
async def sidecar(ca: TestCA, state: IdentityState) -> AsyncIterator[Sidecar]:
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        upstream_audit = MemoryAudit()
        hr_state = IdentityState(snapshot(ca.issue("spiffe://a.org/svc/hr"), ca))
        hr = _l4("hr", "inbound", echo, "spiffe://a.org/**", hr_state, upstream_audit)
        hr_port = await _serve(nursery, hr)
        inbound = await _serve(nursery, _l4("in", "inbound", echo, "spiffe://a.org/**", state))
        outbound = await _serve(
            nursery, _l4("out", "outbound", hr_port, "spiffe://a.org/svc/hr", state)
        )
        yield Sidecar(state, inbound, outbound, upstream_audit)
        nursery.cancel_scope.cancel()


def _serial(issued: Issued) -> str:
    return format(issued.cert.serial_number, "x")


async def test_swap_to_a_key_openssl_refuses_keeps_the_old_identity(ca: TestCA) -> None:
    old = ca.issue(AGENT)
    client = ca.issue("spiffe://a.org/agent/client")
    state = IdentityState(snapshot(old, ca))
    async with sidecar(ca, state) as car:
        assert await car.presented_inbound(client) == _serial(old)
        refused = weak(ca)
        candidate = snapshot(refused, ca)  # snapshot validation passes
        with pytest.raises(IdentityLoadError, match="ee key too small") as info:
            state.swap(candidate)
        assert "listener" in str(info.value) and _serial(refused) in str(info.value)
        assert state.current.svid.serial_hex == _serial(old) and state.generation == 0
        # Both directions keep serving, with the old SVID, in real handshakes.
        assert await car.presented_inbound(client) == _serial(old)
        assert await car.presented_outbound() == _serial(old)
        # And a good rotation afterwards goes through as usual.
        new = ca.issue(AGENT)
        state.swap(snapshot(new, ca))
        assert await car.presented_inbound(client) == _serial(new)
        assert await car.presented_outbound() == _serial(new)


async def test_files_source_rotation_to_a_refused_key(tmp_path: Path, ca: TestCA) -> None:
    old = ca.issue(AGENT)
    client = ca.issue("spiffe://a.org/agent/client")
    write_pair(tmp_path, old)
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    cert, key, bundle = (tmp_path / n for n in ("svid.pem", "svid_key.pem", "bundle.pem"))
    source = FilesSource(cert, key, bundle, poll_interval=0.005)
    state = IdentityState(await source.initial())
    metrics = Metrics()
    metrics.watch_identity(state, source.stats)
    ok = ("agent_proxy_identity_reloads_total", (("result", "ok"),))
    error = ("agent_proxy_identity_reloads_total", (("result", "error"),))
    async with sidecar(ca, state) as car, trio.open_nursery() as nursery:
        nursery.start_soon(source.run, state)
        await polls_pass(source, 1)
        with capture_logs() as logs:
            write_pair(tmp_path, weak(ca))
            await wait_until(source, lambda: source.stats.reloads_failed >= 1)
            await polls_pass(source, 3)  # the set stays refused, and is not re-reported
        errors = [r for r in logs if r["log_level"] == "error"]
        assert len(errors) == 1, logs
        assert errors[0]["event"] == "identity reload failed; keeping the current identity"
        assert "ee key too small" in errors[0]["error"]
        assert not [r for r in logs if r["event"] == "identity rotated"]
        assert samples(metrics)[error] == 1 and samples(metrics)[ok] == 0
        assert state.current.svid.serial_hex == _serial(old)
        assert await car.presented_inbound(client) == _serial(old)
        assert await car.presented_outbound() == _serial(old)

        new = ca.issue(AGENT)
        write_pair(tmp_path, new)
        await wait_until(source, lambda: state.generation == 1)
        assert samples(metrics)[ok] == 1 and samples(metrics)[error] == 1
        assert await car.presented_inbound(client) == _serial(new)
        assert await car.presented_outbound() == _serial(new)
        nursery.cancel_scope.cancel()
    expiry = samples(metrics)[("agent_proxy_svid_expiry_timestamp_seconds", ())]
    assert expiry == new.cert.not_valid_after_utc.replace(tzinfo=dt.UTC).timestamp()
