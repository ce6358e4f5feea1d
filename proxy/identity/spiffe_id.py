"""SPIFFE IDs and trust domain names, exactly as the SPIFFE-ID standard says.

Theory of operation: a SPIFFE ID is ``spiffe://<trust domain><path>``. We do
not hand the string to a general URI parser, because such parsers accept
(and quietly normalise) things the standard forbids: percent-encoding,
userinfo, ports, dot segments, uppercase hosts. Two IDs that a normalising
parser thinks equal could then be treated differently by policy. Instead we
check the string character by character against the standard's grammar:

    trust domain  [a-z0-9._-]{1,255}
    path          ("/" segment)*, segment = [a-zA-Z0-9._-]+, not "." or ".."
    whole ID      at most 2048 bytes

Anything else is rejected with a message that names the broken rule, so an
operator who typed a bad ID in a config file knows what to fix. Because the
accepted grammar has no escapes and no case folding, ``str(SpiffeId.parse(s))
== s`` always holds, and equality of IDs is plain string equality.

The constructors validate too, so every ``TrustDomain`` and ``SpiffeId`` that
exists is valid, whichever way it was built.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID 2.3
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID 2.3 (RFC 3986 host limit)

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")

# Inputs come from config files and from peers' certificates; keep the echo
# of a hostile 2 KiB string in an error message short.
_SHOW_MAX = 80


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID or trust domain name.

    ``rule`` is the rule that was broken (also part of the message).
    """

    def __init__(self, message: str, *, rule: str = "") -> None:
        super().__init__(message)
        self.rule = rule


def _show(text: str) -> str:
    if len(text) > _SHOW_MAX:
        text = text[:_SHOW_MAX] + "..."
    # repr() so control characters from a hostile input cannot forge log lines.
    return repr(text)


def _utf8_length(text: str) -> int:
    # surrogatepass: a lone surrogate (from a hostile JSON "\ud800", say) is
    # counted here and refused by the character rules, never raised as a
    # UnicodeEncodeError.
    return len(text.encode("utf-8", "surrogatepass"))


def _trust_domain_problem(name: str) -> str | None:
    """The rule ``name`` breaks as a trust domain name, or None if it is valid."""
    if not isinstance(name, str):
        return f"a trust domain must be a string, not {type(name).__name__}"
    if not name:
        return "trust domain is missing"
    if _utf8_length(name) > MAX_TRUST_DOMAIN_BYTES:
        return f"trust domain is too long (maximum {MAX_TRUST_DOMAIN_BYTES} bytes)"
    for ch in name:
        if ch in _TRUST_DOMAIN_CHARS:
            continue
        if ch.isupper():
            return "trust domain contains uppercase characters (must be lowercase)"
        return (
            f"invalid character {ch!r} in trust domain "
            "(allowed: lowercase letters, digits, '.', '-', '_')"
        )
    return None


def _path_problem(path: str) -> str | None:
    """The rule ``path`` breaks as a SPIFFE ID path, or None if it is valid."""
    if path == "":
        return None
    if not path.startswith("/"):
        return "path must start with '/'"
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment == "":
            if index == len(segments) - 1:
                return "trailing slash is not allowed"
            return "empty path segment ('//') is not allowed"
        if segment in (".", ".."):
            return f"path segment is {segment!r} (dot segments are not allowed)"
        for ch in segment:
            if ch not in _PATH_SEGMENT_CHARS:
                return f"invalid character {ch!r} in path (allowed: letters, digits, '.', '-', '_')"
    return None


def _authority_problem(authority: str) -> str | None:
    """Like _trust_domain_problem, but names the URI part a stray character
    belongs to (userinfo, port), which is the likelier mistake."""
    if "@" in authority:
        return "userinfo is not allowed"
    # "[" starts an IP literal, whose colons are not a port; the bracket is
    # reported as an invalid character below.
    if ":" in authority and not authority.startswith("["):
        return "port is not allowed"
    if "%" in authority:
        return "percent-encoding is not allowed"
    return _trust_domain_problem(authority)


def _id_problem(text: str) -> str | None:
    """The rule ``text`` breaks as a SPIFFE ID, or None if it is valid."""
    if not isinstance(text, str):
        return f"a SPIFFE ID must be a string, not {type(text).__name__}"
    if text == "":
        return "SPIFFE ID is empty"
    if _utf8_length(text) > MAX_ID_BYTES:
        return f"SPIFFE ID is too long (maximum {MAX_ID_BYTES} bytes)"
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "scheme must be spiffe: the ID must start with 'spiffe://'"
    if scheme != "spiffe":
        if scheme.lower() == "spiffe":
            return "scheme must be spiffe, in lowercase"
        return f"scheme must be spiffe, not {_show(scheme)}"
    # Query and fragment come before splitting off the path so that
    # "spiffe://example.org?x" is reported as a query, not as a bad character.
    query, fragment = rest.find("?"), rest.find("#")
    if query >= 0 and (fragment < 0 or query < fragment):
        return "query is not allowed"
    if fragment >= 0:
        return "fragment is not allowed"
    if "%" in rest:
        return "percent-encoding is not allowed"
    authority, slash, tail = rest.partition("/")
    return _authority_problem(authority) or _path_problem(slash + tail)


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        problem = _trust_domain_problem(self.name)
        if problem is not None:
            raise SpiffeIdError(f"invalid trust domain {_show(self.name)}: {problem}", rule=problem)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse ``example.org``, or any valid SPIFFE ID and take its trust
        domain (``spiffe://example.org/ns/x`` is ``example.org``), as go-spiffe's
        and py-spiffe's parsers do."""
        if not isinstance(text, str):
            rule = f"a trust domain must be a string, not {type(text).__name__}"
            raise SpiffeIdError(f"invalid trust domain: {rule}", rule=rule)
        if "://" in text or text.lower().startswith("spiffe:"):
            return SpiffeId.parse(text).trust_domain
        problem = _authority_problem(text)
        if problem is not None:
            raise SpiffeIdError(f"invalid trust domain {_show(text)}: {problem}", rule=problem)
        return cls(text)

    def id_string(self) -> str:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``."""
        return SCHEME_PREFIX + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID. ``path`` is "" for a trust domain's own ID, else starts with '/'."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        problem = _path_problem(self.path)
        if problem is None and _utf8_length(str(self)) > MAX_ID_BYTES:
            problem = f"SPIFFE ID is too long (maximum {MAX_ID_BYTES} bytes)"
        if problem is not None:
            raise SpiffeIdError(f"invalid SPIFFE ID {_show(str(self))}: {problem}", rule=problem)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        problem = _id_problem(text)
        if problem is not None:
            raise SpiffeIdError(f"invalid SPIFFE ID {_show(text)}: {problem}", rule=problem)
        authority, slash, tail = text[len(SCHEME_PREFIX) :].partition("/")
        return cls(TrustDomain(authority), slash + tail)

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
