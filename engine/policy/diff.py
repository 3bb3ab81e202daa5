"""Policy diff for `faramesh plan`: what the new compiled policy adds, removes and changes.

Works on the dict form of two compiled policies (the artifact JSON), so it can compare against an
applied `.faramesh/policy.json` or what a running engine reports without rebuilding either.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from faramesh.engine.policy.render import rule_text


@dataclass(frozen=True)
class Change:
    op: str  # + - ~
    # agent | rule | rule_order | default | command | framework | rate_limit | budget | redaction | setting | alert
    # | provider | identity | runtime | import | trust
    kind: str
    key: str
    agent: str | None = None
    before: Any = None
    after: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "kind": self.kind,
            "key": self.key,
            "agent": self.agent,
            "before": self.before,
            "after": self.after,
        }

    def text(self) -> str:
        where = f'agent "{self.agent}" ' if self.agent else ""
        what = f"{self.kind} {self.key}" if self.key else self.kind
        if self.op == "~":
            return f"~ {where}{what}: {_short(self.before)} → {_short(self.after)}"
        value = self.after if self.op == "+" else self.before
        if self.kind == "rule" and isinstance(value, dict):
            # The whole rule, condition included: `+ rule permit refund` alone would read as "all refunds".
            ref = f" ({value['ref']})" if value.get("ref") else ""
            return f"{self.op} {where}rule {rule_text(value)}{ref}"
        shown = "" if self.kind == "agent" else f" = {_short(value)}"
        return f"{self.op} {where}{what}{shown}"


def _short(value: Any) -> str:
    if isinstance(value, dict) and "effect" in value and "tool" in value:
        return rule_text(value)
    return repr(value) if not isinstance(value, str) else value


def _keyed(items: list[dict[str, Any]], key_fn: Any) -> dict[str, dict[str, Any]]:
    seen: Counter[str] = Counter()
    out = {}
    for item in items:
        base = key_fn(item)
        seen[base] += 1
        out[base if seen[base] == 1 else f"{base} #{seen[base]}"] = item
    return out


def _strip_refs(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "ref"}


def _diff_maps(kind: str, old: dict[str, Any], new: dict[str, Any], agent: str | None, out: list[Change]) -> None:
    for key in sorted(set(old) | set(new)):
        if key not in old:
            out.append(Change("+", kind, key, agent, None, new[key]))
        elif key not in new:
            out.append(Change("-", kind, key, agent, old[key], None))
        else:
            a, b = old[key], new[key]
            if isinstance(a, dict) and isinstance(b, dict):
                a, b = _strip_refs(a), _strip_refs(b)
            if a != b:
                out.append(Change("~", kind, key, agent, a, b))


def diff_policies(old: dict[str, Any] | None, new: dict[str, Any]) -> list[Change]:
    old = old or {}
    out: list[Change] = []
    _diff_maps("runtime", old.get("runtime", {}), new.get("runtime", {}), None, out)
    _diff_maps("provider", old.get("providers", {}), new.get("providers", {}), None, out)
    _diff_maps("identity", old.get("identities", {}), new.get("identities", {}), None, out)
    _diff_maps(
        "import",
        {i["path"]: i for i in old.get("imports", [])},
        {i["path"]: i for i in new.get("imports", [])},
        None,
        out,
    )
    _diff_maps(
        "trust",
        {t["publisher"]: t["key"] for t in old.get("trust", [])},
        {t["publisher"]: t["key"] for t in new.get("trust", [])},
        None,
        out,
    )
    old_agents, new_agents = old.get("agents", {}), new.get("agents", {})
    for agent_id in sorted(set(old_agents) | set(new_agents)):
        if agent_id not in old_agents:
            out.append(Change("+", "agent", f'"{agent_id}"', None, None, agent_id))
            a_old: dict[str, Any] = {}
        elif agent_id not in new_agents:
            out.append(Change("-", "agent", f'"{agent_id}"', None, agent_id, None))
            continue
        else:
            a_old = old_agents[agent_id]
        a_new = new_agents[agent_id]
        if a_old and a_old.get("default") != a_new.get("default"):
            out.append(Change("~", "default", "", agent_id, a_old.get("default"), a_new.get("default")))
        for field in ("command", "framework"):
            if a_old and a_old.get(field) != a_new.get(field):
                out.append(Change("~", field, "", agent_id, a_old.get(field), a_new.get(field)))

        def rule_key(r: dict[str, Any]) -> str:
            return f"{r['effect']}{'!' if r.get('strict') else ''} {r['tool']}"

        old_rules, new_rules = _keyed(a_old.get("rules", []), rule_key), _keyed(a_new.get("rules", []), rule_key)
        _diff_maps("rule", old_rules, new_rules, agent_id, out)
        # First match wins, so moving a rule changes decisions even when every rule is unchanged.
        kept_old = [k for k in old_rules if k in new_rules]
        kept_new = [k for k in new_rules if k in old_rules]
        if kept_old != kept_new:
            out.append(Change("~", "rule_order", "", agent_id, kept_old, kept_new))
        _diff_maps(
            "rate_limit",
            _keyed(a_old.get("rate_limits", []), lambda r: r["tool"]),
            _keyed(a_new.get("rate_limits", []), lambda r: r["tool"]),
            agent_id,
            out,
        )
        _diff_maps(
            "budget",
            {b["name"]: b for b in a_old.get("budgets", [])},
            {b["name"]: b for b in a_new.get("budgets", [])},
            agent_id,
            out,
        )
        _diff_maps(
            "redaction",
            _keyed(a_old.get("redactions", []), lambda r: r["tool"]),
            _keyed(a_new.get("redactions", []), lambda r: r["tool"]),
            agent_id,
            out,
        )
        _diff_maps("setting", a_old.get("settings", {}), a_new.get("settings", {}), agent_id, out)
        _diff_maps(
            "alert",
            _keyed(a_old.get("alerts", []), lambda a: str(a.get("on"))),
            _keyed(a_new.get("alerts", []), lambda a: str(a.get("on"))),
            agent_id,
            out,
        )
    return out
