"""JWT bundles for inbound validation: files and the Workload API's
FetchJWTBundles, against a real gRPC server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.credentials.jwt_bundles import JwtBundleWatcher, load_jwt_bundles
from proxy.identity import BundleError, SpiffeId, TrustDomain
from proxy.identity.jwt_svid import JwtSigningKey, mint_jwt_svid, validate_jwt_svid
from proxy.sources.proto import workload_pb2, workload_pb2_grpc

A = TrustDomain.parse("a.org")
B = TrustDomain.parse("b.org")
KEY_A = JwtSigningKey("a1", ec.generate_private_key(ec.SECP256R1()))
KEY_B = JwtSigningKey("b1", ec.generate_private_key(ec.SECP256R1()))


def jwks(*keys: JwtSigningKey) -> bytes:
    return json.dumps({"keys": [k.public_jwk() for k in keys]}).encode()


class BundleAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.bundles: dict[str, bytes] = {"spiffe://a.org": jwks(KEY_A), "b.org": jwks(KEY_B)}
        self.fail = False

    def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.JWTBundlesResponse]:
        if dict(context.invocation_metadata()).get("workload.spiffe.io") != "true":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        if self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "agent restarting")
        yield workload_pb2.JWTBundlesResponse(bundles=self.bundles)


@pytest.fixture
def agent() -> Iterator[tuple[BundleAgent, str]]:
    servicer = BundleAgent()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"ipv4:127.0.0.1:{port}"
    server.stop(grace=None).wait(10)


async def test_workload_api_bundles_and_last_good_kept(agent: tuple[BundleAgent, str]) -> None:
    servicer, target = agent
    watcher = JwtBundleWatcher(target)
    assert await watcher.refresh()
    now = datetime.now(UTC)
    for key, sub in ((KEY_A, "spiffe://a.org/agent/x"), (KEY_B, "spiffe://b.org/agent/y")):
        token = mint_jwt_svid(key, SpiffeId.parse(sub), ["aud"], now=now).token
        assert str(validate_jwt_svid(token, watcher.current, "aud", now).spiffe_id) == sub
    good = watcher.current
    servicer.fail = True
    with structlog.testing.capture_logs() as logs:
        assert not await watcher.refresh()
        assert not await watcher.refresh()
    assert watcher.current is good and watcher.failures == 2
    assert len(logs) == 1 and "UNAVAILABLE" in logs[0]["error"]
    servicer.fail = False
    servicer.bundles = {"spiffe://a.org": b"not json"}
    assert not await watcher.refresh()
    assert watcher.current is good


def test_bundle_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(jwks(KEY_A))
    got = load_jwt_bundles({A: tmp_path / "a.json"})
    assert got.get(A) is not None and got.get(B) is None
    with pytest.raises(BundleError, match="cannot read JWT bundle"):
        load_jwt_bundles({B: tmp_path / "missing.json"})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BundleError, match=r"bad\.json"):
        load_jwt_bundles({B: tmp_path / "bad.json"})
