"""The pure decision function: (policy, request, state snapshot) → Decision. No I/O, no clock reads.

The request is the mapping the wire decoder yields, with the receive time stamped by the engine:
    {"agent_id": str, "tool_id": str, "args": dict, "principal": dict?, "time": epoch seconds?}
Rules are tried top to bottom; a rule matches when its glob and its condition hold; the first match
wins, except that a matching `deny!` anywhere wins over any permit or defer; no match → the agent's
`default` (none → deny). Then, for permits and defers, rate limits and budgets. Never raises: any
failure to decide is a deny.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from faramesh.engine.policy.limits import EMPTY_STATE, StateSnapshot, check_budget, check_rate, estimate_cost_cents
from faramesh.engine.policy.model import Agent, CompiledPolicy, Rule
from faramesh.engine.policy.toolid import canonical_tool_id, glob_matches

PERMIT, DEFER, DENY = "PERMIT", "DEFER", "DENY"
_EFFECTS = {"permit": PERMIT, "defer": DEFER, "deny": DENY}
_CODES = {PERMIT: "POLICY_PERMIT", DEFER: "POLICY_DEFER", DENY: "POLICY_DENY"}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CANDIDATE_CACHE_MAX = 4096
_MAX_TIME = 253_370_764_800  # 9999-01-01T00:00:00Z: budget periods beyond it overflow datetime


@dataclass(frozen=True, slots=True)
class Decision:
    effect: str  # PERMIT | DEFER | DENY
    code: str  # POLICY_PERMIT, POLICY_DEFER, POLICY_DENY, RATE_EXCEEDED, BUDGET_EXCEEDED, …
    rule_ref: str | None
    reason: str
    tool: str | None = None  # canonical (lower-cased) tool id
    notify: str | None = None
    retry_after_seconds: float | None = None
    resets_at: int | None = None
    budget: str | None = None
    budget_warn: bool = False


def _deny(code: str, reason: str, tool: str | None = None, ref: str | None = None) -> Decision:
    return Decision(DENY, code, ref, reason, tool)


def candidates(agent: Agent, tool: str) -> tuple[Rule, ...]:
    """Rules whose glob matches `tool`, in source order (index by literal id and glob prefix)."""
    cached = agent.candidate_cache.get(tool)
    if cached is not None:
        return cached
    hits = list(agent.literal_index.get(tool, ()))
    prefix_index = agent.prefix_index
    for n in agent.prefix_lengths:
        if n > len(tool):
            break
        for i in prefix_index.get(tool[:n], ()):
            rule = agent.rules[i]
            if rule.glob.fullmatch(tool) is not None:
                hits.append(i)
    hits.sort()
    result = tuple(agent.rules[i] for i in hits)
    if len(agent.candidate_cache) >= _CANDIDATE_CACHE_MAX:
        agent.candidate_cache.clear()  # bounded: hostile agents can send endless distinct ids
    agent.candidate_cache[tool] = result
    return result


def _time_fields(policy: CompiledPolicy, when: Any) -> dict[str, Any] | None:
    if type(when) not in (int, float) or when != when:
        return None
    try:
        t = datetime.fromtimestamp(when, policy.timezone or UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return {"hour": t.hour, "minute": t.minute, "weekday": t.isoweekday(), "day": _DAYS[t.weekday()]}


def _decide_rules(agent: Agent, rules: tuple[Rule, ...], ctx: Mapping[str, Any], tool: str) -> Decision:
    first: Rule | None = None
    for rule in rules:
        if rule.predicate is None or rule.predicate(ctx):
            if rule.strict:
                return Decision(
                    DENY, "POLICY_DENY", rule.ref, rule.reason or f"strict deny {rule.pattern}", tool, rule.notify
                )
            if first is None:
                first = rule
                if not agent.has_strict:
                    break
    if first is not None:
        effect = _EFFECTS[first.effect]
        reason = first.reason or f"{first.effect} {first.pattern}" + (" (condition held)" if first.condition else "")
        return Decision(effect, _CODES[effect], first.ref, reason, tool, first.notify)
    if agent.default is None:
        return Decision(DENY, "POLICY_DENY", agent.ref, "no rule matched and the agent has no default", tool)
    effect = _EFFECTS[agent.default]
    return Decision(effect, _CODES[effect], agent.default_ref, f"no rule matched; agent default {agent.default}", tool)


def _apply_limits(
    policy: CompiledPolicy, agent: Agent, decision: Decision, args: dict[str, Any], now: Any, state: StateSnapshot
) -> Decision:
    if type(now) not in (int, float) or not 0 <= now < _MAX_TIME:  # NaN fails the range test too
        return _deny("INVALID_REQUEST", "rate limits and budgets need the request time", decision.tool)
    tool = decision.tool or ""
    for limit in agent.rate_limits:
        if not glob_matches(limit.pattern, tool):
            continue
        result = check_rate(limit, state.rate.get((agent.agent_id, limit.pattern)), float(now))
        if not result.allowed:
            return Decision(
                DENY,
                "RATE_EXCEEDED",
                limit.ref,
                f"rate limit {limit.count} per {limit.unit} for {limit.pattern} reached",
                tool,
                retry_after_seconds=round(result.retry_after_seconds, 3),
            )
    warn_budget: str | None = None
    if agent.budgets:
        call_cost = policy.runtime.get("call_cost", 0)
        estimate = estimate_cost_cents(args, int(call_cost))
        for budget in agent.budgets:
            b = check_budget(budget, state.budgets.get((agent.agent_id, budget.name)), estimate, float(now))
            if not b.allowed:
                reason = f"budget {budget.name} would be exceeded"
                if budget.on_exceed == "deny":
                    return Decision(
                        DENY, "BUDGET_EXCEEDED", budget.ref, reason, tool, resets_at=b.resets_at, budget=budget.name
                    )
                if budget.on_exceed == "defer":
                    return Decision(
                        DEFER, "BUDGET_EXCEEDED", budget.ref, reason, tool, resets_at=b.resets_at, budget=budget.name
                    )
                warn_budget = budget.name  # audit: allowed through, flagged
            elif b.warn and warn_budget is None:
                warn_budget = budget.name
    if warn_budget is not None:
        return Decision(
            decision.effect,
            decision.code,
            decision.rule_ref,
            decision.reason,
            decision.tool,
            decision.notify,
            budget=warn_budget,
            budget_warn=True,
        )
    return decision


def evaluate(policy: CompiledPolicy, request: Mapping[str, Any], state: StateSnapshot | None = None) -> Decision:
    """Decide one request. Never raises; whatever cannot be decided is denied."""
    try:
        return _evaluate(policy, request, state or EMPTY_STATE)
    except Exception as exc:
        return _deny("EVALUATION_ERROR", f"the policy could not be evaluated ({type(exc).__name__})")


def _evaluate(policy: CompiledPolicy, request: Mapping[str, Any], state: StateSnapshot) -> Decision:
    agent_id = request.get("agent_id")
    agent = policy.agents.get(agent_id) if type(agent_id) is str else None
    if agent is None:
        return _deny("UNKNOWN_AGENT", "this agent id is not declared in the policy")
    tool = canonical_tool_id(request.get("tool_id"))
    if tool is None:
        return _deny("TOOL_ID_NOT_CANONICAL", "the tool id is not canonical (see `faramesh explain`)")
    args = request.get("args", {})
    if args is None:
        args = {}
    if type(args) is not dict:
        return _deny("INVALID_REQUEST", "args must be an object", tool)
    principal = request.get("principal") or {}
    rules = candidates(agent, tool)
    ctx: dict[str, Any] = {"args": args, "tool": tool, "agent": agent_id, "principal": principal}
    if agent.needs_time:
        ctx["time"] = _time_fields(policy, request.get("time"))
    decision = _decide_rules(agent, rules, ctx, tool)
    if decision.effect != DENY and (agent.rate_limits or agent.budgets):
        decision = _apply_limits(policy, agent, decision, args, request.get("time"), state)
    return decision
