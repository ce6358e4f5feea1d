"""Rule conditions: CEL expressions, compiled once and checked at load time.

Theory of operation: a rule's ``when`` is a CEL expression (the language of
Kubernetes admission policies, Envoy RBAC and agentgateway). Parsing and
evaluation are done by ``common-expression-language`` (Python bindings for
the Rust ``cel`` crate); nothing here interprets CEL itself.

That library has no type checker, and a condition that names a variable that
does not exist must fail when the configuration loads, never silently never
match at run time. So :func:`compile_condition` adds a static check of its
own over the expression's tokens (after the library has accepted the
syntax):

* every free identifier must be one of the declared roots (``peer``,
  ``request``, ``mcp``, ``time``, as the listener allows); the identifiers a
  comprehension binds (``mcp.args.exists(k, k == "x")``) are local, and may
  not shadow a root;
* a field selected on a root (``peer.id``, ``peer["id"]``) must be one of
  that root's fields; ``request.headers`` and ``mcp.args`` are open maps, so
  ``mcp.args.amount`` is fine at load time and a run-time matter;
* a scalar field has no fields of its own (``peer.id.x``), though it has
  methods (``peer.id.startsWith("spiffe://a/")``).

At run time anything that goes wrong (a missing argument, a type mismatch,
a non-boolean result) raises :class:`EvaluationError`; the policy turns that
into a denial with reason ``policy_error`` (fail closed).

Speed: evaluation itself is well under a microsecond; converting Python
values into CEL values is what costs (a few microseconds per root). So a
condition records which roots it reads (:attr:`Condition.roots`) and the
policy converts only those, once per request (:class:`Activation`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# ``cel`` is imported on first use: its package imports an interactive CLI
# (prompt_toolkit, rich) that costs ~80 ms and megabytes in every process,
# and most configurations have no condition at all.


def _cel() -> Any:
    import cel

    return cel


__all__ = [
    "ALL_ROOTS",
    "SCHEMA",
    "Activation",
    "Condition",
    "ConditionError",
    "EvaluationError",
    "Needs",
    "compile_condition",
    "merge_needs",
    "select",
]

# The variables a condition may read. ``None`` marks an open map (any key),
# a string the CEL type of a scalar field.
SCHEMA: Mapping[str, Mapping[str, str | None]] = {
    "peer": {"id": "string", "trust_domain": "string", "svid_age_seconds": "double"},
    "request": {"method": "string", "path": "string", "headers": None},
    "mcp": {"method": "string", "tool": "string", "args": None},
    "time": {"hour": "int", "weekday": "int"},
}
ALL_ROOTS = frozenset(SCHEMA)

# Macros that bind a local identifier as their first argument.
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "existsOne", "map", "filter"})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>//[^\n]*)
  | (?P<string>
        [bB]?[rR][bB]?(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"[^"\n]*"|'[^'\n]*')
      | [bB]?(?:\"\"\"(?:\\[\s\S]|[^\\])*?\"\"\"|'''(?:\\[\s\S]|[^\\])*?'''
               |"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
    )
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?|0[xX][0-9a-fA-F]+[uU]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>\|\||&&|==|!=|<=|>=|\?\.|.)
    """,
    re.VERBOSE,
)


class ConditionError(ValueError):
    """A condition that cannot be used: bad syntax or an unknown variable (a load error)."""


class EvaluationError(ValueError):
    """A condition failed at run time; the caller must deny (fail closed)."""


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # pragma: no cover - the CEL parser accepted the text first
            raise ConditionError(f"cannot read the condition at offset {pos}")
        kind = m.lastgroup or "punct"
        if kind not in ("ws", "comment"):
            out.append(_Tok(kind, m.group()))
        pos = m.end()
    return out


