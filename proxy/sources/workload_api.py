"""The SPIFFE Workload API source: our identity streamed by SPIRE's agent.

Theory of operation: we open the ``FetchX509SVID`` server stream with the
``workload.spiffe.io: true`` metadata the Workload Endpoint standard
requires, and every message on it is the *full* current state: our SVIDs
(we take the first, the default identity), the bundle of our trust domain
and the bundles of federated trust domains. So each message is validated
on its own into an :class:`IdentitySnapshot`; a malformed one is discarded
(logged, counted) and the stream goes on, because the next message replaces
it entirely. A valid message that changes nothing is not swapped in.

Errors, as the Workload Endpoint standard's table says: ``InvalidArgument``
(we sent a bad request, the security header) and ``Unimplemented`` are not
retried; everything else, ``Unavailable`` and ``PermissionDenied`` (the
agent has no identity for us yet) above all, and a stream the server simply
ends, is retried with exponential backoff and jitter, reset by the next
valid message. Each attempt uses a fresh gRPC channel, so the reconnect
timing is ours rather than the channel's own (longer) backoff.

A stream that has not delivered its first message (or a status) within
``stream_start_timeout`` is abandoned and retried like ``Unavailable``: an
agent answers at once, with the current state or ``PermissionDenied``, and
grpcio can leave a call that starts just as the server goes away waiting
forever, even after ``call.cancel()`` (seen with grpcio 1.85; closing the
channel does end it). Once the first message is in, silence is normal:
the next one comes with the next rotation.

Bridging gRPC to trio: grpcio's aio API runs on asyncio, so we use its
synchronous streaming API on a worker thread instead. ``_stream_once``
starts the call (non-blocking) from trio, then a ``trio.to_thread`` worker
iterates it (blocking in gRPC's C core, GIL released) and hands each
message to trio with ``trio.from_thread.run_sync(send.send_nowait, ...)``
on an unbounded memory channel (messages are rare: one per rotation); the
trio task consumes the channel. When the attempt ends for any reason (the
call ended, the handler has what it wanted, the start deadline passed, or
the trio task was cancelled) its ``finally`` cancels the call and closes
the channel, which makes the worker's iteration end at once, and the
worker is abandoned rather than awaited (``abandon_on_cancel=True``), so a
misbehaving gRPC call can never hold up trio: a cancelled ``run()``
returns promptly and the worker exits on its own moments later (a late
message finds the memory channel closed and is dropped).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import grpc
import trio

from proxy.identity import IdentityLoadError, IdentitySnapshot, IdentityState, describe_snapshot
from proxy.sources.base import (
    Clock,
    ExpiryWarner,
    Pulse,
    SourceStats,
    log,
    swap_in,
    utc_now,
    watch_expiry,
)
from proxy.sources.proto import workload_pb2, workload_pb2_grpc
from proxy.sources.workload_messages import (
    ENDPOINT_ENV,
    SECURITY_HEADER,
    parse_endpoint,
    snapshot_from_response,
)

__all__ = [
    "ENDPOINT_ENV",
    "SECURITY_HEADER",
    "WorkloadApiSource",
    "parse_endpoint",
    "snapshot_from_response",
]

# Workload Endpoint, appendix A: report, do not retry.
_PERMANENT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})

_CHANNEL_OPTIONS = (
    # The endpoint is local by definition; never send it through an HTTP
    # proxy picked up from http_proxy/https_proxy in the environment.
    ("grpc.enable_http_proxy", 0),
    # A connection of our own per channel, not one from grpc's process-wide
    # pool: a fresh channel per attempt then really means a fresh connection.
    ("grpc.use_local_subchannel_pool", 1),
)

_DETAILS_MAX = 200  # server-supplied text in our logs stays short

# Stream workers at once, counting abandoned ones still winding down.
_MAX_STREAM_THREADS = 4


# -- the gRPC stream, bridged to trio ------------------------------------------------


class _StreamCall(Protocol):
    """What we use of grpc's server-streaming call object."""

    def __iter__(self) -> Iterator[workload_pb2.X509SVIDResponse]: ...

    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class _StreamEnd:
    code: grpc.StatusCode
    details: str

    def describe(self) -> str:
        details = self.details[:_DETAILS_MAX]
        return f"{self.code.name}: {details}" if details else self.code.name


