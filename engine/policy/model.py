"""The compiled policy: frozen dataclasses, their deterministic JSON form, and the policy version.

`to_json()` is the artifact (`.faramesh/policy.json`, `faramesh compile`); its SHA-256 is the policy
version. `from_json()` rebuilds the same objects (conditions and indexes are recompiled from the
stored expressions), so the engine never needs the source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from faramesh.engine.policy.ast import Cond
from faramesh.engine.policy.conditions import Predicate, compile_predicate, uses_time
from faramesh.engine.policy.errors import CompiledPolicyError
from faramesh.engine.policy.toolid import glob_prefix, glob_to_regex

FORMAT = "faramesh.policy/v1"
COMPILER = "faramesh-fplc/0.1.0"


def freeze(value: Any) -> Any:
    """Deep read-only copy: dicts become mapping proxies, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The JSON-ready form of a frozen value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


def canonical_json(data: Any) -> bytes:
    """Deterministic bytes: sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    effect: str  # permit | defer | deny
    strict: bool  # deny!: wins over any permit or defer
    pattern: str
    condition: Cond | None
    ref: str  # governance.fms:14
    notify: str | None = None
    reason: str | None = None
    origin: str | None = None  # import alias/path for imported rules
    credential: str | None = None  # `vault:stripe#api_key`: brokered into this rule's permits
    credential_via: str | None = None  # "POST http://host:port/path Header": delivered by the egress proxy
    predicate: Predicate | None = field(default=None, compare=False, repr=False)
    glob: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "effect": self.effect,
            "strict": self.strict,
            "tool": self.pattern,
            "condition": thaw(self.condition) if self.condition is not None else None,
            "ref": self.ref,
        }
        for key in ("notify", "reason", "origin", "credential", "credential_via"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True, slots=True)
class RateLimit:
    pattern: str
    count: int | float
    unit: str
    per_seconds: int
    ref: str

    @property
    def refill_per_second(self) -> float:
        return float(self.count) / self.per_seconds


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    period: str
    max_cents: int | None
    max_calls: int | None
    warn_at: float | None
    on_exceed: str
    ref: str
    # "local": kept by this engine. "fleet": kept in the PostgreSQL database every engine of the fleet
    # shares, reserved there by one atomic statement (engine/wal/pg_store.py, FleetBudgets).
    scope: str = "local"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "period": self.period,
            "max_cents": self.max_cents,
            "max_calls": self.max_calls,
            "warn_at": self.warn_at,
            "on_exceed": self.on_exceed,
            "ref": self.ref,
        }
        if self.scope != "local":  # a local budget's artifact (and so its policy version) is unchanged
            out["scope"] = self.scope
        return out


@dataclass(frozen=True, slots=True)
class Redaction:
    pattern: str
    paths: tuple[str, ...]
    ref: str


@dataclass(frozen=True)
class Agent:
    agent_id: str
    default: str | None  # None → deny, and `check` warns
    default_ref: str | None
    rules: tuple[Rule, ...]
    rate_limits: tuple[RateLimit, ...] = ()
    budgets: tuple[Budget, ...] = ()
    redactions: tuple[Redaction, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # egress, session…
    alerts: tuple[Mapping[str, Any], ...] = ()
    framework: str | None = None
    command: str | None = None
    ref: str = ""
    # Derived lookup structures (not part of equality or the artifact).
    literal_index: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    prefix_index: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    prefix_lengths: tuple[int, ...] = field(default=(), compare=False, repr=False)
    needs_time: bool = field(default=False, compare=False, repr=False)
    has_strict: bool = field(default=False, compare=False, repr=False)
    # rule ref → the secret reference its permits carry (the compiler keeps such refs unique per agent).
    credentials: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    credential_routes: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    candidate_cache: dict[str, tuple[Rule, ...]] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "default": self.default,
            "default_ref": self.default_ref,
            "framework": self.framework,
            "command": self.command,
            "ref": self.ref,
            "rules": [r.to_dict() for r in self.rules],
            "rate_limits": [
                {"tool": r.pattern, "count": r.count, "unit": r.unit, "per_seconds": r.per_seconds, "ref": r.ref}
                for r in self.rate_limits
            ],
            "budgets": [b.to_dict() for b in self.budgets],
            "redactions": [{"tool": r.pattern, "args": list(r.paths), "ref": r.ref} for r in self.redactions],
            "settings": thaw(self.settings),
            "alerts": thaw(self.alerts),
        }


def build_agent(data: Mapping[str, Any]) -> Agent:
    """Build an Agent (with compiled predicates and its rule index) from its dict form."""
    rules = []
    for i, r in enumerate(data["rules"]):
        cond = r.get("condition")
        rules.append(
            Rule(
                index=i,
                effect=r["effect"],
                strict=bool(r.get("strict", False)),
                pattern=r["tool"],
                condition=freeze(cond),
                ref=r["ref"],
                notify=r.get("notify"),
                reason=r.get("reason"),
                origin=r.get("origin"),
                credential=r.get("credential"),
                credential_via=r.get("credential_via"),
                predicate=compile_predicate(cond) if cond is not None else None,
                glob=glob_to_regex(r["tool"]) if "*" in r["tool"] else None,
            )
        )
    literal: dict[str, list[int]] = {}
    prefixed: dict[str, list[int]] = {}
    for rule in rules:
        if rule.glob is None:
            literal.setdefault(rule.pattern.lower(), []).append(rule.index)
        else:
            prefixed.setdefault(glob_prefix(rule.pattern), []).append(rule.index)
    return Agent(
        agent_id=data["agent_id"],
        default=data.get("default"),
        default_ref=data.get("default_ref"),
        rules=tuple(rules),
        rate_limits=tuple(
            RateLimit(r["tool"], r["count"], r["unit"], r["per_seconds"], r["ref"]) for r in data.get("rate_limits", [])
        ),
        budgets=tuple(
            Budget(
                b["name"],
                b["period"],
                b["max_cents"],
                b["max_calls"],
                b["warn_at"],
                b["on_exceed"],
                b["ref"],
                b.get("scope", "local"),
            )
            for b in data.get("budgets", [])
        ),
        redactions=tuple(Redaction(r["tool"], tuple(r["args"]), r["ref"]) for r in data.get("redactions", [])),
        settings=freeze(data.get("settings", {})),
        alerts=freeze(data.get("alerts", [])),
        framework=data.get("framework"),
        command=data.get("command"),
        ref=data.get("ref", ""),
        literal_index=MappingProxyType({k: tuple(v) for k, v in literal.items()}),
        prefix_index=MappingProxyType({k: tuple(v) for k, v in prefixed.items()}),
        prefix_lengths=tuple(sorted({len(p) for p in prefixed})),
        needs_time=any(r.condition is not None and uses_time(r.condition) for r in rules),
        has_strict=any(r.strict for r in rules),
        credentials=MappingProxyType({r.ref: r.credential for r in rules if r.credential is not None}),
        credential_routes=MappingProxyType({r.ref: r.credential_via for r in rules if r.credential_via is not None}),
    )


@dataclass(frozen=True)
class CompiledPolicy:
    """An immutable compiled policy. `version` is the SHA-256 of `to_json()`."""

    agents: Mapping[str, Agent]
    runtime: Mapping[str, Any]
    providers: Mapping[str, Mapping[str, Any]]
    identities: Mapping[str, Mapping[str, Any]]
    trust: tuple[Mapping[str, Any], ...]
    imports: tuple[Mapping[str, Any], ...]
    sources: Mapping[str, str]  # file name → sha256 of its bytes
    timezone: Any = field(default=None, compare=False, repr=False)  # a tzinfo, derived from runtime

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "compiler": COMPILER,
            "sources": thaw(self.sources),
            "imports": thaw(self.imports),
            "trust": thaw(self.trust),
            "runtime": thaw(self.runtime),
            "providers": thaw(self.providers),
            "identities": thaw(self.identities),
            "agents": {k: a.to_dict() for k, a in sorted(self.agents.items())},
        }

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def version(self) -> str:
        cached = self.__dict__.get("_version")
        if cached is None:
            cached = hashlib.sha256(self.to_json()).hexdigest()
            object.__setattr__(self, "_version", cached)
        return str(cached)


def policy_from_dict(data: Mapping[str, Any]) -> CompiledPolicy:
    from zoneinfo import ZoneInfo

    runtime = data.get("runtime", {})
    tz = runtime.get("timezone")
    return CompiledPolicy(
        agents=MappingProxyType({k: build_agent(v) for k, v in data.get("agents", {}).items()}),
        runtime=freeze(runtime),
        providers=freeze(data.get("providers", {})),
        identities=freeze(data.get("identities", {})),
        trust=freeze(data.get("trust", [])),
        imports=freeze(data.get("imports", [])),
        sources=freeze(data.get("sources", {})),
        timezone=ZoneInfo(tz) if tz else None,
    )


def policy_from_json(raw: bytes) -> CompiledPolicy:
    """Load an artifact written by `to_json`; refuses other formats rather than guessing."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompiledPolicyError(f"compiled policy is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CompiledPolicyError(f"compiled policy format {found!r} is not {FORMAT!r}")
    try:
        return policy_from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CompiledPolicyError(f"compiled policy is malformed: {exc!r}") from None
