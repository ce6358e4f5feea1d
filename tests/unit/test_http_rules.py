"""Header rules, head scanning and path normalisation (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from proxy.http.answers import reason_phrase
from proxy.http.framing import HeadError, HeadScanner
from proxy.http.headers import fold, forwardable, trailer_fields
from proxy.policy.evaluate import PolicySet
from proxy.policy.paths import BadPath, PathPattern, normalize_path
from proxy.policy.rules import GuardRule, RequestFacts

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_fold_matches_names_as_a_cgi_backend_does() -> None:
    assert fold(b"X_Spiffe_Id") == fold(b"x-spiffe-id") == b"x-spiffe-id"


def test_forwardable_drops_underscore_spellings_of_what_we_act_on() -> None:
    headers = [
        (b"x_forwarded_client_cert", b"forged"),
        (b"transfer_encoding", b"chunked"),
        (b"content_length", b"5"),
        (b"x_other", b"kept"),
    ]
    kept = forwardable(headers, strip=frozenset({b"x-forwarded-client-cert"}))
    assert kept == [(b"x_other", b"kept")]


def test_trailers_lose_framing_routing_and_identity_fields() -> None:
    trailers = [
        (b"content-length", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"host", b"elsewhere"),
        (b"x-forwarded-client-cert", b"forged"),
        (b"x_caller_id", b"forged"),
        (b"authorization", b"Bearer x"),
        (b"x-checksum", b"abc"),
    ]
    assert trailer_fields(trailers, strip=frozenset({b"x-caller-id"})) == [(b"x-checksum", b"abc")]


def test_head_scanner_work_is_linear_one_byte_at_a_time() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 32_000 + b"\r\n\r\nbody"
    scanner = HeadScanner(65536)
    end = None
    for i in range(len(head)):
        end = scanner.feed(head[i : i + 1])
        if end is not None:
            break
    assert end == len(head) - 4
    assert scanner.head == head[:-4]
    # Each byte looked at a bounded number of times (rescanning is quadratic).
    assert scanner.scanned <= 4 * len(head)


def test_head_scanner_finds_a_crlfcrlf_split_across_pieces() -> None:
    scanner = HeadScanner(1024)
    assert scanner.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r") is None
    assert scanner.feed(b"\nrest") == 27


@pytest.mark.parametrize(
    ("pieces", "status"),
    [
        ([b"GET / HTTP/1.1\nHost: x"], 400),
        ([b"GET / HTTP/1.1\r", b"\n", b"\n"], 400),
        ([b"GET / HTTP/1.1\r\nX: " + b"a" * 2000], 431),
    ],
    ids=["bare-lf", "bare-lf-split", "too-large"],
)
def test_head_scanner_refuses(pieces: list[bytes], status: int) -> None:
    scanner = HeadScanner(1024)
    with pytest.raises(HeadError) as caught:
        for piece in pieces:
            scanner.feed(piece)
    assert caught.value.status == status


@pytest.mark.parametrize(
    "target",
    ["/a#frag", "/a/..;/admin", "/a/.;x", "/a/%2e%2e;x/b"],
)
def test_paths_that_could_mean_something_else_are_refused(target: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(target)


def test_plain_path_parameters_are_kept() -> None:
    assert normalize_path("/a;v=1/b") == "/a;v=1/b"


def _facts(method: str) -> RequestFacts:
    return RequestFacts(peer=None, method=method, path="/r", now=NOW)


def test_a_get_rule_allows_head_unless_a_rule_denies_it() -> None:
    get = GuardRule("reads", methods=frozenset({"GET"}), paths=(PathPattern.parse("/r"),))
    assert PolicySet([get]).evaluate(_facts("HEAD")).allowed
    assert not PolicySet([get]).evaluate(_facts("POST")).allowed
    no_head = GuardRule("no-head", methods=frozenset({"HEAD"}), action="deny")
    denied = PolicySet([get, no_head]).evaluate(_facts("HEAD"))
    assert not denied.allowed and denied.rule == "no-head"
    post = GuardRule("posts", methods=frozenset({"POST"}))
    assert not PolicySet([post]).evaluate(_facts("HEAD")).allowed


def test_reason_phrases() -> None:
    assert reason_phrase(403) == b"Forbidden"
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(599) == b""
