"""Inputs for the fuzz harnesses: valid seeds and ways to break them.

Random bytes alone rarely get past a parser's first check, so most inputs
are *mutations* of something valid (a real certificate, key, JWKS bundle,
JSON-RPC message, config file): bit flips, byte changes, insertions,
deletions, truncations, duplicated and spliced ranges. That reaches the
code behind the first check, where the surprises live.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

# Any code point, lone surrogates included: they are what a hostile JSON
# "\ud800" or a Latin-1 decode of garbage gives a parser.
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_char, max_size=300)


_OPS = ("flip", "set", "step", "insert", "delete", "truncate", "dup", "splice")


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_ops: int = 6) -> bytes:
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(_OPS))
        size = len(data)
        at = draw(st.integers(0, max(size - 1, 0)))
        if op == "flip" and size:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and size:
            data[at] = draw(st.sampled_from((0x00, 0x30, 0x7F, 0x80, 0x81, 0x82, 0xFF)))
        elif op == "step" and size:  # a version, a length, a tag one off
            data[at] = (data[at] + draw(st.sampled_from((-1, 1, 2)))) & 0xFF
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and size:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "dup" and size:
            end = draw(st.integers(at, min(size, at + 64)))
            data[at:at] = data[at:end]
        elif op == "splice":
            other = draw(st.sampled_from(list(seeds)))
            cut = draw(st.integers(0, len(other)))
            data[at:] = other[cut:]
    return bytes(data)


def inputs(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly mutations of the seeds; some seeds as they are; some noise."""
    return st.one_of(
        mutated(seeds),
        st.sampled_from(list(seeds)),
        st.binary(max_size=512),
    )


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    any_text,
)


def json_values(keys: Sequence[str] = ()) -> st.SearchStrategy[Any]:
    """JSON values whose object keys are often the ones a parser looks for."""
    key = st.one_of(st.sampled_from(list(keys)), any_text) if keys else any_text
    return st.recursive(
        json_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.dictionaries(key, inner, max_size=6),
        ),
        max_leaves=25,
    )


@st.composite
def json_documents(draw: st.DrawFn, keys: Sequence[str] = (), seeds: Sequence[bytes] = ()) -> bytes:
    """JSON text: generated structures (surrogates escaped, as a hostile
    sender would write them), mutations of real documents, deep nesting."""
    kinds = ("structure", "mutated", "deep") if seeds else ("structure", "deep")
    kind = draw(st.sampled_from(kinds))
    if kind == "structure":
        return json.dumps(draw(json_values(keys))).encode("ascii")
    if kind == "mutated":
        return draw(mutated(seeds))
    depth = draw(st.integers(100, 20000))
    opener, leaf, closer = draw(
        st.sampled_from((("[", "", "]"), ('{"a":', "1", "}"), ('{"keys":[', "", "]}")))
    )
    closed = draw(st.booleans())
    return (opener * depth + leaf + (closer * depth if closed else "")).encode()