def _pump(
    call: _StreamCall,
    send: trio.MemorySendChannel[workload_pb2.X509SVIDResponse],
) -> _StreamEnd:
    """Worker thread: iterate the stream, hand each message to trio."""
    try:
        for response in call:
            try:
                trio.from_thread.run_sync(send.send_nowait, response)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                call.cancel()  # nobody is listening any more
                return _StreamEnd(grpc.StatusCode.CANCELLED, "consumer gone")
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call):
            return _StreamEnd(exc.code(), exc.details() or "")
        return _StreamEnd(grpc.StatusCode.UNKNOWN, type(exc).__name__)
    return _StreamEnd(grpc.StatusCode.OK, "the server ended the stream")


class _Permanent(Exception):
    """The endpoint said not to retry (InvalidArgument, Unimplemented)."""


class WorkloadApiSource:
    """Follows the FetchX509SVID stream of a SPIFFE Workload API endpoint."""

    name = "workload-api"

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        first_fetch_timeout: float = 30.0,
        stream_start_timeout: float = 10.0,
        clock: Clock = utc_now,
        expiry_check_interval: float = 30.0,
    ) -> None:
        text = endpoint if endpoint is not None else os.environ.get(ENDPOINT_ENV, "")
        if not text:
            raise IdentityLoadError(
                f"no Workload API endpoint: configure one or set {ENDPOINT_ENV}"
            )
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if not (first_fetch_timeout > 0 and stream_start_timeout > 0):
            raise ValueError("first_fetch_timeout and stream_start_timeout must be positive")
        self.endpoint = text
        self.target = parse_endpoint(text)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._first_fetch_timeout = first_fetch_timeout
        self._stream_start_timeout = stream_start_timeout
        self._clock = clock
        self._expiry_check_interval = expiry_check_interval
        self.stats = SourceStats()
        self.pulse = Pulse()
        """Fires after every message handled and every stream that ended."""
        self.connects = 0
        """Stream attempts so far."""
        self.gave_up: str | None = None
        """Set while run() has stopped retrying after a permanent error."""
        self._expiry = ExpiryWarner(self.name)
        self._wake = trio.Event()
        self._attempt: trio.CancelScope | None = None
        self._jitter = secrets.SystemRandom()
        # Our stream workers use their own thread tokens, so one that gRPC
        # keeps busy after we abandoned it never delays another component's
        # trio.to_thread work (name resolution, for one).
        self._threads: trio.CapacityLimiter | None = None

    def request_reload(self) -> None:
        """Re-fetch: drop the current stream and reconnect now. After a
        permanent error this is the one way to try again."""
        if self._attempt is not None:
            self._attempt.cancel()
        self._wake.set()

    async def initial(self) -> IdentitySnapshot:
        first: list[IdentitySnapshot] = []

        def take(snapshot: IdentitySnapshot) -> bool:
            first.append(snapshot)
            return False

        with trio.move_on_after(self._first_fetch_timeout):
            try:
                await self._follow(take)
            except _Permanent as exc:
                raise IdentityLoadError(str(exc)) from None
        if not first:
            last = f" (last error: {self.stats.last_error})" if self.stats.last_error else ""
            raise IdentityLoadError(
                f"Workload API at {self.endpoint}: no valid X509-SVID within "
                f"{self._first_fetch_timeout:g}s{last}"
            )
        snapshot = first[0]
        self.stats.record_success(self._clock(), swapped=False)
        log.info(
            "identity loaded",
            source=self.name,
            endpoint=self.endpoint,
            **describe_snapshot(snapshot),
        )
        return snapshot

    async def run(self, state: IdentityState) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    watch_expiry,
                    state,
                    self._expiry,
                    self._clock,
                    interval=self._expiry_check_interval,
                )
            )
            while True:
                try:
                    await self._follow(partial(self._apply, state))
                except _Permanent as exc:
                    self.gave_up = str(exc)
                    log.error(
                        "Workload API refused our request; not retrying "
                        "(SIGHUP tries again); keeping the current identity",
                        source=self.name,
                        error=str(exc),
                    )
                    self.pulse.fire()
                    await self._wait_for_reload(math.inf)
                    self.gave_up = None

    # -- internals ---------------------------------------------------------------

    def _apply(self, state: IdentityState, snapshot: IdentitySnapshot) -> bool:
        try:
            swapped = swap_in(state, snapshot, source=self.name)
        except IdentityLoadError as exc:
            self._discarded(str(exc))
            return True
        except Exception as exc:  # a subscriber's bug must not end the stream
            self._discarded(f"Workload API: unexpected {type(exc).__name__} while swapping")
            return True
        self.stats.record_success(self._clock(), swapped=swapped)
        if not swapped:
            log.debug("Workload API message; identity unchanged", source=self.name)
        return True

    def _discarded(self, error: str) -> None:
        self.stats.record_failure(error)
        log.error(
            "Workload API message discarded; keeping the current identity",
            source=self.name,
            error=error,
        )

    async def _wait_for_reload(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if request_reload woke us."""
        with trio.move_on_after(seconds):
            await self._wake.wait()
        woken = self._wake.is_set()
        if woken:
            self._wake = trio.Event()
        return woken

    async def _follow(self, on_snapshot: Callable[[IdentitySnapshot], bool]) -> None:
        """Stream and reconnect until ``on_snapshot`` returns False.

        Raises _Permanent on InvalidArgument or Unimplemented.
        """
        delay = self._backoff_initial
        while True:
            valid = 0

            def handle(response: workload_pb2.X509SVIDResponse) -> bool:
                nonlocal valid
                try:
                    snapshot = snapshot_from_response(response, self._clock())
                except IdentityLoadError as exc:
                    self._discarded(str(exc))
                    self.pulse.fire()
                    return True
                valid += 1
                keep_going = on_snapshot(snapshot)
                self.pulse.fire()
                return keep_going

            self.connects += 1
            if self._wake.is_set():
                self._wake = trio.Event()
            with trio.CancelScope() as attempt:
                self._attempt = attempt
                try:
                    end = await self._stream_once(handle)
                finally:
                    self._attempt = None
            if attempt.cancelled_caught:
                log.info("Workload API: reconnecting on request", source=self.name)
                delay = self._backoff_initial
                continue
            if end is None:
                return
            if valid:
                delay = self._backoff_initial
            message = f"Workload API at {self.endpoint}: {end.describe()}"
            if end.code in _PERMANENT:
                self.stats.record_failure(message)
                raise _Permanent(message)
            sleep = delay * self._jitter.uniform(0.8, 1.2)
            if end.code == grpc.StatusCode.OK:
                log.info("Workload API stream ended; reconnecting", source=self.name)
            else:
                self.stats.record_failure(message)
                log.warning(
                    "Workload API stream failed; retrying",
                    source=self.name,
                    error=message,
                    retry_in=round(sleep, 3),
                )
            self.pulse.fire()
            if await self._wait_for_reload(sleep):
                delay = self._backoff_initial
            else:
                delay = min(delay * 2, self._backoff_max)

    async def _stream_once(
        self, handle: Callable[[workload_pb2.X509SVIDResponse], bool]
    ) -> _StreamEnd | None:
        """One FetchX509SVID call; None if ``handle`` asked to stop."""
        if self._threads is None:
            self._threads = trio.CapacityLimiter(_MAX_STREAM_THREADS)
        threads = self._threads
        channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        try:
            # The generated service module is unannotated (see the proto README).
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
            call: _StreamCall = stub.FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=(SECURITY_HEADER,)
            )
            send, receive = trio.open_memory_channel[workload_pb2.X509SVIDResponse](math.inf)
            ends: list[_StreamEnd] = []

            async def pump() -> None:
                with send:
                    ends.append(
                        await trio.to_thread.run_sync(
                            _pump,
                            call,
                            send,
                            thread_name="workload-api stream",
                            abandon_on_cancel=True,
                            limiter=threads,
                        )
                    )

            stopped = silent = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                try:
                    async with receive:
                        wait = self._stream_start_timeout
                        while True:
                            response: workload_pb2.X509SVIDResponse | None = None
                            with trio.move_on_after(wait):
                                try:
                                    response = await receive.receive()
                                except trio.EndOfChannel:
                                    break  # the call ended; ``ends`` holds how
                            if response is None:
                                silent = True
                                break
                            wait = math.inf  # after the first message, silence is normal
                            if not handle(response):
                                stopped = True
                                break
                finally:
                    # See the module doc: cancel, close, and never wait on gRPC.
                    call.cancel()
                    channel.close()
                    nursery.cancel_scope.cancel()
            if stopped:
                return None
            if silent or not ends:
                return _StreamEnd(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no response within {self._stream_start_timeout:g}s",
                )
            return ends[0]
        finally:
            channel.close()
