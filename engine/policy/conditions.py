"""Conditions: validate the JSON-shaped expression (ast.Cond) and compile it to a predicate.

Semantics (documented in the README):
- A comparison whose field is missing, or whose operands are of incompatible types, is false —
  `!=` and `not in` included. `not` negates the result of what it wraps. Evaluation never raises.
- Numbers compare with numbers (booleans are not numbers), strings with strings. `==` on lists
  compares element-wise with the same rules.
- `in` / `not in`: the right side is a list (element membership) or a string (substring).
  `contains` is the mirror image. `matches` / `=~` is an RE2 *search* (unanchored; add ^…$ to anchor):
  linear time, no backtracking, so an agent's argument cannot stall the engine.
- Bare names are arguments: `amount` is `args.amount`. The roots are args, tool, agent, principal, time.
  `time.hour` (0–23), `time.minute`, `time.weekday` (ISO: 1 = Monday … 7 = Sunday) and `time.day`
  ("mon" … "sun") are in the runtime timezone (UTC unless `runtime { timezone }`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import re2
from faramesh.engine.policy.ast import Cond
from faramesh.engine.policy.errors import PolicySchemaError, SourcePos

Predicate = Callable[[Mapping[str, Any]], bool]

ROOTS = ("args", "tool", "agent", "principal", "time")
TIME_FIELDS = ("hour", "minute", "weekday", "day")
CMP_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not_in", "contains")
_MISSING = object()


class _Unsupported(Exception):
    pass


def normalize(cond: Cond, pos: SourcePos | None) -> Cond:
    """Check shape and rewrite bare names to `args.<name>`; the result is what the artifact stores."""

    def operand(node: Any) -> Cond:
        if not isinstance(node, list) or not node:
            raise PolicySchemaError(f"malformed operand {node!r}", pos=pos)
        kind = node[0]
        if kind == "path":
            segs = [str(s) for s in node[1:]]
            if not segs:
                raise PolicySchemaError("empty field path", pos=pos)
            if segs[0] not in ROOTS:
                segs = ["args", *segs]
            if segs[0] in ("tool", "agent") and len(segs) > 1:
                raise PolicySchemaError(f"`{segs[0]}` is a string and has no fields", pos=pos)
            if segs[0] == "time" and (len(segs) != 2 or segs[1] not in TIME_FIELDS):
                raise PolicySchemaError(
                    f"unknown time field `{'.'.join(segs)}`; use one of " + ", ".join(f"time.{f}" for f in TIME_FIELDS),
                    pos=pos,
                )
            return ["path", *segs]
        if kind == "lit":
            value = node[1] if len(node) == 2 else None
            if not isinstance(value, str | int | float | bool) or value is None:
                raise PolicySchemaError(f"unsupported literal {value!r}", pos=pos)
            return ["lit", value]
        if kind == "list":
            return ["list", *(operand(x) for x in node[1:])]
        if kind in ("and", "or", "not", "cmp", "re"):
            raise PolicySchemaError("a condition cannot be used as a value here; compare it instead", pos=pos)
        raise PolicySchemaError(f"unknown operand kind {kind!r}", pos=pos)

    def walk(node: Any) -> Cond:
        if not isinstance(node, list) or not node:
            raise PolicySchemaError(f"malformed condition {node!r}", pos=pos)
        kind = node[0]
        if kind in ("and", "or"):
            if len(node) < 3:
                raise PolicySchemaError(f"`{kind}` needs two operands", pos=pos)
            return [kind, *(walk(x) for x in node[1:])]
        if kind == "not":
            return ["not", walk(node[1])]
        if kind == "cmp":
            if len(node) != 4 or node[1] not in CMP_OPS:
                raise PolicySchemaError(f"unknown comparison {node[1:2]!r}", pos=pos)
            left, right = operand(node[2]), operand(node[3])
            if left == ["path", "tool"]:
                right = _lower_literals(right)
            elif right == ["path", "tool"]:
                left = _lower_literals(left)
            return ["cmp", node[1], left, right]
        if kind == "re":
            pattern = node[2]
            if not isinstance(pattern, str):
                raise PolicySchemaError("a regex must be a string", pos=pos)
            target = operand(node[1])
            if target == ["path", "tool"] and not pattern.startswith("(?i)"):
                # Tool ids match case-insensitively everywhere, so `tool =~ "^Shell/"` must too.
                pattern = "(?i)" + pattern
            regex_problem(pattern, pos)
            return ["re", target, pattern]
        raise PolicySchemaError(f"unknown condition kind {kind!r}", pos=pos)

    return walk(cond)


def _lower_literals(node: Cond) -> Cond:
    """`tool` holds the lower-cased canonical id; literals compared with it are lower-cased to match."""
    if node[0] == "lit" and isinstance(node[1], str):
        return ["lit", node[1].lower()]
    if node[0] == "list":
        return ["list", *(_lower_literals(x) for x in node[1:])]
    return node


def regex_problem(pattern: str, pos: SourcePos | None) -> None:
    """Reject what RE2 cannot run (backreferences, lookaround) with a message that says so."""
    try:
        re2.compile(pattern)
    except re2.error as exc:
        hint = ""
        if any(tok in pattern for tok in ("(?=", "(?!", "(?<=", "(?<!")):
            hint = " (lookahead/lookbehind need backtracking, which the engine refuses)"
        elif re2.compile(r"\\[1-9]").search(pattern):
            hint = " (backreferences need backtracking, which the engine refuses)"
        raise PolicySchemaError(f"regex {pattern!r} is not supported: {exc}{hint}", pos=pos) from None


def uses_time(cond: Cond | tuple[Any, ...]) -> bool:
    if not isinstance(cond, list | tuple) or not cond:
        return False
    if cond[0] == "path":
        return len(cond) > 1 and cond[1] == "time"
    return any(uses_time(x) for x in cond[1:] if isinstance(x, list | tuple))


# ---- compilation to closures -------------------------------------------------------------------

Getter = Callable[[Mapping[str, Any]], Any]


def _getter(node: Cond) -> Getter:
    kind = node[0]
    if kind == "lit":
        value = node[1]
        return lambda _ctx: value
    if kind == "list":
        items = [_getter(x) for x in node[1:]]
        return lambda ctx: [g(ctx) for g in items]
    segs = node[1:]
    root = segs[0]
    rest = tuple(segs[1:])
    if not rest:
        return lambda ctx: ctx.get(root, _MISSING)
    if len(rest) == 1:
        key = rest[0]

        def get1(ctx: Mapping[str, Any]) -> Any:
            base = ctx.get(root)
            if isinstance(base, dict):
                return base.get(key, _MISSING)
            return _MISSING

        return get1

    def get_n(ctx: Mapping[str, Any]) -> Any:
        value = ctx.get(root, _MISSING)
        for key in rest:
            if not isinstance(value, dict):
                return _MISSING
            value = value.get(key, _MISSING)
        return value

    return get_n


def _is_num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and v == v  # NaN compares false everywhere


def _kind(v: Any) -> str | None:
    if type(v) is bool:
        return "bool"
    if _is_num(v):
        return "num"
    if type(v) is str:
        return "str"
    if type(v) is list:
        return "list"
    if v is None:
        return "null"
    return None


def typed_equal(a: Any, b: Any) -> bool | None:
    """Equality within one type class; None when the classes differ (the comparison is then false)."""
    ka, kb = _kind(a), _kind(b)
    if ka is None or ka != kb:
        return None
    if ka != "list":
        return bool(a == b)
    # Lists: iterative, so arguments nested deeper than Python's recursion limit still compare.
    pending = [(a, b)]
    seen: set[tuple[int, int]] = set()
    while pending:
        x, y = pending.pop()
        if (id(x), id(y)) in seen:
            continue
        seen.add((id(x), id(y)))
        if len(x) != len(y):
            return False
        for p, q in zip(x, y, strict=True):
            kp = _kind(p)
            if kp is None or kp != _kind(q):
                return False
            if kp == "list":
                pending.append((p, q))
            elif p != q:
                return False
    return True


def _member(needle: Any, hay: Any) -> bool | None:
    if type(hay) is list:
        if _kind(needle) is None:
            return None
        return any(typed_equal(needle, item) is True for item in hay)
    if type(hay) is str and type(needle) is str:
        return needle in hay
    return None


def _cmp(op: str, left: Getter, right: Getter) -> Predicate:
    if op == "==":

        def eq(ctx: Mapping[str, Any]) -> bool:
            return typed_equal(left(ctx), right(ctx)) is True

        return eq
    if op == "!=":

        def ne(ctx: Mapping[str, Any]) -> bool:
            return typed_equal(left(ctx), right(ctx)) is False

        return ne
    if op in ("<", "<=", ">", ">="):
        import operator

        fn = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}[op]

        def order(ctx: Mapping[str, Any]) -> bool:
            a, b = left(ctx), right(ctx)
            if _is_num(a) and _is_num(b):
                return bool(fn(a, b))
            if type(a) is str and type(b) is str:
                return bool(fn(a, b))
            return False

        return order
    if op == "in":
        return lambda ctx: _member(left(ctx), right(ctx)) is True
    if op == "not_in":
        return lambda ctx: _member(left(ctx), right(ctx)) is False
    if op == "contains":
        return lambda ctx: _member(right(ctx), left(ctx)) is True
    raise _Unsupported(op)


def compile_predicate(cond: Cond) -> Predicate:
    """Compile a normalised condition. The result never raises for any context."""
    kind = cond[0]
    if kind == "and":
        parts = [compile_predicate(c) for c in cond[1:]]
        if len(parts) == 2:
            p, q = parts
            return lambda ctx: p(ctx) and q(ctx)
        return lambda ctx: all(p(ctx) for p in parts)
    if kind == "or":
        parts = [compile_predicate(c) for c in cond[1:]]
        if len(parts) == 2:
            p, q = parts
            return lambda ctx: p(ctx) or q(ctx)
        return lambda ctx: any(p(ctx) for p in parts)
    if kind == "not":
        inner = compile_predicate(cond[1])
        return lambda ctx: not inner(ctx)
    if kind == "cmp":
        return _cmp(cond[1], _getter(cond[2]), _getter(cond[3]))
    if kind == "re":
        get = _getter(cond[1])
        regex = re2.compile(cond[2])

        def search(ctx: Mapping[str, Any]) -> bool:
            value = get(ctx)
            return type(value) is str and regex.search(value) is not None

        return search
    raise _Unsupported(kind)
