"""One route's credential: fetched in the background, handed out from a cache.

Theory of operation: a :class:`CredentialProvider` owns one
:class:`Fetcher` (a token endpoint, the Workload API, the dev CA, a file)
and one background task, :meth:`CredentialProvider.run`, started by the
runtime in its nursery. The task fetches, keeps the token, sleeps until the
token's refresh point (:func:`refresh_at`, well before expiry) and fetches
again; so while a valid token is in hand no request ever waits on a token
endpoint. A request calls :meth:`CredentialProvider.credential`: the cached
token if it is still usable, else it waits for the first fetch if that is
still in flight (start-up), else it fails at once with
:class:`CredentialUnavailable` (a 503 ``credential_unavailable``): a request
never goes out without its credential, and none hangs through an outage.

Failures: the task survives any exception, keeps the last good token while
it is usable, counts every failure, retries with exponential backoff and
jitter, and logs once per incident (the first failure, then one line when
it recovers), never the token. A static secret (a file) has no expiry; the
task watches the file and re-reads it when it changes.

Time: sleeps are on trio's clock (``MockClock`` in tests); token expiry is
wall time from ``now`` (a test ties it to trio's clock).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog
import trio

from proxy.identity.jwt_svid import token_digest

__all__ = [
    "REASON",
    "Credential",
    "CredentialFetchError",
    "CredentialProvider",
    "CredentialUnavailable",
    "Fetcher",
    "Token",
    "refresh_at",
]

REASON = "credential_unavailable"
Clock = Callable[[], datetime]

# A token this close to its expiry is not sent any more: the upstream's
# clock may run ahead of ours, and the request takes time to arrive.
USABLE_MARGIN = timedelta(seconds=10)
# Refresh at 80% of a token's life, and at least this long before expiry.
REFRESH_FRACTION = 0.8
REFRESH_LEAD = timedelta(minutes=5)
MIN_REFRESH = timedelta(seconds=1)
_FIELD_SAFE = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII, as tokens are
STATIC_POLL = 2.0  # seconds between checks of a static secret's file


def _log() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("agent_proxy")
    return logger


def utc_now() -> datetime:
    return datetime.now(UTC)


class CredentialFetchError(Exception):
    """A fetch failed. The message is safe to log: it names the endpoint and
    what went wrong, never a token, an assertion or a secret."""


class CredentialUnavailable(Exception):
    """The request cannot get its credential: answer 503 ``credential_unavailable``."""

    reason = REASON
    status = 503


@dataclass(frozen=True, slots=True)
class Token:
    """What a fetcher returns. ``secret`` is the bare token or secret."""

    secret: str = field(repr=False)
    expiry: datetime | None  # None: static, no expiry
    issued: datetime

    @property
    def digest(self) -> str:
        return token_digest(self.secret)


class Fetcher(Protocol):
    """Where one route's credential comes from."""

    kind: str  # the credential type: "jwt-svid", "oauth2-mtls", ...

    async def fetch(self) -> Token:
        """A fresh token, or CredentialFetchError."""
        ...

    def changed(self) -> bool:
        """Static credentials: has the source changed since the last fetch?
        Token fetchers answer False (their refresh is driven by expiry)."""
        ...


@dataclass(frozen=True, slots=True)
class Credential:
    """A header to set on an upstream request, and what the audit may say of it."""

    header: bytes  # lowercase field name
    value: bytes = field(repr=False)
    kind: str
    expiry: datetime | None
    digest: str

    @property
    def static(self) -> bool:
        return self.expiry is None

    def audit_fields(self) -> dict[str, str | bool]:
        fields: dict[str, str | bool] = {
            "credential_type": self.kind,
            "credential_static": self.static,
            "credential_digest": self.digest,
        }
        if self.expiry is not None:
            fields["credential_exp"] = self.expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
        return fields


def refresh_at(token: Token) -> datetime | None:
    """When to fetch the next token: at 80% of its life or REFRESH_LEAD
    before expiry, whichever is earlier, but never before half its life
    (a short token must not make us hammer the endpoint), and at least
    MIN_REFRESH after it was issued. None for a static secret."""
    if token.expiry is None:
        return None
    life = token.expiry - token.issued
    after = max(min(life * REFRESH_FRACTION, life - REFRESH_LEAD), life / 2, MIN_REFRESH)
    return token.issued + after


