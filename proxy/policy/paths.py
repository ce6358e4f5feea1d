"""Request matching primitives (pure): path normalisation, path patterns
and methods. Decisions themselves are :mod:`proxy.policy.evaluate`'s.

Paths are checked after normalisation
(:func:`normalize_path`), and requests whose path could mean something else
to the target (dot segments, encoded slashes) never get that far: they are
400s, so ``/timesheets/../admin`` cannot ride on a ``/timesheets/**`` rule.

Path patterns work on segments: ``*`` inside a segment matches any run of
characters but ``/`` (``*.json``), a whole ``**`` segment matches zero or
more segments (``/timesheets/**`` matches ``/timesheets`` and everything
below it), anything else matches literally.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

_UNRESERVED = re.compile(r"%([0-9A-Fa-f]{2})")
_TCHAR_METHOD = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Characters whose encoded form we refuse: a decoded '/' or '\' or NUL could
# split or join segments differently at the target than in our match.
_FORBIDDEN_ENCODED = {0x2F, 0x5C, 0x00}


class PathPatternError(ValueError):
    pass


class BadPath(ValueError):
    """A request path we refuse to judge (400)."""


def _decode_unreserved(match: re.Match[str]) -> str:
    value = int(match.group(1), 16)
    if value in _FORBIDDEN_ENCODED:
        raise BadPath(f"encoded {chr(value)!r} in path")
    char = chr(value)
    # Only unreserved characters are decoded (RFC 3986, 6.2.2.2); the rest
    # stay encoded, uppercased, so equal paths compare equal.
    if (char.isalnum() and char.isascii()) or char in "-._~":
        return char
    return "%" + match.group(1).upper()


def normalize_path(target: str) -> str:
    """The path of a request target, normalised for matching; raises BadPath.
    Normalising decodes only unreserved characters, so the result means the
    same resource to any RFC 3986 reader: it is what we forward, too."""
    if "#" in target:
        # A fragment is never part of a request target (RFC 9112 3.2); a
        # target that judges as one path and reaches the backend as another
        # is how a rule gets bypassed.
        raise BadPath("fragment in request target")
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadPath("path must start with '/'")
    if "\\" in path:
        raise BadPath("backslash in path")
    decoded = _UNRESERVED.sub(_decode_unreserved, path)
    for segment in decoded.split("/")[1:]:
        if segment in (".", ".."):
            raise BadPath("dot segment in path")
        # Tomcat and Spring drop path parameters before resolving dot
        # segments, so /ok/..;/admin is /admin to them.
        if ";" in segment and segment.split(";", 1)[0] in (".", ".."):
            raise BadPath("dot segment with path parameters")
    return decoded


@dataclass(frozen=True, slots=True)
class PathPattern:
    text: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise PathPatternError(f"path pattern {text!r} must start with '/'")
        if text == "/**":
            return cls(text, ("**",))
        parts = tuple(text.split("/")[1:])
        for part in parts[:-1]:
            if part == "":
                raise PathPatternError(f"path pattern {text!r} has an empty segment")
        for part in parts:
            if "**" in part and part != "**":
                raise PathPatternError(f"path pattern {text!r}: '**' must be a whole segment")
            if any(c in part for c in "[]?"):
                raise PathPatternError(f"path pattern {text!r}: only '*' and '**' are wildcards")
            if part in (".", ".."):
                raise PathPatternError(f"path pattern {text!r} has a dot segment")
        return cls(text, parts)

    def matches(self, path: str) -> bool:
        return match_segments(self.segments, tuple(path.split("/")[1:]))


@lru_cache(maxsize=4096)
def match_segments(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path segments ``parts`` match a parsed pattern's segments."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(match_segments(rest, parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    ok = fnmatch.fnmatchcase(parts[0], head) if "*" in head else parts[0] == head
    return ok and match_segments(rest, parts[1:])


def parse_method(text: str) -> str:
    if text == "*" or _TCHAR_METHOD.match(text):
        return text
    raise PathPatternError(f"invalid HTTP method {text!r}")