def _string_value(token: _Tok) -> str | None:
    """The value of a plain (non-raw, non-bytes) one-line string literal without escapes."""
    text = token.text
    if "\\" in text or text.startswith(('"""', "'''")):
        return None
    if text[0] in "\"'" and len(text) >= 2:
        return text[1:-1]
    return None


# What a condition reads, for converting no more than that: root -> None (the
# whole root) or field -> None (the whole field) or the keys of an open map.
Needs = Mapping[str, Mapping[str, frozenset[str] | None] | None]


def _check(text: str, roots: Collection[str], variables: Collection[str]) -> Needs:
    """Check identifiers and root fields; return what the expression reads."""
    toks = _tokens(text)
    bound: set[str] = set()
    for i in range(len(toks) - 3):
        a, b, c, d = toks[i], toks[i + 1], toks[i + 2], toks[i + 3]
        if (
            a.kind == "ident"
            and a.text in _BINDING_MACROS
            and i > 0
            and toks[i - 1].text == "."
            and b.text == "("
            and c.kind == "ident"
            and d.text == ","
        ):
            if c.text in SCHEMA:
                raise ConditionError(
                    f"the comprehension variable {c.text!r} shadows the variable {c.text}; "
                    "pick another name"
                )
            bound.add(c.text)
    known = ", ".join(sorted(roots))
    for var in variables:
        if var in bound:
            continue
        if var in SCHEMA and var not in roots:
            raise ConditionError(f"the variable {var!r} is not available here (known: {known})")
        if var not in roots:
            raise ConditionError(f"unknown variable {var!r} (known: {known})")
    needs: dict[str, dict[str, set[str] | None] | None] = {}

    def text_at(j: int) -> str:
        return toks[j].text if j < len(toks) else ""

    for i, tok in enumerate(toks):
        if tok.kind != "ident" or tok.text not in SCHEMA:
            continue
        if i > 0 and toks[i - 1].text in (".", "?."):
            continue  # a field or method of something else, e.g. x.peer
        if text_at(i + 1) == "(":
            continue  # a function call named like a root
        root = tok.text
        fields = SCHEMA[root]
        name: str | None = None
        after = i + 2
        if text_at(i + 1) == "." and i + 2 < len(toks) and toks[i + 2].kind == "ident":
            name = toks[i + 2].text
            after = i + 3
        elif text_at(i + 1) == "[" and text_at(i + 3) == "]":
            name = _string_value(toks[i + 2])
            after = i + 4
        if name is None:
            needs[root] = None  # the whole root: bare, or indexed by an expression
            continue
        if name not in fields:
            raise ConditionError(
                f"unknown variable '{root}.{name}' ({root} has "
                + ", ".join(f"{root}.{f}" for f in fields)
                + ")"
            )
        kind = fields[name]
        key: str | None = None
        if text_at(after) == "." and after + 1 < len(toks) and toks[after + 1].kind == "ident":
            nxt = toks[after + 1].text
            called = text_at(after + 2) == "("
            if kind is not None and not called:
                raise ConditionError(
                    f"unknown variable '{root}.{name}.{nxt}' ({root}.{name} is "
                    f"{'an' if kind[0] in 'aeiou' else 'a'} {kind})"
                )
            if not called:
                key = nxt
        elif text_at(after) == "[" and text_at(after + 2) == "]":
            key = _string_value(toks[after + 1])
        if root in needs and needs[root] is None:
            continue
        root_needs = needs.setdefault(root, {})
        assert root_needs is not None
        if kind is not None or key is None:
            root_needs[name] = None  # a scalar, or a map read as a whole
        elif name not in root_needs or root_needs[name] is not None:
            keys = root_needs.get(name) or set()
            keys.add(key)
            root_needs[name] = keys
    return {
        root: None
        if spec is None
        else {f: None if keys is None else frozenset(keys) for f, keys in spec.items()}
        for root, spec in needs.items()
    }


