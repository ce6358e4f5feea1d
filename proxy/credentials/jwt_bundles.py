"""JWT bundles for validating inbound JWT-SVIDs: from files, or the Workload API.

Theory of operation: an inbound listener with ``jwt_svid`` validates tokens
against a :class:`~proxy.identity.jwt_svid.JwtBundleSet`. It comes from the
SPIFFE bundle files the config names (:func:`load_jwt_bundles`), or from
the Workload API's ``FetchJWTBundles`` stream. :class:`JwtBundleWatcher`
polls that stream (takes its first message, which is the full current
state, then closes it) every ``interval``: SPIRE publishes a new JWT key in
the bundle well before it signs with it, so a poll a minute keeps up, and
no long-lived stream needs a thread. A message that does not parse, or a
failed call, keeps the last good set (logged once per incident).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import grpc
import structlog
import trio

from proxy.identity import BundleError, SpiffeIdError, TrustDomain
from proxy.identity.jwt_svid import JwtBundle, JwtBundleSet
from proxy.sources.proto import workload_pb2, workload_pb2_grpc
from proxy.sources.workload_api import SECURITY_HEADER

__all__ = ["JwtBundleWatcher", "bundles_from_response", "load_jwt_bundles"]

_DETAILS_MAX = 200


def load_jwt_bundles(paths: Mapping[TrustDomain, Path]) -> JwtBundleSet:
    """The JWT bundles of SPIFFE bundle files; BundleError names the file."""
    bundles: list[JwtBundle] = []
    for td, path in paths.items():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read JWT bundle {path}: {exc.strerror or exc}") from None
        try:
            bundles.append(JwtBundle.from_jwks(td, data))
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None
    return JwtBundleSet(bundles)


def _trust_domain(key: str) -> TrustDomain:
    # The Workload API keys bundles by trust domain ID ("spiffe://a.org");
    # some implementations send the bare name.
    return TrustDomain.parse(key.removeprefix("spiffe://"))


def bundles_from_response(response: workload_pb2.JWTBundlesResponse) -> JwtBundleSet:
    """Every trust domain's JWT bundle in one FetchJWTBundles message."""
    bundles: list[JwtBundle] = []
    for key in sorted(response.bundles):
        try:
            td = _trust_domain(key)
        except SpiffeIdError as exc:
            raise BundleError(f"FetchJWTBundles key {key[:80]!r}: {exc}") from None
        bundles.append(JwtBundle.from_jwks(td, response.bundles[key]))
    if not bundles:
        raise BundleError("FetchJWTBundles: no bundles in the message")
    return JwtBundleSet(bundles)


def _fetch_once(target: str, timeout: float) -> workload_pb2.JWTBundlesResponse:
    """Worker thread: the first message of a FetchJWTBundles stream."""
    channel = grpc.insecure_channel(target, options=(("grpc.enable_http_proxy", 0),))
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        call = stub.FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=(SECURITY_HEADER,), timeout=timeout
        )
        try:
            for message in call:
                return message  # type: ignore[no-any-return]
        finally:
            call.cancel()
        raise BundleError("FetchJWTBundles: the stream ended without a message")
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call):
            details = (exc.details() or "")[:_DETAILS_MAX]
            raise BundleError(f"FetchJWTBundles: {exc.code().name}: {details}") from None
        raise BundleError("FetchJWTBundles failed") from None
    finally:
        channel.close()


class JwtBundleWatcher:
    """The current JWT bundles from the Workload API (``target`` as
    :func:`proxy.sources.workload_api.parse_endpoint` returns it)."""

    def __init__(self, target: str, *, interval: float = 60.0, timeout: float = 10.0) -> None:
        self.target = target
        self.current = JwtBundleSet()
        self.failures = 0
        self._interval = interval
        self._timeout = timeout
        self._incident = False
        self._first = trio.Event()

    async def refresh(self) -> bool:
        """One fetch; keeps the last good set on failure."""
        try:
            response = await trio.to_thread.run_sync(
                _fetch_once, self.target, self._timeout, abandon_on_cancel=True
            )
            self.current = bundles_from_response(response)
        except Exception as exc:  # keep the last good bundles, whatever went wrong
            self.failures += 1
            if not self._incident:
                self._incident = True
                message = str(exc) if isinstance(exc, BundleError) else type(exc).__name__
                structlog.get_logger("agent_proxy").warning(
                    "JWT bundles not refreshed; keeping the current ones", error=message
                )
            return False
        finally:
            self._first.set()
        self._incident = False
        return True

    async def wait_first(self, timeout: float = math.inf) -> None:
        with trio.move_on_after(timeout):
            await self._first.wait()

    async def run(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self._interval)
