"""Re-running recorded requests through a compiled policy: `faramesh explain` (one request, every rule
tried and why) and `faramesh plan --since` (every recent request, under the old and the new policy).

Pure functions over the compiled policy and the evaluator: no I/O, no clock. The WAL keeps each
request's args **redacted**, so a masked field evaluates as the mask string ("[REDACTED]"); the
principal a request carried is not recorded, so conditions on `principal` see `{}`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from faramesh.engine.policy.evaluate import (
    DEFER,
    Decision,
    _decide_rules,
    _time_fields,
    candidates,
    evaluate,
)
from faramesh.engine.policy.limits import EMPTY_STATE, StateSnapshot, check_budget, check_rate, estimate_cost_cents
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.policy.render import condition_text
from faramesh.engine.policy.toolid import canonical_tool_id, glob_matches
from faramesh.engine.wal.dpr import REDACTED

# ------------------------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class RuleTrial:
    index: int  # 1-based position in the agent's rules
    ref: str
    effect: str  # permit | defer | deny (deny! has strict)
    strict: bool
    pattern: str
    condition: str | None  # rendered
    glob_matched: bool
    condition_held: bool | None  # None: the glob did not match, so the condition was not evaluated
    outcome: str  # decided | not reached | overridden | glob mismatch | condition false
    origin: str | None = None

    @property
    def matched(self) -> bool:
        return self.glob_matched and self.condition_held is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "ref": self.ref,
            "effect": self.effect + ("!" if self.strict else ""),
            "tool": self.pattern,
            "condition": self.condition,
            "glob_matched": self.glob_matched,
            "condition_held": self.condition_held,
            "outcome": self.outcome,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class LimitState:
    kind: str  # rate_limit | budget
    name: str
    ref: str
    text: str
    allowed: bool
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "ref": self.ref,
            "text": self.text,
            "allowed": self.allowed,
            **self.detail,
        }


@dataclass(frozen=True)
class Trace:
    agent_id: str | None
    tool: str | None  # canonical
    problem: str | None  # why no rule could be tried (unknown agent, non-canonical tool)
    rules: tuple[RuleTrial, ...]
    default: str | None
    default_ref: str | None
    default_used: bool
    rule_decision: Decision | None  # what the rules (and default) decided, before rate limits and budgets
    decision: Decision  # the whole evaluation with the given state
    limits: tuple[LimitState, ...]
    redacted_paths: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "tool": self.tool,
            "problem": self.problem,
            "rules": [r.to_dict() for r in self.rules],
            "default": self.default,
            "default_ref": self.default_ref,
            "default_used": self.default_used,
            "rule_decision": _decision_dict(self.rule_decision),
            "decision": _decision_dict(self.decision),
            "limits": [lim.to_dict() for lim in self.limits],
            "redacted_paths": list(self.redacted_paths),
        }


def _decision_dict(d: Decision | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"effect": d.effect, "code": d.code, "rule_ref": d.rule_ref, "reason": d.reason}


def redacted_paths(value: Any, prefix: str = "") -> tuple[str, ...]:
    """Dotted paths of the args whose value is the redaction mask."""
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(redacted_paths(v, f"{prefix}{k}."))
    elif isinstance(value, list):
        for v in value:
            out.extend(redacted_paths(v, prefix))
    elif value == REDACTED and prefix:
        out.append(prefix[:-1])
    return tuple(dict.fromkeys(out))


def trace(policy: CompiledPolicy, request: Mapping[str, Any], state: StateSnapshot = EMPTY_STATE) -> Trace:
    """Every rule of the request's agent in order: whether its glob matched (through the evaluator's
    own index, `candidates`) and whether its condition held (its compiled predicate), which one
    decided, and the rate limits and budgets that apply with the state given."""
    decision = evaluate(policy, request, state)
    args = request.get("args") or {}
    hidden = redacted_paths(args)
    agent_id = request.get("agent_id")
    agent = policy.agents.get(agent_id) if isinstance(agent_id, str) else None
    tool = canonical_tool_id(request.get("tool_id"))
    if agent is None or tool is None or not isinstance(args, dict):
        problem = (
            f"agent {agent_id!r} is not declared in this policy"
            if agent is None
            else "the tool id is not canonical"
            if tool is None
            else "args is not an object"
        )
        return Trace(
            agent_id if isinstance(agent_id, str) else None,
            tool,
            problem,
            (),
            None,
            None,
            False,
            None,
            decision,
            (),
            hidden,
        )
    ctx: dict[str, Any] = {"args": args, "tool": tool, "agent": agent_id, "principal": request.get("principal") or {}}
    if agent.needs_time:
        ctx["time"] = _time_fields(policy, request.get("time"))
    hits = candidates(agent, tool)
    hit_indexes = {r.index for r in hits}
    rule_decision = _decide_rules(agent, hits, ctx, tool)
    held_by_index: dict[int, bool | None] = {}
    for rule in agent.rules:
        held: bool | None = None
        if rule.index in hit_indexes:
            try:
                held = True if rule.predicate is None else bool(rule.predicate(ctx))
            except Exception:  # predicates never raise; if one did, it did not hold
                held = False
        held_by_index[rule.index] = held
    # The evaluator's rule: the first matching deny! wins, else the first match (source order).
    matching = [r for r in agent.rules if held_by_index[r.index]]
    strict = [r for r in matching if r.strict]
    winner = strict[0] if strict else (matching[0] if matching else None)
    trials: list[RuleTrial] = []
    for rule in agent.rules:
        held = held_by_index[rule.index]
        if held is None:
            outcome = "glob mismatch"
        elif not held:
            outcome = "condition false"
        elif rule is winner:
            outcome = "decided"
        elif winner is not None and rule.index < winner.index:
            outcome = "overridden"  # it matched first, but a later matching deny! wins over it
        else:
            outcome = "not reached"  # it matches too, but an earlier rule won (first match wins)
        trials.append(
            RuleTrial(
                index=rule.index + 1,
                ref=rule.ref,
                effect=rule.effect,
                strict=rule.strict,
                pattern=rule.pattern,
                condition=condition_text(rule.condition) if rule.condition is not None else None,
                glob_matched=held is not None,
                condition_held=held,
                outcome=outcome,
                origin=rule.origin,
            )
        )
    limits = _limit_states(policy, agent, tool, args, request.get("time"), state)
    return Trace(
        agent.agent_id,
        tool,
        None,
        tuple(trials),
        agent.default,
        agent.default_ref,
        winner is None,
        rule_decision,
        decision,
        limits,
        hidden,
    )


def _limit_states(
    policy: CompiledPolicy, agent: Any, tool: str, args: dict[str, Any], now: Any, state: StateSnapshot
) -> tuple[LimitState, ...]:
    out: list[LimitState] = []
    when = float(now) if type(now) in (int, float) else None
    for limit in agent.rate_limits:
        if not glob_matches(limit.pattern, tool):
            continue
        bucket = state.rate.get((agent.agent_id, limit.pattern))
        detail: dict[str, Any] = {"capacity": limit.count, "unit": limit.unit}
        allowed = True
        if when is not None:
            result = check_rate(limit, bucket, when)
            allowed = result.allowed
            detail.update(
                {"tokens": round(result.tokens, 3), "retry_after_seconds": round(result.retry_after_seconds, 3)}
            )
        out.append(
            LimitState(
                "rate_limit",
                limit.pattern,
                limit.ref,
                f'rate_limit "{limit.pattern}": {limit.count} per {limit.unit}',
                allowed,
                detail,
            )
        )
    if agent.budgets:
        estimate = estimate_cost_cents(args, int(policy.runtime.get("call_cost", 0)))
        for budget in agent.budgets:
            usage = state.budgets.get((agent.agent_id, budget.name))
            detail = {
                "max_cents": budget.max_cents,
                "max_calls": budget.max_calls,
                "on_exceed": budget.on_exceed,
                "estimate_cents": estimate,
                "period": budget.period,
            }
            allowed = True
            if when is not None:
                b = check_budget(budget, usage, estimate, when)
                allowed = b.allowed
                same_period = usage is not None and b.resets_at > when and usage.period_start <= when
                detail.update(
                    {
                        "spent_cents": usage.spent_cents if usage and same_period else 0,
                        "reserved_cents": usage.reserved_cents if usage and same_period else 0,
                        "calls": usage.calls if usage and same_period else 0,
                        "projected_cents": b.projected_cents,
                        "warn": b.warn,
                        "resets_at": b.resets_at,
                    }
                )
            out.append(
                LimitState(
                    "budget", budget.name, budget.ref, f"budget {budget.name} ({budget.period})", allowed, detail
                )
            )
    return tuple(out)


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RecordedRequest:
    """A tool call as the WAL recorded it, args redacted."""

    id: str
    agent_id: str
    tool: str
    args: dict[str, Any]
    time: float | None  # epoch seconds
    policy_effect: str | None  # what the policy decided then (before audit mode)
    policy_code: str | None
    approval_id: str | None = None


@dataclass
class Transition:
    before: str
    after: str
    calls: int = 0
    examples: list[str] = field(default_factory=list)  # DPR ids, for `faramesh explain`

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.before, "to": self.after, "calls": self.calls, "examples": list(self.examples)}


@dataclass
class ReplayReport:
    baseline: str  # "policy" (both sides evaluated) | "recorded" (before = what the WAL says)
    requests: int = 0
    unchanged: int = 0
    skipped: int = 0  # recorded decisions that rate or budget state made (recorded baseline only)
    with_redacted_fields: int = 0
    transitions: dict[tuple[str, str], Transition] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(t.calls for t in self.transitions.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "requests": self.requests,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "skipped": self.skipped,
            "with_redacted_fields": self.with_redacted_fields,
            "transitions": [t.to_dict() for t in self.sorted_transitions()],
        }

    def sorted_transitions(self) -> list[Transition]:
        return sorted(self.transitions.values(), key=lambda t: (-t.calls, t.before, t.after))


_LIMIT_CODES = ("RATE_EXCEEDED", "BUDGET_EXCEEDED")
MAX_EXAMPLES = 5


def recorded_rule_effect(req: RecordedRequest) -> str | None:
    """What the policy's rules said for a recorded request, or None when state (a rate limit or a
    budget) made the decision and the rules' verdict is not in the record."""
    if req.policy_code in _LIMIT_CODES:
        return None
    if req.approval_id is not None:
        return DEFER  # approved (now a permit) or denied by an operator: the rules deferred
    return req.policy_effect


def replay(requests: Iterable[RecordedRequest], new: CompiledPolicy, old: CompiledPolicy | None) -> ReplayReport:
    """Each request under the new policy against, when `old` is given, the same request under the old
    one (same redacted args, fresh rate and budget state on both sides, so only the policy differs),
    else the decision the WAL recorded."""
    report = ReplayReport("policy" if old is not None else "recorded")
    for req in requests:
        request = {"agent_id": req.agent_id, "tool_id": req.tool, "args": req.args, "time": req.time, "principal": {}}
        if old is not None:
            before = evaluate(old, request, EMPTY_STATE).effect
        else:
            recorded = recorded_rule_effect(req)
            if recorded is None:
                report.skipped += 1
                continue
            before = recorded
        after = evaluate(new, request, EMPTY_STATE).effect
        report.requests += 1
        if redacted_paths(req.args):
            report.with_redacted_fields += 1
        if before == after:
            report.unchanged += 1
            continue
        t = report.transitions.setdefault((before, after), Transition(before, after))
        t.calls += 1
        if len(t.examples) < MAX_EXAMPLES:
            t.examples.append(req.id)
    return report