def merge_needs(parts: Iterable[Needs]) -> Needs:
    """What several conditions read together."""
    out: dict[str, dict[str, set[str] | None] | None] = {}
    for needs in parts:
        for root, spec in needs.items():
            if spec is None or (root in out and out[root] is None):
                out[root] = None
                continue
            mine = out.setdefault(root, {})
            assert mine is not None
            for name, keys in spec.items():
                if keys is None or (name in mine and mine[name] is None):
                    mine[name] = None
                else:
                    have = mine.get(name) or set()
                    mine[name] = have | keys
    return {
        root: None
        if spec is None
        else {f: None if keys is None else frozenset(keys) for f, keys in spec.items()}
        for root, spec in out.items()
    }


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled CEL condition. ``needs``: the roots, fields and map keys it reads."""

    text: str
    needs: Needs = field(compare=False)
    _program: Any = field(repr=False, compare=False)

    @property
    def roots(self) -> frozenset[str]:
        return frozenset(self.needs)

    @property
    def uses_args(self) -> bool:
        """Whether it reads ``mcp.args`` (so it can only be decided at call time)."""
        if "mcp" not in self.needs:
            return False
        spec = self.needs["mcp"]
        return spec is None or "args" in spec

    def evaluate(self, ctx: Activation | Mapping[str, Any]) -> bool:
        """True or False; EvaluationError for anything else (the caller denies)."""
        context = ctx.context_for(self) if isinstance(ctx, Activation) else dict(ctx)
        try:
            result = self._program.execute(context)
        except BaseException as exc:  # KeyError, TypeError, RuntimeError, a Rust panic...
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise EvaluationError(_describe(exc)) from None
        if result is True or result is False:
            return result
        raise EvaluationError(f"the condition returned {type(result).__name__}, not a boolean")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no such key: {exc.args[0] if exc.args else '?'}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def compile_condition(text: str, roots: Collection[str] = ALL_ROOTS) -> Condition:
    """Parse and check a condition; ConditionError names the problem.

    ``roots`` limits the variables to those the listener provides (for
    example no ``mcp`` on a plain HTTP listener)."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("the condition is empty")
    try:
        program = _cel().compile(text)
    except BaseException as exc:  # ValueError with the parser's report, or a Rust panic
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        message = " ".join(str(exc).split())
        raise ConditionError(f"invalid CEL: {message}"[:400]) from None
    needs = _check(text, frozenset(roots), program.variables())
    return Condition(text=text, needs=needs, _program=program)


def select(value: Mapping[str, Any], spec: Mapping[str, frozenset[str] | None] | None) -> Any:
    """The part of a root's value that ``spec`` (from :data:`Needs`) reads."""
    if spec is None:
        return value
    out: dict[str, Any] = {}
    for name, keys in spec.items():
        if name not in value:
            continue  # absent stays absent: reading it fails, and the caller denies
        item = value[name]
        if keys is not None and isinstance(item, Mapping):
            item = {k: item[k] for k in keys if k in item}
        out[name] = item
    return out


class Activation:
    """The variables for one request, converted to CEL lazily and at most once.

    ``values`` maps a root to a zero-argument function returning its Python
    value; ``needs`` (all the conditions of a policy, merged) says which
    fields and map keys to convert: converting values is what costs."""

    __slots__ = ("_added", "_ctx", "_needs", "_values")

    def __init__(
        self, values: Mapping[str, Callable[[], Mapping[str, Any]]], needs: Needs | None = None
    ) -> None:
        self._values = values
        self._needs = needs
        self._ctx: Any = None
        self._added: set[str] = set()

    def context_for(self, condition: Condition) -> Any:
        if self._ctx is None:
            self._ctx = _cel().Context()
        for root in condition.needs:
            if root not in self._added:
                needs = self._needs if self._needs is not None else condition.needs
                spec = needs.get(root) if root in needs else None
                self._ctx.add_variable(root, select(self._values[root](), spec))
                self._added.add(root)
        return self._ctx
