"""The Cedar side: policies equivalent to the FPL workloads, and Faramesh requests as Cedar requests.

Mapping (printed in the bench's footer too):
- The agent is the principal (`Agent::"support-bot"`), the tool id is the action (`Action::"refund"`)
  and is also in `context.tool`, because Cedar cannot glob an entity id: an FPL glob `svc42/op1*`
  becomes `context.tool like "svc42/op1*"` (Cedar's `*` also spans `/`, as FPL's does). Args are the
  context (`context.amount`), the resource is an unused `Tool::` uid.
- FPL is first-match-wins top to bottom; Cedar is order-free (any forbid wins, else any permit, else
  deny). A permit or defer rule therefore becomes a Cedar `permit` whose `when` also excludes every
  earlier overlapping rule with a different effect (a rule that an earlier unconditional rule fully
  shadows is dropped). A plain `deny` rule needs no Cedar policy: Cedar's default deny is what it
  leaves, and the exclusions are what make it win over later permits. `deny!` becomes `forbid`,
  which wins in both languages.
- Cedar has no defer. A defer rule is a `permit` whose `@id` starts with `defer:`; the bench reads
  the effect back from the determining policy's `@id`, so all three outcomes are compared. By
  construction a permit and a defer policy are never satisfied together.
- Rate limits and budgets have no Cedar equivalent. With the empty state snapshot the bench passes
  they always allow, so decisions agree; Faramesh still runs the checks inside its timed path.
"""

from __future__ import annotations

from typing import Any

from workloads import AGENT, Atom, BenchRule

# The seed, written the way a Cedar user would, next to the FPL it mirrors.
SEED_CEDAR = """\
// permit knowledgebase/search
@id("permit:kb-search")
permit (principal == Agent::"support-bot", action == Action::"knowledgebase/search", resource);

// permit ticket/read
@id("permit:ticket-read")
permit (principal == Agent::"support-bot", action == Action::"ticket/read", resource);

// permit refund if amount < $25
@id("permit:refund-small")
permit (principal == Agent::"support-bot", action == Action::"refund", resource)
when { context.amount < 25 };

// defer refund if amount < $500 (first match wins in FPL, so the permit above is excluded)
@id("defer:refund-medium")
permit (principal == Agent::"support-bot", action == Action::"refund", resource)
when { context.amount >= 25 && context.amount < 500 };

// deny refund: Cedar's default deny. A forbid would override the permits above.
// rate_limit and budget: no Cedar equivalent (they allow on the bench's empty state).
"""


def _cedar_literal(value: int | str | tuple[str, ...]) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _atom(atom: Atom) -> str:
    name, op, value = atom
    if op == "in":
        return f"{_cedar_literal(value)}.contains(context.{name})"
    return f"context.{name} {op} {_cedar_literal(value)}"


def _cond(cond: tuple[Atom, ...]) -> list[str]:
    return [_atom(a) for a in cond]


def _tool_test(rule: BenchRule) -> str:
    if rule.is_glob:
        return f'context.tool like "{rule.pattern}"'
    return f'action == Action::"{rule.pattern}"'


def _overlap(later: BenchRule, earlier: BenchRule) -> str:
    """How `earlier`'s tool set relates to `later`'s: 'covers', 'partial' or 'none'.

    Exact for the shapes the generator emits (literal ids and globs with one trailing `*`)."""
    if not later.is_glob:
        return "covers" if earlier.matches(later.pattern) else "none"
    if earlier.is_glob and later.prefix.startswith(earlier.prefix):
        return "covers"
    if earlier.prefix.startswith(later.prefix):
        return "partial"
    return "none"


def translate(rules: list[BenchRule]) -> tuple[str, dict[str, int]]:
    """Cedar text equivalent to an agent with these rules and `default deny`, plus counts."""
    for r in rules:
        if "*" in r.prefix:
            raise ValueError(f"translate() handles only one trailing `*`: {r.pattern}")
    scope_principal = f'principal == Agent::"{AGENT}"'
    policies: list[str] = []
    counts = {"permit": 0, "defer": 0, "forbid": 0, "dropped": 0}
    for i, rule in enumerate(rules):
        scope_action = "action" if rule.is_glob else f'action == Action::"{rule.pattern}"'
        clauses = [f'context.tool like "{rule.pattern}"'] if rule.is_glob else []
        clauses += _cond(rule.cond)
        if rule.strict:
            policies.append(_policy(f"forbid:r{i}", "forbid", scope_principal, scope_action, clauses))
            counts["forbid"] += 1
            continue
        if rule.effect == "deny":
            continue  # default deny covers it; it acts through the exclusions of later rules
        dead = False
        for earlier in rules[:i]:
            if earlier.strict or earlier.effect == rule.effect:
                continue  # deny! is a forbid anyway; same effect cannot change the outcome
            rel = _overlap(rule, earlier)
            if rel == "none":
                continue
            if rel == "covers" and not earlier.cond:
                dead = True  # fully shadowed by an earlier unconditional rule
                break
            test = _cond(earlier.cond) if rel == "covers" else [_tool_test(earlier), *_cond(earlier.cond)]
            clauses.append("!(" + " && ".join(test) + ")")
        if dead:
            counts["dropped"] += 1
            continue
        policies.append(_policy(f"{rule.effect}:r{i}", "permit", scope_principal, scope_action, clauses))
        counts[rule.effect] += 1
    return "\n".join(policies), counts


def _policy(pid: str, kind: str, principal: str, action: str, clauses: list[str]) -> str:
    when = f"\nwhen {{ {' && '.join(clauses)} }}" if clauses else ""
    return f'@id("{pid}")\n{kind} ({principal}, {action}, resource){when};\n'


def cedar_request(request: dict[str, Any]) -> dict[str, Any]:
    """The Cedar request for a Faramesh wire request. Built outside the timed loop (see run.py).

    Uids are given as {"type", "id"} dicts: measured faster in cedarpy than `Type::"id"` strings,
    which it parses, so this is Cedar's best case."""
    tool = request["tool_id"]
    return {
        "principal": {"type": "Agent", "id": request["agent_id"]},
        "action": {"type": "Action", "id": tool},
        "resource": {"type": "Tool", "id": tool},
        "context": {"tool": tool, **request["args"]},
    }


def effect_of(result: Any) -> str:
    """PERMIT / DEFER / DENY from a cedarpy AuthzResult, using the determining policy's @id."""
    if not result.allowed:
        return "DENY"
    ids = result.diagnostics.id_annotations_by_reason.values()
    return "DEFER" if ids and all(i.startswith("defer:") for i in ids) else "PERMIT"
