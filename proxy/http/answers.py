"""Answers we write ourselves (pure): status lines, error bodies."""

from __future__ import annotations

import json
from http import HTTPStatus

from proxy.http.exchange import RequestOutcome
from proxy.http.headers import REQUEST_ID, Header
from proxy.http.wire import Answer

CONTINUE = Answer(100, b"Continue", [])


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (RFC 9110 15), for status
    lines we write: clients and logs read ``HTTP/1.1 403 Forbidden`` better
    than ``HTTP/1.1 403 ``."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_answer(
    outcome: RequestOutcome, status: int, message: str, *, close: bool, extra: tuple[Header, ...]
) -> tuple[Answer, bytes]:
    """Our JSON error answer: its head and body."""
    body = json.dumps(
        {"error": message, "reason": outcome.reason, "request_id": outcome.request_id},
        separators=(",", ":"),
    ).encode()
    headers: list[Header] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REQUEST_ID, outcome.request_id.encode()),
        *extra,
    ]
    if close:
        headers.append((b"connection", b"close"))
    return Answer(status, reason_phrase(status), headers), body


def json_answer(outcome: RequestOutcome, status: int, body: bytes) -> Answer:
    """The head of an answer in an agent protocol's own terms (a JSON-RPC error)."""
    headers: list[Header] = [(REQUEST_ID, outcome.request_id.encode()), *outcome.reply_headers]
    if body:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    else:
        headers.append((b"content-length", b"0"))
    return Answer(status, reason_phrase(status), headers)


def path_only(target: bytes) -> str:
    """The path of a raw target, for the audit record of a request we could
    not route (never the query: queries carry secrets)."""
    text = target.decode("ascii", "replace")
    if "://" in text:
        text = "/" + text.split("://", 1)[1].partition("/")[2]
    return text.split("?", 1)[0]
