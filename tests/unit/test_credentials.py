"""The credential cache and its refresh (MockClock), header injection and
token responses (proxy/credentials)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.credentials import (
    Credential,
    CredentialFetchError,
    CredentialProvider,
    CredentialUnavailable,
    with_credential,
)
from proxy.credentials.fetchers import DevJwtSvidFetcher, FileFetcher
from proxy.credentials.provider import Token, refresh_at
from proxy.credentials.token_endpoint import parse_token_response, parse_token_url
from proxy.identity import SpiffeId
from proxy.identity.jwt_svid import JwtSigningKey

EPOCH = datetime(2026, 12, 1, tzinfo=UTC)
PAYROLL = SpiffeId.parse("spiffe://a.org/agent/payroll")
KEY = JwtSigningKey("k1", ec.generate_private_key(ec.SECP256R1()))


def trio_now() -> datetime:
    return EPOCH + timedelta(seconds=trio.current_time())


def cred(value: bytes = b"Bearer ours", header: bytes = b"authorization") -> Credential:
    return Credential(header=header, value=value, kind="oauth2-mtls", expiry=None, digest="d")


def test_with_credential_replaces_every_agent_copy() -> None:
    headers = [
        (b"host", b"bank.example"),
        (b"authorization", b"Bearer agent-1"),
        (b"accept", b"*/*"),
        (b"Authorization", b"Bearer agent-2"),
    ]
    out = with_credential(headers, cred())
    assert out == [
        (b"host", b"bank.example"),
        (b"accept", b"*/*"),
        (b"authorization", b"Bearer ours"),
    ]
    api = with_credential(headers, cred(b"k-1", b"x-api-key"))
    assert api[:-1] == headers and api[-1] == (b"x-api-key", b"k-1")


def test_credential_repr_and_audit_hold_no_secret() -> None:
    c = Credential(b"authorization", b"Bearer s3cr3t", "jwt-svid", EPOCH, "abcd")
    assert "s3cr3t" not in repr(c)
    assert "s3cr3t" not in json.dumps(c.audit_fields())
    assert c.audit_fields()["credential_exp"] == "2026-12-01T00:00:00Z"


@pytest.mark.parametrize(
    ("life", "after"),
    [
        (timedelta(hours=1), timedelta(minutes=48)),  # 80%
        (timedelta(minutes=10), timedelta(minutes=5)),  # 5 minutes before expiry
        (timedelta(minutes=5), timedelta(minutes=2, seconds=30)),  # never before half life
        (timedelta(seconds=1), timedelta(seconds=1)),
    ],
)
def test_refresh_at(life: timedelta, after: timedelta) -> None:
    assert refresh_at(Token("t", EPOCH + life, EPOCH)) == EPOCH + after
    assert refresh_at(Token("t", None, EPOCH)) is None


def dev_provider(ttl: timedelta, now: Callable[[], datetime] = trio_now) -> CredentialProvider:
    fetcher = DevJwtSvidFetcher(KEY, lambda: PAYROLL, "https://bank.example", ttl=ttl, now=now)
    return CredentialProvider("bank", fetcher, now=now)


async def test_fetched_once_for_many_requests_and_refreshed_before_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = dev_provider(timedelta(minutes=10))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.run)
        first = await provider.credential()
        for _ in range(100):
            assert await provider.credential() == first
        assert provider.fetches == 1
        await trio.sleep(5 * 60 - 1)  # just before the refresh point
        assert provider.fetches == 1
        assert (await provider.credential()).digest == first.digest
        await trio.sleep(2)
        assert provider.fetches == 2
        second = await provider.credential()
        assert second.digest != first.digest
        assert second.expiry is not None and first.expiry is not None
        assert second.expiry > first.expiry
        nursery.cancel_scope.cancel()


async def test_a_token_near_expiry_is_not_sent(autojump_clock: trio.testing.MockClock) -> None:
    # The refresh fails from the start; the first token is handed out only
    # while it is usable, then requests get credential_unavailable.
    calls = 0
    inner = DevJwtSvidFetcher(KEY, lambda: PAYROLL, "aud", ttl=timedelta(minutes=1), now=trio_now)

    class FailsAfterFirst:
        kind = "jwt-svid"

        async def fetch(self) -> Token:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise CredentialFetchError("token endpoint https://idp/token: HTTP 503")
            return await inner.fetch()

        def changed(self) -> bool:
            return False

    provider = CredentialProvider("bank", FailsAfterFirst(), now=trio_now)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.run)
        await provider.credential()
        await trio.sleep(49)  # expiry 60 s, usable until 50 s
        await provider.credential()
        await trio.sleep(2)
        with pytest.raises(CredentialUnavailable):
            await provider.credential()
        nursery.cancel_scope.cancel()
    assert provider.failures >= 1 and provider.unavailable == 1


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, path)  # a new inode, as secret managers write


def _value(provider: CredentialProvider) -> bytes | None:
    try:
        return provider.current().value
    except CredentialUnavailable:
        return None


async def _until(condition: Callable[[], bool], mock_seconds: float = 3600) -> None:
    with trio.fail_after(mock_seconds):
        while not condition():
            await trio.sleep(1)


async def test_file_secret_incident_is_logged_once_and_recovers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "api-key"
    provider = CredentialProvider(
        "legacy",
        FileFetcher(path, now=trio_now),
        header="x-api-key",
        value_format="{secret}",
        now=trio_now,
    )
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.run)
            with pytest.raises(CredentialUnavailable):
                await provider.credential()
            # The file is read on a worker thread, and the autojump clock
            # moves while it runs: wait for what the retries produce, not
            # for a fixed span of mock time.
            await _until(lambda: provider.failures >= 5)
            assert provider.failures >= 5
            write(path, "key-one\n")
            await _until(lambda: _value(provider) == b"key-one")  # within the longest backoff
            assert (await provider.credential()).value == b"key-one"
            write(path, "key-two-longer\n")
            await _until(lambda: _value(provider) == b"key-two-longer")
            assert (await provider.credential()).value == b"key-two-longer"
            nursery.cancel_scope.cancel()
    levels = [e["log_level"] for e in logs]
    assert levels.count("warning") == 1
    assert levels.count("info") == 1  # "credential fetched again"
    assert "key-one" not in repr(logs) and "key-one" not in repr(provider)


async def test_a_secret_that_would_split_the_header_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "api-key"
    write(path, "abc\r\nx-evil: 1\n")
    provider = CredentialProvider("legacy", FileFetcher(path, now=trio_now), now=trio_now)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.run)
            with pytest.raises(CredentialUnavailable):
                await provider.credential()
            nursery.cancel_scope.cancel()
    assert "x-evil" not in repr(logs)


URL = "https://idp.example/token"


def response(status: int, body: Any) -> Token:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_token_response(URL, status, raw, EPOCH)


def test_token_response_ok() -> None:
    token = response(200, {"access_token": "at-1", "token_type": "bearer", "expires_in": 600})
    assert token.expiry == EPOCH + timedelta(seconds=600) and token.secret == "at-1"
    legacy = response(200, {"access_token": "at-1", "token_type": "Bearer", "expires_in": "3600"})
    assert legacy.expiry == EPOCH + timedelta(hours=1)
    default = response(200, {"access_token": "at-1", "token_type": "Bearer"})
    assert default.expiry == EPOCH + timedelta(seconds=300)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            {"error": "invalid_client", "error_description": "secret xyz"},
            "HTTP 400 (invalid_client)",
        ),
        (500, b"<html>secret xyz</html>", "HTTP 500"),
        (200, b"secret xyz", "not JSON"),
        (200, [1], "not a JSON object"),
        (200, {"token_type": "Bearer"}, "no access_token"),
        (200, {"access_token": "secret xyz", "token_type": "mac"}, "token_type must be Bearer"),
        (
            200,
            {"access_token": "secret xyz", "token_type": "Bearer", "expires_in": -1},
            "expires_in",
        ),
        (
            200,
            {"access_token": "secret xyz", "token_type": "Bearer", "expires_in": True},
            "expires_in",
        ),
    ],
)
def test_token_response_errors_never_echo_the_body(status: int, body: Any, message: str) -> None:
    with pytest.raises(CredentialFetchError) as info:
        response(status, body)
    assert message in str(info.value)
    assert "secret xyz" not in str(info.value)


def test_token_url() -> None:
    url = parse_token_url("https://idp.example:8443/oauth2/token?tenant=a")
    assert (url.host, url.port, url.target) == ("idp.example", 8443, "/oauth2/token?tenant=a")
    for bad in (
        "http://idp/token",
        "https://user:pw@idp/token",
        "https:///token",
        "https://idp/t#f",
    ):
        with pytest.raises(ValueError):
            parse_token_url(bad)


async def test_current_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    provider = dev_provider(timedelta(minutes=10))
    with pytest.raises(CredentialUnavailable, match="not fetched yet"):
        provider.current()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.run)
        first = await provider.credential()
        assert provider.current() == first
        nursery.cancel_scope.cancel()
    assert provider.unavailable == 1


async def test_metrics_count_and_hold_no_secret(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from proxy.credentials.metrics import CredentialCollector

    good = dev_provider(timedelta(minutes=10))
    path = tmp_path / "key"
    broken = CredentialProvider("legacy", FileFetcher(path, now=trio_now), now=trio_now)
    registry = CollectorRegistry()
    registry.register(CredentialCollector(lambda: [good, broken]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(good.run)
        nursery.start_soon(broken.run)
        held = await good.credential()
        with pytest.raises(CredentialUnavailable):
            await broken.credential()
        await trio.sleep(60)
        text = generate_latest(registry).decode()
        nursery.cancel_scope.cancel()
    assert 'agent_proxy_credential_fetches_total{route="bank",type="jwt-svid"} 1.0' in text
    assert 'agent_proxy_credential_unavailable_total{route="legacy",type="file"} 1.0' in text
    failures = [
        line
        for line in text.splitlines()
        if line.startswith('agent_proxy_credential_fetch_failures_total{route="legacy"')
    ]
    assert failures and float(failures[0].split()[-1]) >= 3
    assert 'agent_proxy_credential_expiry_seconds{route="bank",type="jwt-svid"} 540.0' in text
    token = held.value.decode().removeprefix("Bearer ")
    assert token not in text and held.digest not in text


async def test_world_readable_secret_file_is_warned_once(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("k-1")
    path.chmod(0o644)
    fetcher = FileFetcher(path)
    with structlog.testing.capture_logs() as logs:
        await fetcher.fetch()
        await fetcher.fetch()
    assert [e["event"] for e in logs] == [
        "secret file is world-readable; the agent may be able to read it"
    ]
    path.chmod(0o600)
    with structlog.testing.capture_logs() as logs:
        assert (await FileFetcher(path).fetch()).secret == "k-1"
    assert logs == []
