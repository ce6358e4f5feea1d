"""The request policy: how guard rules match and combine, and its version.

Theory of operation. A :class:`GuardRule` *matches* a request when every
selector it has matches: the peer (``peers``, empty = any), the HTTP method
(``methods``, ``*`` = any; ``GET`` also selects ``HEAD``), the path
(``paths``, empty = any), the MCP scope (``tools``/``resources``/``prompts``,
below) and, last, the CEL condition ``when``. Matching rules then combine
(:meth:`PolicySet.evaluate`):

1. a condition that fails to evaluate in an enforced rule denies the request
   with reason ``policy_error``, whatever other rules say (fail closed);
2. else a matching enforced ``deny`` rule denies (``denied_by_rule``): deny
   overrides allow;
3. else a matching enforced ``allow`` rule allows (``rule_matched``; the
   first in file order names the rule in the audit record). Every matching
   allow rule's ``rate`` and ``high_impact`` apply, so a broad rule earlier
   in the file cannot switch off a step-up a narrower rule asks for;
4. else the request is denied: ``upgrade_not_allowed`` when an allow rule
   matched but it is an Upgrade and none has ``allow_upgrade``, otherwise
   ``no_matching_rule``.

Dry-run rules (``mode = "dry-run"``) never change the outcome: each one that
matches is reported as ``would_allow`` (an allow rule) or ``would_deny`` (a
deny rule, or a condition that failed to evaluate), for audit and metrics.

MCP scope. ``tools`` (globs on tool names) scope a rule to ``tools/call``,
``resources`` (globs on URIs) to ``resources/read``, ``prompts`` (globs on
names) to ``prompts/get``. A scoped rule also matches the session traffic a
client needs to use what it grants (``initialize``, ``ping``,
notifications, the ``*/list`` methods, and non-JSON-RPC requests such as the
SSE ``GET``), never another scoped call. An *allow* rule grants
``tools/call``, ``resources/read`` or ``prompts/get`` only through the
matching scope key (``tools = ["*"]`` for every tool): a rule that allows
``POST /mcp`` does not silently allow every tool. A *deny* rule without a
scope applies to every request it matches.

List filtering (:meth:`PolicySet.visible`): a tool, resource or prompt is
listed to a peer when some enforced allow rule could allow calling it and
no unconditional enforced deny rule would refuse it. A condition that reads
``mcp.args`` cannot be decided before the call: such an allow rule counts as
"could allow" (the name is listed, the call is still checked) and such a deny
rule does not hide. Any other condition is evaluated as if the call were
being made now; an error hides nothing and shows nothing.

The version is the SHA-256 of a canonical JSON description of the rules, so
it is stable across runs and changes when any rule changes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping

from proxy.identity import SpiffeId
from proxy.policy.conditions import Activation, EvaluationError, merge_needs
from proxy.policy.paths import match_segments
from proxy.policy.peers import SpiffePattern
from proxy.policy.ratelimit import Rate
from proxy.policy.rules import (
    _KIND_METHOD,
    _OTHER,
    _PEER_CACHE_SIZE,
    _PLAIN,
    _PROMPT,
    _RESOURCE,
    _SCOPED_CLASS,
    _TOOL,
    DENIED_BY_RULE,
    MCP_SESSION_METHODS,
    NO_MATCHING_RULE,
    POLICY_ERROR,
    RULE_MATCHED,
    UPGRADE_NOT_ALLOWED,
    WOULD_ALLOW,
    WOULD_DENY,
    GuardRule,
    HighImpact,
    Kind,
    RequestFacts,
    _activation,
    _target,
)
from proxy.policy.verdict import RequestVerdict

__all__ = ["PolicySet", "policy_version"]


class _Entry:
    """A rule prepared for one class of request: the hot loop reads plain slots."""

    __slots__ = (
        "deny",
        "dry",
        "glob",
        "hi",
        "name",
        "paths",
        "rate",
        "rule",
        "session",
        "upgrade",
        "when",
    )

    def __init__(self, rule: GuardRule, cls: int) -> None:
        self.rule = rule
        self.name = rule.name
        self.paths = tuple(p.segments for p in rule.paths)
        self.when = rule.when
        self.dry = rule.mode == "dry-run"
        self.deny = rule.action == "deny"
        self.upgrade = rule.allow_upgrade
        self.rate = rule.rate
        self.hi = rule.high_impact
        patterns = {_TOOL: rule.tools, _RESOURCE: rule.resources, _PROMPT: rule.prompts}.get(cls)
        self.glob: Callable[[str], object] | None = None
        if patterns:
            self.glob = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
        # A scoped allow rule admits the session traffic around the calls it grants.
        self.session = cls == _PLAIN and rule.scoped


def _applies(rule: GuardRule, cls: int) -> bool:
    """Whether ``rule`` can match a request of class ``cls`` at all."""
    if cls == _PLAIN:
        return not rule.scoped or rule.action == "allow"
    if cls == _OTHER:
        return not rule.scoped
    scope = {_TOOL: rule.tools, _RESOURCE: rule.resources, _PROMPT: rule.prompts}[cls]
    if scope:
        return True
    # An unscoped allow rule does not grant scoped calls; an unscoped deny denies them.
    return not rule.scoped and rule.action == "deny"


def _class_of(mcp_method: str | None) -> int:
    if mcp_method is None:
        return _PLAIN
    cls = _SCOPED_CLASS.get(mcp_method)
    if cls is not None:
        return cls
    if mcp_method in MCP_SESSION_METHODS or mcp_method.startswith("notifications/"):
        return _PLAIN
    return _OTHER


class PolicySet:
    """An ordered set of guard rules, indexed for fast evaluation."""

    __slots__ = ("_by_class", "_by_peer", "_needs", "rules", "version")

    def __init__(self, rules: Iterable[GuardRule] = ()) -> None:
        self.rules: tuple[GuardRule, ...] = tuple(rules)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique within a policy set")
        canonical = json.dumps(
            [r.describe() for r in self.rules], sort_keys=True, separators=(",", ":")
        )
        self.version = "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        self._needs = merge_needs(r.when.needs for r in self.rules if r.when is not None)
        # Per class of request, per method (None: a method no rule names), the
        # rules that can apply, in file order.
        methods = {m for r in self.rules for m in r.methods if m != "*"}
        if "GET" in methods:
            methods.add("HEAD")
        self._by_class: dict[int, dict[str | None, tuple[_Entry, ...]]] = {}
        for cls in (_PLAIN, _OTHER, _TOOL, _RESOURCE, _PROMPT):
            entries = [_Entry(r, cls) for r in self.rules if _applies(r, cls)]
            index: dict[str | None, tuple[_Entry, ...]] = {
                None: tuple(e for e in entries if "*" in e.rule.methods)
            }
            for m in methods:
                index[m] = tuple(e for e in entries if _names_method(e.rule.methods, m))
            self._by_class[cls] = index
        # (peer, method, class) -> the entries whose selectors those satisfy. A
        # pure cache (peers are few: workload identities), bounded by clearing.
        self._by_peer: dict[tuple[SpiffeId | None, str, int], tuple[_Entry, ...]] = {}

    def _candidates(self, peer: SpiffeId | None, method: str, cls: int) -> tuple[_Entry, ...]:
        key = (peer, method, cls)
        found = self._by_peer.get(key)
        if found is None:
            index = self._by_class[cls]
            entries = index.get(method, index[None])
            found = tuple(
                e
                for e in entries
                if not e.rule.peers or (peer is not None and _peer_matches(e.rule.peers, peer))
            )
            if len(self._by_peer) >= _PEER_CACHE_SIZE:
                self._by_peer.clear()
            self._by_peer[key] = found
        return found

    @property
    def reads_headers(self) -> bool:
        """Whether any condition reads ``request.headers`` (else callers may
        skip building the header map on the hot path)."""
        spec = self._needs.get("request", {})
        return spec is None or "headers" in spec

    def __len__(self) -> int:
        return len(self.rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PolicySet) and other.version == self.version

    def __hash__(self) -> int:
        return hash(self.version)

    def __repr__(self) -> str:
        return f"PolicySet({len(self.rules)} rules, {self.version[:19]})"

    def admitted_peers(self) -> tuple[SpiffePattern, ...]:
        """Peer patterns of enforced allow rules: who may complete a handshake."""
        out: dict[str, SpiffePattern] = {}
        for r in self.rules:
            if r.action == "allow" and r.mode == "enforce":
                for p in r.peers:
                    out.setdefault(p.text, p)
        return tuple(out.values())

    def evaluate(self, facts: RequestFacts, version: str | None = None) -> RequestVerdict:
        """Decide one request (see the module docstring); never raises for bad input.

        ``version`` is the policy version the verdict carries (the gate's
        config-wide one); this rule set's own hash by default.
        """
        version = version or self.version
        cls = _class_of(facts.mcp_method)
        candidates = self._candidates(facts.peer, facts.method, cls)
        parts = tuple(facts.path.split("/")[1:])
        target = _target(facts, cls)
        activation: Activation | None = None
        error: tuple[str, str] | None = None
        denied_by: str | None = None
        allowed_by: _Entry | None = None
        upgrade_refused = False
        dry: list[tuple[str, str]] | None = None
        dry_errors: list[str] | None = None
        rates: list[tuple[str, Rate]] | None = None
        steps: list[tuple[str, HighImpact]] | None = None
        for e in candidates:
            if e.paths and not _paths_match(e.paths, parts):
                continue
            if e.glob is not None and (target is None or e.glob(target) is None):
                continue
            if e.session:
                # Session traffic around the calls a scoped rule grants: its
                # condition, rate and step-up are for those calls.
                if not e.dry and allowed_by is None:
                    if facts.upgrade and not e.upgrade:
                        upgrade_refused = True
                    else:
                        allowed_by = e
                continue
            when = e.when
            if when is not None:
                if activation is None:
                    activation = _activation(facts, self._needs)
                try:
                    ok = when.evaluate(activation)
                except EvaluationError as exc:
                    if e.dry:
                        dry = dry or []
                        dry.append((e.name, WOULD_DENY))
                        dry_errors = dry_errors or []
                        dry_errors.append(f"{e.name}: {exc}")
                    elif error is None:
                        error = (e.name, f"{e.name}: {exc}")
                    continue
                if not ok:
                    continue
            if e.dry:
                dry = dry or []
                dry.append((e.name, WOULD_DENY if e.deny else WOULD_ALLOW))
                continue
            if e.deny:
                if denied_by is None:
                    denied_by = e.name
                continue
            if facts.upgrade and not e.upgrade:
                upgrade_refused = True
                continue
            if allowed_by is None or allowed_by.session:
                allowed_by = e  # a full match names the decision over a session match
            if e.rate is not None:
                rates = rates or []
                rates.append((e.name, e.rate))
            if e.hi is not None:
                steps = steps or []
                steps.append((e.name, e.hi))
        dry_t = tuple(dry) if dry else ()
        dry_err = "; ".join(dry_errors) if dry_errors else None
        if error is not None:
            return RequestVerdict(
                False, POLICY_ERROR, error[0], version, dry_run=dry_t, detail=error[1]
            )
        if denied_by is not None:
            return RequestVerdict(
                False, DENIED_BY_RULE, denied_by, version, dry_run=dry_t, detail=dry_err
            )
        if allowed_by is not None:
            return RequestVerdict(
                True,
                RULE_MATCHED,
                allowed_by.name,
                version,
                status=200,
                dry_run=dry_t,
                detail=dry_err,
                rates=tuple(rates) if rates else (),
                high_impact=tuple(steps) if steps else (),
                log_args=allowed_by.rule.log_args,
            )
        reason = UPGRADE_NOT_ALLOWED if upgrade_refused else NO_MATCHING_RULE
        return RequestVerdict(False, reason, None, version, dry_run=dry_t, detail=dry_err)

    # -- list filtering -------------------------------------------------------

    def visible(self, facts: RequestFacts, kind: Kind, name: str) -> bool:
        """Whether a ``tools/list`` (``resources/list``, ``prompts/list``) answer
        to the request ``facts`` may show ``name`` (see the module docstring)."""
        call = RequestFacts(
            peer=facts.peer,
            method=facts.method,
            path=facts.path,
            now=facts.now,
            svid_age_seconds=facts.svid_age_seconds,
            headers=facts.headers,
            mcp_method=_KIND_METHOD[kind],
            mcp_tool=name if kind == "tool" else None,
            mcp_args=None,
            resource_uri=name if kind == "resource" else None,
            prompt_name=name if kind == "prompt" else None,
            peer_auth=facts.peer_auth,
        )
        cls = _class_of(call.mcp_method)
        candidates = self._candidates(call.peer, call.method, cls)
        parts = tuple(call.path.split("/")[1:])
        activation: Activation | None = None
        could_allow = False
        for e in candidates:
            if e.dry:
                continue
            if e.paths and not _paths_match(e.paths, parts):
                continue
            if e.glob is not None and e.glob(name) is None:
                continue
            when = e.when
            if when is not None:
                if when.uses_args:
                    if not e.deny:
                        could_allow = True
                    continue  # decided at call time; a conditional deny does not hide
                if activation is None:
                    activation = _activation(call, self._needs)
                try:
                    if not when.evaluate(activation):
                        continue
                except EvaluationError:
                    continue
            if e.deny:
                return False
            could_allow = True
        return could_allow

    def visible_names(self, facts: RequestFacts, kind: Kind, names: Iterable[str]) -> list[str]:
        """The subset of ``names`` :meth:`visible` allows, in order."""
        return [n for n in names if self.visible(facts, kind, n)]


def _names_method(methods: frozenset[str], method: str) -> bool:
    """Whether a rule's ``methods`` select ``method``. A server answers HEAD
    as it answers GET, without the body (RFC 9110 9.3.2), so a rule that
    allows GET allows HEAD; a deny rule naming HEAD still refuses it."""
    return method in methods or "*" in methods or (method == "HEAD" and "GET" in methods)


def _peer_matches(patterns: tuple[SpiffePattern, ...], peer: SpiffeId) -> bool:
    # A plain loop: no generator object in the hot path.
    for p in patterns:  # noqa: SIM110
        if p.matches(peer):
            return True
    return False


def _paths_match(patterns: tuple[tuple[str, ...], ...], parts: tuple[str, ...]) -> bool:
    # A plain loop: no generator object in the hot path.
    for p in patterns:  # noqa: SIM110
        if match_segments(p, parts):
            return True
    return False


def policy_version(sets: Mapping[str, PolicySet]) -> str:
    """One version for several policy sets (e.g. every listener and route of a config)."""
    canonical = json.dumps({k: v.version for k, v in sets.items()}, sort_keys=True)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
