"""A2A push notification URLs (pure): which URLs a request asks the agent
to call back, and whether a route's allowlist permits them. An agent that
can be told to POST task updates anywhere is a request-forgery primitive,
so every URL must match an allowlist entry (scheme, host with an optional
``*.`` wildcard label, port, and path prefix)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from proxy.agent.a2a import CREATE_PUSH_CONFIG, TASK_CREATING, normalize_method


def push_urls_in_request(method: str, params: Any) -> list[str]:
    """Every push-notification URL a request asks the server to call.

    Create/Set: anywhere in ``params`` (v0.3 ``pushNotificationConfig.url``,
    v1.0 ``url``, and draft shapes with a nested ``config``). SendMessage /
    SendStreamingMessage: anywhere in ``params.configuration`` (v0.3
    ``pushNotificationConfig``, v1.0 ``taskPushNotificationConfig``); message
    parts are content, not callbacks, and are not looked at. A ``url`` member
    that is not a string comes back as "" (which no allowlist admits).
    """
    normalized = normalize_method(method)
    if normalized is None or not isinstance(params, dict):
        return []
    canonical = normalized[0]
    if canonical == CREATE_PUSH_CONFIG:
        scope: Any = params
    elif canonical in TASK_CREATING:
        scope = params.get("configuration")
    else:
        return []
    urls: list[str] = []
    stack = [scope]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "url":
                    urls.append(value if isinstance(value, str) else "")
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return urls


_DEFAULT_PORTS: Final = {"https": 443, "http": 80}


def _split(url: str) -> tuple[SplitResult, str, int] | None:
    """(parts, host, port) of an absolute http(s) URL we are willing to judge."""
    if not url or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return None
    if not url.isascii() or "\\" in url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    lowered = parts.path.lower()
    if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered:
        return None
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        return None
    return parts, parts.hostname.lower().rstrip("."), port or _DEFAULT_PORTS[scheme]


_WILDCARD_LABEL: Final = "x--wildcard--x"  # stands in for "*." while parsing an entry


@dataclass(frozen=True, slots=True)
class _Entry:
    scheme: str
    host: str  # exact, or "*.domain"
    port: int
    path: tuple[re.Pattern[str], ...]  # one per prefix segment


def _segment_pattern(segment: str) -> re.Pattern[str]:
    # "*" matches within one segment, never across "/"; nothing else is special.
    return re.compile("[^/]*".join(re.escape(part) for part in segment.split("*")))


def _parse_entry(entry: str) -> _Entry | None:
    """An allowlist entry, or None if malformed."""
    probe = entry
    if entry.startswith(("https://*.", "http://*.")):
        probe = entry.replace("*.", _WILDCARD_LABEL + ".", 1)
    parsed = _split(probe)
    if parsed is None or parsed[0].query or parsed[0].fragment or "*" in parsed[0].netloc:
        return None
    parts, host, port = parsed
    if host.startswith(_WILDCARD_LABEL + "."):
        host = "*" + host[len(_WILDCARD_LABEL) :]
    if _WILDCARD_LABEL in host:
        return None
    segments = parts.path.rstrip("/").split("/")[1:]
    return _Entry(parts.scheme.lower(), host, port, tuple(map(_segment_pattern, segments)))


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def push_url_allowed(url: str, allowlist: Sequence[str]) -> bool:
    """Is ``url`` admitted by an entry of ``allowlist``?

    An entry is ``scheme://host[:port][/path-prefix]``. Scheme, host and port
    (default ports filled in) must be equal, so http is admitted only by an
    http entry. Globs: the host may start with ``*.`` (any subdomain, not the
    domain itself), and ``*`` in a path segment matches within that segment.
    The path prefix matches whole segments (``/hooks`` admits ``/hooks`` and
    ``/hooks/x``, not ``/hooksmith``). URLs with userinfo, whitespace,
    non-ASCII, backslashes, dot segments or encoded slashes and dots are
    refused outright; malformed entries match nothing.
    """
    target = _split(url)
    if target is None:
        return False
    parts, host, port = target
    scheme = parts.scheme.lower()
    segments = parts.path.split("/")[1:]
    for entry in allowlist:
        allowed = _parse_entry(entry)
        if allowed is None or allowed.scheme != scheme or allowed.port != port:
            continue
        if not _host_matches(allowed.host, host) or len(segments) < len(allowed.path):
            continue
        if all(p.fullmatch(seg) for p, seg in zip(allowed.path, segments, strict=False)):
            return True
    return False


def validate_push_allowlist_entry(entry: str) -> None:
    """Raise ValueError if ``entry`` is malformed and so could never match."""
    if _parse_entry(entry) is None:
        raise ValueError(
            f"push URL allowlist entry {entry!r}: want http(s)://host[:port][/path], '*' only "
            "as a leading '*.' host label or inside path segments, no userinfo, query or fragment"
        )
