"""Human-readable forms of compiled policy parts (conditions, rules) for plan, explain and errors."""

from __future__ import annotations

import json
from typing import Any

_OPS = {"not_in": "not in"}
_ROOTS = ("args", "tool", "agent", "principal", "time")  # conditions.ROOTS, without importing re2


def operand_text(node: list[Any]) -> str:
    kind = node[0]
    if kind == "path":
        segs = node[1:]
        # `args.x` reads as the bare `x`, except where the bare name would mean a root (`args.tool` ≠ `tool`).
        shorthand = segs[0] == "args" and len(segs) > 1 and segs[1] not in _ROOTS
        return ".".join(segs[1:]) if shorthand else ".".join(segs)
    if kind == "lit":
        return json.dumps(node[1], ensure_ascii=False)
    if kind == "list":
        return "[" + ", ".join(operand_text(x) for x in node[1:]) + "]"
    return condition_text(node)


def condition_text(cond: Any, parent: str | None = None) -> str:
    if cond is None:
        return ""
    kind = cond[0]
    if kind in ("and", "or"):
        text = f" {kind} ".join(condition_text(c, kind) for c in cond[1:])
        return f"({text})" if parent is not None and parent != kind else text
    if kind == "not":
        return "not " + condition_text(cond[1], "not")
    if kind == "cmp":
        return f"{operand_text(cond[2])} {_OPS.get(cond[1], cond[1])} {operand_text(cond[3])}"
    if kind == "re":
        return f"{operand_text(cond[1])} matches {json.dumps(cond[2])}"
    return json.dumps(cond)


def rule_text(rule: Any) -> str:
    """`permit refund if amount < 25` from a Rule or its dict form."""
    get = rule.get if isinstance(rule, dict) else lambda k, d=None: getattr(rule, k, d)
    effect = str(get("effect")) + ("!" if get("strict") else "")
    tool = get("tool") if isinstance(rule, dict) else rule.pattern
    text = f"{effect} {tool}"
    cond = get("condition")
    if cond is not None:
        text += " if " + condition_text(cond)
    for key in ("notify", "reason"):
        if get(key) is not None:
            text += f" {key} {json.dumps(get(key), ensure_ascii=False)}"
    return text