class CredentialProvider:
    """The credential of one route; see the module doc."""

    def __init__(
        self,
        route: str,
        fetcher: Fetcher,
        *,
        header: str = "authorization",
        value_format: str = "Bearer {secret}",
        now: Clock = utc_now,
        first_fetch_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        if "{secret}" not in value_format:
            raise ValueError("value_format must contain {secret}")
        self.route = route
        self.kind = fetcher.kind
        self._fetcher = fetcher
        self._header = header.lower().encode("ascii")
        self._format = value_format
        self._now = now
        self._first_fetch_timeout = first_fetch_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._token: Token | None = None
        self._credential: Credential | None = None
        self._first = trio.Event()  # set after the first attempt, success or not
        self._incident = False
        self._jitter = secrets.SystemRandom()
        self.fetches = 0
        """Successful fetches so far."""
        self.failures = 0
        """Failed fetches so far (the metric the runtime exports)."""
        self.unavailable = 0
        """Requests refused with credential_unavailable."""

    def __repr__(self) -> str:
        held = self._credential.digest if self._credential else None
        return (
            f"CredentialProvider(route={self.route!r}, kind={self.kind!r}, "
            f"digest={held!r}, fetches={self.fetches}, failures={self.failures})"
        )

    # -- the request path --------------------------------------------------

    def _usable(self) -> Credential | None:
        cred = self._credential
        if cred is None:
            return None
        if cred.expiry is not None and self._now() >= cred.expiry - USABLE_MARGIN:
            return None
        return cred

    def current(self) -> Credential:
        """The credential to send now, without waiting; CredentialUnavailable
        if none is usable (for synchronous routers)."""
        cred = self._usable()
        if cred is None:
            self.unavailable += 1
            state = "not fetched yet" if not self._first.is_set() else "its source is failing"
            raise CredentialUnavailable(
                f"route {self.route}: no valid {self.kind} credential ({state})"
            )
        return cred

    async def credential(self) -> Credential:
        """The credential to send now; while the very first fetch is still in
        flight, wait for it (up to first_fetch_timeout). CredentialUnavailable
        otherwise."""
        if self._usable() is None and not self._first.is_set():
            with trio.move_on_after(self._first_fetch_timeout):
                await self._first.wait()
        return self.current()

    def seconds_left(self) -> float | None:
        """Seconds until the held credential expires; None if static or none."""
        cred = self._credential
        if cred is None or cred.expiry is None:
            return None
        return (cred.expiry - self._now()).total_seconds()

    # -- the background task -------------------------------------------------

    def _take(self, token: Token) -> None:
        # A secret that would end the header line would let whoever controls
        # the token source (or the file) add headers of their own.
        if not _FIELD_SAFE.match(token.secret):
            raise CredentialFetchError(
                f"route {self.route}: the {self.kind} credential has characters "
                "a header value cannot carry"
            )
        value = self._format.replace("{secret}", token.secret)
        self._token = token
        self._credential = Credential(
            header=self._header,
            value=value.encode("latin-1"),
            kind=self.kind,
            expiry=token.expiry,
            digest=token.digest,
        )

    async def _attempt(self) -> bool:
        try:
            token = await self._fetcher.fetch()
            self._take(token)
        except Exception as exc:  # a background task survives anything
            self.failures += 1
            message = str(exc) if isinstance(exc, CredentialFetchError) else type(exc).__name__
            if not self._incident:
                self._incident = True
                _log().warning(
                    "credential fetch failed; retrying with backoff",
                    route=self.route,
                    credential_type=self.kind,
                    error=message,
                    still_valid=self._usable() is not None,
                )
            return False
        finally:
            self._first.set()
        self.fetches += 1
        if self._incident:
            self._incident = False
            _log().info("credential fetched again", route=self.route, credential_type=self.kind)
        return True

    def _seconds_until(self, moment: datetime) -> float:
        return max(0.0, (moment - self._now()).total_seconds())

    async def run(self) -> None:
        """Fetch, cache, refresh before expiry; forever (cancel to stop)."""
        delay = self._backoff_initial
        while True:
            if not await self._attempt():
                await trio.sleep(delay * self._jitter.uniform(0.8, 1.2))
                delay = min(delay * 2, self._backoff_max)
                continue
            delay = self._backoff_initial
            token = self._token
            assert token is not None
            when = refresh_at(token)
            if when is not None:
                await trio.sleep(self._seconds_until(when))
                continue
            # We poll, as the files source does: inotify is neither portable
            # nor reliable across the atomic renames secret managers do.
            while not self._fetcher.changed():  # noqa: ASYNC110
                await trio.sleep(STATIC_POLL)
