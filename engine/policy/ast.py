"""The FPL syntax tree, shared by the FPL parser and the YAML/JSON loaders.

Conditions are kept as plain nested tuples/lists (see `Cond`) because they travel unchanged into
the compiled artifact and back: one representation, no conversion layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from faramesh.engine.policy.errors import SourcePos


@dataclass(frozen=True)
class EnvRef:
    """`env("NAME")`: resolved at compile time, or kept as a reference in secret fields."""

    name: str
    pos: SourcePos


@dataclass(frozen=True)
class BareWord:
    """An unquoted word used as a value (`on_exceed defer`, `backend = sqlite`)."""

    word: str


Value = Union[str, int, float, bool, EnvRef, BareWord, tuple["Value", ...]]  # noqa: UP007 - recursive alias

# Condition expression, JSON-shaped:
#   ["and", c, c, ...] | ["or", c, c, ...] | ["not", c]
#   ["cmp", op, operand, operand]   op in == != < <= > >= in not_in contains
#   ["re", operand, pattern]
#   operand: ["path", seg, ...] | ["lit", value] | ["list", operand, ...]
Cond = list[Any]


@dataclass(frozen=True)
class Assignment:
    name: str
    value: Value
    pos: SourcePos


@dataclass(frozen=True)
class Block:
    kind: str
    label: str | None
    fields: tuple[Assignment, ...]
    pos: SourcePos


@dataclass(frozen=True)
class ImportDecl:
    path: str
    alias: str | None
    pos: SourcePos


@dataclass(frozen=True)
class TrustKeyDecl:
    publisher: str
    key: str  # "ed25519:<b64>"
    pos: SourcePos


@dataclass(frozen=True)
class RuleDecl:
    effect: str  # permit | defer | deny
    strict: bool  # deny!
    pattern: str
    condition: Cond | None
    notify: str | None
    reason: str | None
    pos: SourcePos
    # `credential "vault:stripe#api_key"`: the secret the engine brokers into this rule's permits
    # (providers/protocol.py SecretRef syntax; checked against the declared providers by the compiler).
    credential: str | None = None
    # `… via "POST http://api.example.com/v1/x [Header]"`: proxy-tier delivery — the egress proxy puts the
    # secret into that one plain-HTTP request and the agent only ever holds a placeholder.
    credential_via: str | None = None


@dataclass(frozen=True)
class RateLimitDecl:
    pattern: str
    count: int | float
    unit: str
    pos: SourcePos


@dataclass(frozen=True)
class BudgetDecl:
    name: str
    fields: tuple[Assignment, ...]
    pos: SourcePos


@dataclass(frozen=True)
class RedactDecl:
    pattern: str
    paths: tuple[Value, ...]
    pos: SourcePos


@dataclass(frozen=True)
class AgentDecl:
    agent_id: str
    pos: SourcePos
    default: str | None = None
    default_pos: SourcePos | None = None
    framework: str | None = None
    rules: tuple[RuleDecl, ...] = ()
    rate_limits: tuple[RateLimitDecl, ...] = ()
    budgets: tuple[BudgetDecl, ...] = ()
    redactions: tuple[RedactDecl, ...] = ()
    blocks: tuple[Block, ...] = ()  # egress, model_policy, session, alert (repeatable)
    fields: tuple[Assignment, ...] = ()  # command = "…"


@dataclass(frozen=True)
class PolicyFile:
    """One parsed source file (the stack's own file or an imported artifact)."""

    name: str
    imports: tuple[ImportDecl, ...] = ()
    blocks: tuple[Block, ...] = ()  # runtime, provider "x", identity "x", unknown ones
    trust: tuple[TrustKeyDecl, ...] = ()
    agents: tuple[AgentDecl, ...] = ()
    flat_rules: tuple[RuleDecl, ...] = field(default=())
