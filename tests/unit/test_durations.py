"""parse_duration / format_duration: Go-style durations and plain seconds."""

from __future__ import annotations

from datetime import timedelta

import pytest

from proxy.durations import DurationError, format_duration, parse_duration
from proxy.errors import UsageError

GOOD = [
    ("90s", timedelta(seconds=90)),
    ("30m", timedelta(minutes=30)),
    ("1h", timedelta(hours=1)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
    ("500ms", timedelta(milliseconds=500)),
    ("1s500ms", timedelta(seconds=1, milliseconds=500)),
    ("2d", timedelta(days=2)),
    ("2d12h", timedelta(days=2, hours=12)),
    ("1.5h", timedelta(minutes=90)),
    ("0.25s", timedelta(milliseconds=250)),
    (".5s", timedelta(milliseconds=500)),
    ("3600", timedelta(hours=1)),
    ("1.5", timedelta(seconds=1.5)),
    ("0", timedelta(0)),
    ("0s", timedelta(0)),
    ("  45s  ", timedelta(seconds=45)),
    ("+10s", timedelta(seconds=10)),
    ("8760h", timedelta(days=365)),
]

BAD = [
    "",
    "   ",
    "-1s",
    "-5",
    "abc",
    "10x",
    "1h 30m",
    "h",
    "s10",
    "1.2.3",
    "1e3",
    "nan",
    "inf",
    "10 s",
    "1hh",
    "9999999999d",
    "1H",
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_parse_good(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", BAD)
def test_parse_bad(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text.strip()) in message or repr(text) in message
    assert "\n" not in message


def test_duration_error_is_value_and_usage_error() -> None:
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(UsageError):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("td", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(seconds=1, milliseconds=500), "1.5s"),
        (timedelta(days=365), "365d"),
        (timedelta(days=2, hours=3, minutes=4, seconds=5), "2d3h4m5s"),
        (timedelta(seconds=-90), "-1m30s"),
    ],
)
def test_format(td: timedelta, text: str) -> None:
    assert format_duration(td) == text


@pytest.mark.parametrize(
    "td",
    [
        timedelta(0),
        timedelta(milliseconds=1),
        timedelta(seconds=59, milliseconds=999),
        timedelta(hours=25, minutes=1, seconds=1),
        timedelta(days=400, milliseconds=120),
    ],
)
def test_format_round_trips(td: timedelta) -> None:
    assert parse_duration(format_duration(td)) == td
