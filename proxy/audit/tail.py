"""``audit tail``: filter records and render them for a person (pure).

A row is one line: time, event, decision, listener, who (peer), what
(method and path, tool or A2A method), status, reason and rule. Colour only
when the caller says the output is a terminal: green allow, red deny,
yellow for the trail's own records (checkpoints, gaps).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
_GREEN, _RED, _YELLOW, _CYAN = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[36m"

_EVENT_SHORT = {
    "connection.open": "open",
    "connection.close": "close",
    "connection.refused": "refused",
    "http.request": "http",
    "mcp.call": "call",
    "audit.checkpoint": "checkpoint",
    "audit.gap": "gap",
}


@dataclass(frozen=True)
class Filter:
    peer: str | None = None  # glob over peer_id
    decision: str | None = None
    event: str | None = None  # glob over event
    since: _dt.datetime | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.event is not None and not fnmatch.fnmatchcase(
            str(record.get("event", "")), self.event
        ):
            return False
        if self.peer is not None:
            peer = record.get("peer_id")
            if not isinstance(peer, str) or not fnmatch.fnmatchcase(peer, self.peer):
                return False
        if self.since is not None:
            ts = parse_ts(record.get("ts"))
            if ts is None or ts < self.since:
                return False
        return True


def parse_ts(value: object) -> _dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _short_id(value: object) -> str:
    text = str(value) if value else "-"
    return text.removeprefix("spiffe://")


def _what(record: Mapping[str, Any]) -> str:
    event = record.get("event")
    if event == "http.request":
        return f"{record.get('method', '')} {record.get('path', '')}".strip()
    if event == "mcp.call":
        for key in ("tool", "a2a_method", "mcp_method", "resource"):
            if record.get(key):
                return f"{key.removesuffix('_method') if key != 'tool' else 'tool'} {record[key]}"
        return str(record.get("path", ""))
    if event == "connection.close":
        up, down = record.get("bytes_up"), record.get("bytes_down")
        if up is not None or down is not None:
            return f"up {_bytes(up)} down {_bytes(down)}"
        if record.get("requests") is not None:
            return f"{record['requests']} requests"
    return str(record.get("target") or "")


def _bytes(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    if value < 1024:
        return f"{value}B"
    size = float(value)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f}{unit}"


HEADER = ("TIME", "EVENT", "DECISION", "LISTENER", "PEER", "WHAT", "STATUS", "REASON")
_WIDTHS = (12, 10, 8, 14, 34, 28, 6, 0)


def _time(record: Mapping[str, Any]) -> str:
    text = str(record.get("ts", ""))
    return text[11:23] if len(text) >= 23 else text


def row(record: Mapping[str, Any]) -> tuple[str, ...]:
    event = str(record.get("event", "?"))
    if event == "audit.checkpoint":
        what = f"sealed {record.get('count')} records"
        return (
            _time(record),
            "checkpoint",
            "",
            "",
            _short_id(record.get("local_id")),
            what,
            "",
            "",
        )
    if event == "audit.gap":
        return (
            _time(record),
            "gap",
            "",
            "",
            "",
            f"{record.get('dropped')} records dropped",
            "",
            "",
        )
    reason = str(record.get("reason", ""))
    if record.get("rule"):
        reason += f" ({record['rule']})"
    status = record.get("status")
    return (
        _time(record),
        _EVENT_SHORT.get(event, event),
        str(record.get("decision", "")),
        str(record.get("listener", "")),
        _short_id(record.get("peer_id")),
        _what(record),
        "" if status is None else str(status),
        reason,
    )


def _fit(text: str, width: int) -> str:
    if not width:
        return text
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


def render(cells: tuple[str, ...], *, colour: bool, header: bool = False) -> str:
    parts = [_fit(cell, width) for cell, width in zip(cells, _WIDTHS, strict=True)]
    line = "  ".join(parts).rstrip()
    if not colour:
        return line
    if header:
        return f"{_BOLD}{line}{_RESET}"
    decision = cells[2]
    tint = _GREEN if decision == "allow" else _RED if decision == "deny" else _YELLOW
    parts[0] = f"{_DIM}{parts[0]}{_RESET}"
    parts[2] = f"{tint}{parts[2]}{_RESET}"
    if cells[1] in ("checkpoint", "gap"):
        parts[1] = f"{_YELLOW}{parts[1]}{_RESET}"
    else:
        parts[1] = f"{_CYAN}{parts[1]}{_RESET}"
    return "  ".join(parts).rstrip()
