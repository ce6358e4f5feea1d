"""One canonical JSON encoding (pure), for the digests approvals bind and
the argument hashes audit records carry."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: equal JSON values, equal bytes.

    Stable within this project (audit digests, argument hashes). It is not
    RFC 8785 (JCS): keys sort by code point, not UTF-16 unit, and floats use
    Python's shortest repr.
    """
    return _CANONICAL.encode(value).encode("utf-8")


# Built once (json.dumps with options builds an encoder per call).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
)
