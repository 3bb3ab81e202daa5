"""Property tests (hypothesis; the `ci` profile runs ≥ 200 examples each).

(a) compile is deterministic; (b) evaluation never raises, whatever the request; (c) random bytes
and mutated valid files make `faramesh check` fail with a message, never a traceback; (d) random
policies give the same decisions in the engine and in the naive first-match interpreter below,
which is written from the documented semantics only (it shares no code with the engine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.errors import FarameshError
from faramesh.engine.policy.evaluate import DEFER, DENY, PERMIT, Decision, evaluate
from faramesh.engine.policy.limits import BudgetUsage, RateBucket, StateSnapshot
from faramesh.engine.policy.model import CompiledPolicy, policy_from_json
from faramesh.engine.policy.parser import parse_fpl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

T0 = 1767225600  # 2026-01-01T00:00:00Z
EFFECTS = (PERMIT, DEFER, DENY)


def compile_text(text: str) -> CompiledPolicy:
    return compile_files(parse_fpl(text, "governance.fms"), {"governance.fms": "x"}, env={})


# =================================================================================================
# A random policy model, its FPL rendering, and a naive interpreter for it
# =================================================================================================

MISSING = object()

PATHS = [
    "n",
    "args.n",
    "s",
    "l",
    "b",
    "flagged",
    "d.x",
    "args.d.x",
    "missing",
    "principal.groups",
    "principal.role",
    "tool",
    "agent",
    "time.hour",
    "time.weekday",
    "time.minute",
    "time.day",
]
SCALARS: list[Any] = [0, 1, 5, 9, 12, 17, 23, -3, 2.5, "", "a", "ab", "A", "a/b", "admin", "thu", "sat", True, False]
REGEXES = ["^a", "b$", "a.c", "^[ab]+$", "(?i)AB", "x|y", "", "/", "^a/b$", "\\d", "^$", "^t"]
CMP_OPS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in", "contains"]
PATTERNS = ["*", "a/*", "a/b", "a/b/c", "*/c", "b*", "A/B", "*b*", "x", "a*b", "*_s", "q_s", "a", "*/*"]
AGENT_IDS = ["a", "b", "team/c", "Bot-1"]
TIMEZONES = [None, "UTC", "Asia/Tokyo", "America/New_York", "Asia/Kolkata"]


# Conditions are tuples:
#   ("cmp", op, left, right) with operands ("path", "a.b") | ("lit", value) | ("list", [values])
#   ("re", path, regex) | ("bare", path) | ("and", c, c, ...) | ("or", c, c, ...) | ("not", c)

path_op = st.sampled_from(PATHS).map(lambda p: ("path", p))
lit_op = st.sampled_from(SCALARS).map(lambda v: ("lit", v))
list_op = st.lists(st.sampled_from(SCALARS), max_size=3).map(lambda vs: ("list", vs))
value_op = st.one_of(lit_op, list_op)

cmp_cond = st.one_of(
    st.tuples(st.just("cmp"), st.sampled_from(CMP_OPS), path_op, value_op),  # path op value: the usual shape
    st.tuples(st.just("cmp"), st.sampled_from(CMP_OPS), value_op, path_op),  # value op path
    st.tuples(st.just("cmp"), st.sampled_from(CMP_OPS), path_op, path_op),  # path op path
)
re_cond = st.tuples(st.just("re"), st.sampled_from(PATHS), st.sampled_from(REGEXES))
bare_cond = st.tuples(st.just("bare"), st.sampled_from(["flagged", "b", "n", "principal.role"]))
time_cond = st.one_of(
    st.tuples(
        st.just("cmp"),
        st.sampled_from(["==", "!=", "<", ">="]),
        st.sampled_from(["time.hour", "time.weekday", "time.minute"]).map(lambda p: ("path", p)),
        st.integers(0, 23).map(lambda v: ("lit", v)),
    ),
    st.tuples(
        st.just("cmp"),
        st.just("=="),
        st.just(("path", "time.day")),
        st.sampled_from(["wed", "thu", "fri"]).map(lambda v: ("lit", v)),
    ),
)
group_cond = st.tuples(
    st.just("cmp"),
    st.sampled_from(["in", "not in"]),
    st.sampled_from(["admin", "ops", "a"]).map(lambda v: ("lit", v)),
    st.just(("path", "principal.groups")),
)
leaf_cond = st.one_of(cmp_cond, cmp_cond, re_cond, bare_cond, time_cond, group_cond)
conditions = st.recursive(
    leaf_cond,
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.lists(inner, min_size=2, max_size=3).map(lambda cs: ("and", *cs)),
        st.lists(inner, min_size=2, max_size=3).map(lambda cs: ("or", *cs)),
    ),
    max_leaves=6,
)


@dataclass
class RRule:
    effect: str  # permit | defer | deny | deny!
    pattern: str
    cond: Any
    quoted: bool
    line: int = 0


@dataclass
class RAgent:
    agent_id: str
    default: str | None
    rules: list[RRule]
    rules_block: bool
    line: int = 0
    default_line: int = 0


@dataclass
class RPolicy:
    agents: list[RAgent]
    flat: list[RRule]  # v0 top-level rules → agent "default"
    timezone: str | None
    text: str = ""


rules_st = st.builds(
    RRule,
    effect=st.sampled_from(["permit", "defer", "deny", "deny!"]),
    pattern=st.sampled_from(PATTERNS),
    cond=st.one_of(st.none(), conditions),
    quoted=st.booleans(),
)


@st.composite
def policies(draw: st.DrawFn) -> RPolicy:
    ids = draw(st.lists(st.sampled_from(AGENT_IDS), min_size=0, max_size=3, unique=True))
    agents = [
        RAgent(
            agent_id,
            draw(st.sampled_from([None, "permit", "defer", "deny"])),
            draw(st.lists(rules_st, max_size=6)),
            draw(st.booleans()),
        )
        for agent_id in ids
    ]
    with_flat = draw(st.booleans()) or not agents
    flat = draw(st.lists(rules_st, min_size=0 if agents else 1, max_size=4)) if with_flat else []
    policy = RPolicy(agents, flat, draw(st.sampled_from(TIMEZONES)))
    policy.text = render(policy)
    return policy


def render_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(render_value(x) for x in v) + "]"
    return repr(v)


def render_operand(op: tuple[str, Any]) -> str:
    kind, value = op
    return value if kind == "path" else render_value(value)


def render_cond(c: Any) -> str:
    kind = c[0]
    if kind == "cmp":
        return f"{render_operand(c[2])} {c[1]} {render_operand(c[3])}"
    if kind == "re":
        return f"{c[1]} =~ {json.dumps(c[2])}"
    if kind == "bare":
        return c[1]
    if kind == "not":
        return f"not ({render_cond(c[1])})"
    return f" {kind} ".join(f"({render_cond(x)})" for x in c[1:])


def render_rule(r: RRule) -> str:
    pattern = json.dumps(r.pattern) if r.quoted else r.pattern
    out = f"{r.effect} {pattern}"
    if r.cond is not None:
        out += f" if {render_cond(r.cond)}"
    return out


def render(p: RPolicy) -> str:
    lines: list[str] = ["# generated"]
    if p.timezone:
        lines.append(f'runtime {{ timezone = "{p.timezone}" }}')
    for a in p.agents:
        lines.append(f"agent {json.dumps(a.agent_id)} {{")
        a.line = len(lines)
        if a.default:
            lines.append(f"  default {a.default}")
            a.default_line = len(lines)
        if a.rules_block:
            lines.append("  rules {")
        for r in a.rules:
            lines.append("    " + render_rule(r))
            r.line = len(lines)
        if a.rules_block:
            lines.append("  }")
        lines.append("}")
    for r in p.flat:
        lines.append(render_rule(r))
        r.line = len(lines)
    return "\n".join(lines) + "\n"


# ---- the naive interpreter -----------------------------------------------------------------------

_SEGMENT = re.compile(r"[A-Za-z0-9_.:@+\-]+")


def naive_canonical(raw: Any) -> str | None:
    if not isinstance(raw, str) or not raw or len(raw) > 256:
        return None
    text = unicodedata.normalize("NFKC", raw)
    if not text.isascii() or len(text) > 256:
        return None
    for seg in text.split("/"):
        if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
            return None
    return text.lower()


def naive_glob(pattern: str, tool: str) -> bool:
    regex = "".join(".*" if ch == "*" else re.escape(ch) for ch in pattern.lower())
    return re.fullmatch(regex, tool, re.DOTALL) is not None


def kind_of(v: Any) -> str | None:
    if v is MISSING:
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return None if v != v else "num"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    if v is None:
        return "null"
    return None  # objects and anything else compare with nothing


def naive_eq(a: Any, b: Any) -> bool | None:
    ka, kb = kind_of(a), kind_of(b)
    if ka is None or ka != kb:
        return None
    if ka == "list":
        return len(a) == len(b) and all(naive_eq(x, y) is True for x, y in zip(a, b, strict=True))
    return a == b


def naive_member(needle: Any, hay: Any) -> bool | None:
    """Membership: a list holds the needle (by typed equality), or a string holds a substring."""
    if isinstance(hay, list):
        if kind_of(needle) is None:
            return None
        return any(naive_eq(needle, x) is True for x in hay)
    if isinstance(hay, str) and isinstance(needle, str):
        return needle in hay
    return None


def lookup(ctx: dict[str, Any], dotted: str) -> Any:
    segs = dotted.split(".")
    if segs[0] not in ("args", "tool", "agent", "principal", "time"):
        segs = ["args", *segs]
    value: Any = ctx
    for seg in segs:
        if not isinstance(value, dict):
            return MISSING
        value = value.get(seg, MISSING)
    return value


def operand_value(ctx: dict[str, Any], op: tuple[str, Any]) -> Any:
    kind, value = op
    return lookup(ctx, value) if kind == "path" else value


def holds(c: Any, ctx: dict[str, Any]) -> bool:
    kind = c[0]
    if kind == "and":
        return all(holds(x, ctx) for x in c[1:])
    if kind == "or":
        return any(holds(x, ctx) for x in c[1:])
    if kind == "not":
        return not holds(c[1], ctx)
    if kind == "bare":
        return naive_eq(lookup(ctx, c[1]), True) is True
    if kind == "re":
        value = lookup(ctx, c[1])
        return isinstance(value, str) and re.search(c[2], value) is not None
    op, left, right = c[1], operand_value(ctx, c[2]), operand_value(ctx, c[3])
    if op == "==":
        return naive_eq(left, right) is True
    if op == "!=":
        return naive_eq(left, right) is False
    if op in ("<", "<=", ">", ">="):
        ka, kb = kind_of(left), kind_of(right)
        if ka != kb or ka not in ("num", "str"):
            return False
        return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    if op == "in":
        return naive_member(left, right) is True
    if op == "not in":
        return naive_member(left, right) is False
    if op == "contains":
        return naive_member(right, left) is True
    raise AssertionError(op)


def naive_time(when: Any, tz: str | None) -> dict[str, Any] | None:
    if isinstance(when, bool) or not isinstance(when, int | float) or when != when:
        return None
    try:
        t = datetime.fromtimestamp(when, ZoneInfo(tz or "UTC"))
    except (OverflowError, OSError, ValueError):
        return None
    return {"hour": t.hour, "minute": t.minute, "weekday": t.isoweekday(), "day": t.strftime("%a").lower()}


def naive_decide(p: RPolicy, request: dict[str, Any]) -> tuple[str, str, str | None]:
    agents = {a.agent_id: a for a in p.agents}
    if p.flat:
        agents["default"] = RAgent("default", None, p.flat, False, line=p.flat[0].line)
    agent_id = request.get("agent_id")
    if not isinstance(agent_id, str) or agent_id not in agents:
        return DENY, "UNKNOWN_AGENT", None
    agent = agents[agent_id]
    tool = naive_canonical(request.get("tool_id"))
    if tool is None:
        return DENY, "TOOL_ID_NOT_CANONICAL", None
    principal = request.get("principal")
    ctx = {
        "args": request.get("args") or {},
        "tool": tool,
        "agent": agent_id,
        "principal": principal if principal else {},
        "time": naive_time(request.get("time"), p.timezone),
    }
    first: RRule | None = None
    for rule in agent.rules:
        if naive_glob(rule.pattern, tool) and (rule.cond is None or holds(rule.cond, ctx)):
            if rule.effect == "deny!":
                return DENY, "POLICY_DENY", f"governance.fms:{rule.line}"
            if first is None:
                first = rule
    if first is not None:
        effect = first.effect.upper()
        return effect, f"POLICY_{effect}", f"governance.fms:{first.line}"
    if agent.default is not None:
        effect = agent.default.upper()
        return effect, f"POLICY_{effect}", f"governance.fms:{agent.default_line}"
    return DENY, "POLICY_DENY", f"governance.fms:{agent.line}"


# ---- requests over the same small alphabet --------------------------------------------------------

ARG_VALUES: list[Any] = [
    *SCALARS,
    None,
    5.0,
    "abc",
    "x",
    "12",
    [],
    [1],
    ["a"],
    [1, "a"],
    ["a", "b"],
    [[1]],
    {"x": 1},
    {"x": "a"},
    {"x": 5.0},
    float("nan"),
    float("inf"),
    -float("inf"),
    10**30,
]
TOOLS: list[Any] = [
    "a/b",
    "A/B",
    "a/b/c",
    "x",
    "a/b/",
    " a/b",
    "a//b",
    "\u0455/x",
    "\uff41/b",
    "a\u200b/b",
    None,
    5,
]

CANONICAL_TOOLS = ["a/b", "A/B", "a/b/c", "a/x/c", "x", "X", "b", "bb", "ab", "a", "q_s", "z/q_s", "c"]
args_st = st.dictionaries(
    st.sampled_from(["n", "s", "l", "b", "flagged", "d", "x", "a"]),
    st.one_of(*[st.sampled_from(ARG_VALUES)] * 4, st.fixed_dictionaries({"x": st.sampled_from(ARG_VALUES)})),
    min_size=2,
    max_size=7,
)
principal_st = st.one_of(
    st.just(MISSING),
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "groups": st.one_of(
                st.lists(st.sampled_from(["a", "admin", "ab", "ops"]), max_size=3), st.sampled_from(ARG_VALUES)
            ),
            "role": st.sampled_from(ARG_VALUES),
        },
    ),
    st.sampled_from(["admin", ["admin"], 1]),
)
time_st = st.one_of(
    st.integers(T0 - 7 * 86400, T0 + 7 * 86400),
    st.floats(T0, T0 + 86400, allow_nan=False),
    st.sampled_from([None, "1767225600", True, float("nan"), float("inf"), 10**30, MISSING]),
)


@st.composite
def requests_for(draw: st.DrawFn, p: RPolicy) -> dict[str, Any]:
    ids = [a.agent_id for a in p.agents] + (["default"] if p.flat else [])

    # Mostly well-formed (so rules and conditions are reached), sometimes not.
    def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any], one_in: int) -> Any:
        return draw(other) if draw(st.integers(0, one_in - 1)) == one_in - 1 else draw(good)

    request: dict[str, Any] = {
        "agent_id": mostly(st.sampled_from(ids), st.sampled_from(["zz", "A", None, 3]), 10),
        "tool_id": mostly(st.sampled_from(CANONICAL_TOOLS), st.sampled_from(TOOLS), 6),
        "args": mostly(args_st, st.none(), 8),
    }
    principal = draw(principal_st)
    if principal is not MISSING:
        request["principal"] = principal
    when = draw(time_st)
    if when is not MISSING:
        request["time"] = when
    return request


# =================================================================================================
# (d) the engine agrees with the naive interpreter
# =================================================================================================


@given(st.data())
def test_engine_matches_the_naive_first_match_interpreter(data: st.DataObject) -> None:
    p = data.draw(policies(), label="policy")
    policy = compile_text(p.text)
    for _ in range(20):
        request = data.draw(requests_for(p), label="request")
        d = evaluate(policy, request)
        expected = naive_decide(p, request)
        assert (d.effect, d.code, d.rule_ref) == expected, (p.text, request, d)


def test_the_generator_exercises_every_outcome() -> None:
    """Guard against a vacuous differential test: the random policies do reach each decision kind."""
    from hypothesis import find

    def outcome(kind: tuple[str, str]) -> Any:
        def has(case: tuple[RPolicy, dict[str, Any]]) -> bool:
            p, request = case
            return naive_decide(p, request)[:2] == kind

        return has

    cases = policies().flatmap(lambda p: st.tuples(st.just(p), requests_for(p)))
    for kind in [
        (PERMIT, "POLICY_PERMIT"),
        (DEFER, "POLICY_DEFER"),
        (DENY, "POLICY_DENY"),
        (DENY, "UNKNOWN_AGENT"),
        (DENY, "TOOL_ID_NOT_CANONICAL"),
    ]:
        find(cases, outcome(kind), settings=settings(max_examples=2000, database=None, phases=[Phase.generate]))


def test_naive_interpreter_sanity() -> None:
    """The reference interpreter itself, on hand-checked cases."""
    p = RPolicy(
        [
            RAgent(
                "a",
                "defer",
                [
                    RRule("permit", "a/*", ("cmp", "<", ("path", "n"), ("lit", 5)), False),
                    RRule("deny!", "*", ("not", ("cmp", "in", ("lit", "ops"), ("path", "principal.groups"))), False),
                    RRule("deny", "a/b", None, True),
                ],
                True,
            )
        ],
        [],
        "Asia/Tokyo",
    )
    p.text = render(p)
    base = {"agent_id": "a", "tool_id": "A/B", "principal": {"groups": ["ops"]}}
    assert naive_decide(p, {**base, "args": {"n": 1}}) == (PERMIT, "POLICY_PERMIT", "governance.fms:6")
    assert naive_decide(p, {**base, "args": {"n": 9}}) == (DENY, "POLICY_DENY", "governance.fms:8")
    assert naive_decide(p, {**base, "args": {"n": 1}, "principal": {}}) == (DENY, "POLICY_DENY", "governance.fms:7")
    assert naive_decide(p, {**base, "tool_id": "q", "args": {}}) == (DEFER, "POLICY_DEFER", "governance.fms:4")
    assert naive_time(T0, "Asia/Tokyo") == {"hour": 9, "minute": 0, "weekday": 4, "day": "thu"}
    policy = compile_text(p.text)
    for args in ({"n": 1}, {"n": 9}, {}):
        request = {**base, "args": args}
        d = evaluate(policy, request)
        assert (d.effect, d.code, d.rule_ref) == naive_decide(p, request)


# =================================================================================================
# (a) compile is deterministic
# =================================================================================================


@given(policies())
def test_compile_is_deterministic(p: RPolicy) -> None:
    first = compile_text(p.text)
    second = compile_text(p.text)
    assert first.to_json() == second.to_json()
    assert first.version == second.version
    # The artifact reloads to the same bytes (and so the same version).
    assert policy_from_json(first.to_json()).to_json() == first.to_json()
    json.loads(first.to_json())  # valid JSON, ASCII
    assert first.to_json().isascii()


@settings(max_examples=3)  # each example starts two interpreters; the in-process property above runs the full count
@given(st.lists(policies(), min_size=15, max_size=15))
def test_compile_is_deterministic_across_processes_and_hash_seeds(texts: list[RPolicy]) -> None:
    """Same source → same bytes in another interpreter with another string-hash seed."""
    script = (
        "import json, sys\n"
        "from faramesh.engine.policy.parser import parse_fpl\n"
        "from faramesh.engine.policy.compiler import compile_files\n"
        "texts = json.load(sys.stdin)\n"
        "out = [compile_files(parse_fpl(t, 'governance.fms'), {'governance.fms': 'x'}, env={}).version\n"
        "       for t in texts]\n"
        "print(json.dumps(out))\n"
    )
    local = [compile_text(p.text).version for p in texts]
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps([p.text for p in texts]),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        assert json.loads(out.stdout) == local


# =================================================================================================
# (b) evaluation never raises
# =================================================================================================

RICH = """\
runtime {
  timezone = "Asia/Kolkata"
  call_cost = $0.01
}
agent "a" {
  default defer
  deny! shell/* if cmd =~ "rm\\\\s+-rf" or cmd matches "(?i)shutdown"
  permit refund if amount < $25 and currency in ["usd", "eur"]
  defer refund if amount < $500 and not flagged
  deny refund
  permit search/* if query != "" and len > 0 and tags contains "public"
  permit kb/* if "ops" in principal.groups or principal.role == "admin"
  permit time/* if time.hour >= 9 and time.hour < 17 and time.weekday <= 5 and time.day != "sun"
  permit cmp/* if a == b or a != b or a < b or a >= b or l == [1, "a", true] or d.x.y.z > 1.5
  permit tool/* if tool =~ "^tool/" and agent == "a" and tool not in ["tool/x"] and x not in "abc"
  deny! */* if card.number =~ "^4[0-9]{12}"
  rate_limit "refund": 5 per minute
  rate_limit "*": 100 per second
  budget daily { max $100 warn_at 0.8 on_exceed defer }
  budget hourly { max_calls 50 on_exceed audit }
}
agent "b" {
  permit *
}
permit *
"""

RICH_POLICY = compile_text(RICH)

SURROGATES = st.sampled_from(["\ud800", "a\udfff", "\udc00rm -rf"])
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and ±inf included
    st.text(),
    st.sampled_from(["usd", "public", "ops", "admin", "rm -rf /", "4111111111111", "", "tool/x"]),
    SURROGATES,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["x", "y", "z", "number"])), inner, max_size=4),
    ),
    max_leaves=25,
)
KEYS = ["amount", "currency", "flagged", "cmd", "query", "len", "tags", "a", "b", "l", "d", "x", "card"]
KEYS += ["model", "max_tokens", "input_tokens"]
wild_args = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), json_values, max_size=8),
    json_values,  # not even an object
)


def nested(depth: int, leaf: Any, as_list: bool) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"x": value, "y": value if depth < 20 else 0}
    return value


deep_shapes = st.tuples(
    st.integers(0, 3000),
    st.booleans(),
    st.lists(st.sampled_from(["a", "b", "l", "d", "tags", "amount"]), min_size=1, max_size=3, unique=True),
)
anything = st.one_of(json_values, st.sampled_from([object(), b"bytes", (1, 2), {1, 2}, frozenset(), 1j, Ellipsis]))
wild_ids = st.one_of(
    st.sampled_from(["a", "b", "default", "refund", "shell/exec", "kb/x", "time/x", "cmp/x", "tool/y", "search/q"]),
    st.text(max_size=300),
    anything,
)
wild_time = st.one_of(
    st.integers(T0 - 10**6, T0 + 10**6),
    st.integers(),
    st.floats(),
    anything,
)
wild_state = st.one_of(
    st.none(),
    st.builds(
        lambda tokens, t, spent, calls, start: StateSnapshot(
            MappingProxyType({("a", "refund"): RateBucket(tokens, t), ("a", "*"): RateBucket(tokens, t)}),
            MappingProxyType(
                {
                    ("a", "daily"): BudgetUsage(start, spent, 0, calls),
                    ("a", "hourly"): BudgetUsage(start, spent, 0, calls),
                }
            ),
        ),
        st.floats(0, 100),
        st.floats(T0 - 10**6, T0 + 10**6),
        st.integers(0, 10**6),
        st.integers(0, 100),
        st.sampled_from([T0, T0 - 86400, T0 + 3600]),
    ),
)

KNOWN_CODES = {
    "POLICY_PERMIT",
    "POLICY_DEFER",
    "POLICY_DENY",
    "RATE_EXCEEDED",
    "BUDGET_EXCEEDED",
    "UNKNOWN_AGENT",
    "TOOL_ID_NOT_CANONICAL",
    "INVALID_REQUEST",
}


def has_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: values may be nested deeper than the recursion limit
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= ch <= "\udfff" for ch in item):
                return True
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


def check_decision(d: Any, request: Any) -> None:
    assert isinstance(d, Decision)
    assert d.effect in EFFECTS
    assert isinstance(d.code, str) and d.code
    assert isinstance(d.reason, str)
    if d.code == "EVALUATION_ERROR":
        # The engine's last-resort catch-all: allowed only for strings RE2 cannot encode (lone
        # surrogates), where failing closed is the right answer. Anything else is a defect.
        assert d.effect == DENY
        assert has_surrogate(request), (request, d)
    else:
        assert d.code in KNOWN_CODES, d
    if d.effect != DENY:
        assert d.code in ("POLICY_PERMIT", "POLICY_DEFER", "BUDGET_EXCEEDED")


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(agent=wild_ids, tool=wild_ids, args=wild_args, principal=anything, when=wild_time, state=wild_state)
def test_evaluation_never_raises(agent: Any, tool: Any, args: Any, principal: Any, when: Any, state: Any) -> None:
    for agent_id in (agent, "a", "b", "default"):
        request = {"agent_id": agent_id, "tool_id": tool, "args": args, "principal": principal, "time": when}
        check_decision(evaluate(RICH_POLICY, request, state), request)
    for tool_id in ("refund", "search/q", "cmp/x", "time/x", "tool/y", "kb/x", "shell/x"):
        request = {"agent_id": "a", "tool_id": tool_id, "args": args, "principal": principal, "time": when}
        check_decision(evaluate(RICH_POLICY, request, state), request)


@given(shape=deep_shapes, tool=st.sampled_from(["cmp/x", "search/q", "refund", "tool/y"]))
def test_evaluation_never_raises_on_deep_nesting(shape: tuple[int, bool, list[str]], tool: str) -> None:
    depth, as_list, keys = shape  # built here, not drawn: hypothesis cannot print values this deep
    args = {k: nested(depth, 1, as_list) for k in keys}
    request = {"agent_id": "a", "tool_id": tool, "args": args, "principal": {"groups": args.get("l")}, "time": T0}
    check_decision(evaluate(RICH_POLICY, request), request)


def test_evaluation_on_deep_equal_lists() -> None:
    # `a == b` over two equal lists nested deeper than Python's recursion limit.
    depth = sys.getrecursionlimit() + 100
    for a, b in [
        (nested(depth, 1, True), nested(depth, 1, True)),  # equal, distinct objects
        (nested(depth, 1, True), nested(depth, 2, True)),
        (nested(depth, 1, True), nested(depth + 1, 1, True)),
    ]:
        request = {"agent_id": "a", "tool_id": "cmp/x", "args": {"a": a, "b": b}, "time": T0}
        d = evaluate(RICH_POLICY, request)
        check_decision(d, request)
        # `a == b or a != b …`: either way a list compared with a list decides the rule, so it permits.
        assert (d.effect, d.code) == (PERMIT, "POLICY_PERMIT")
    from faramesh.engine.policy.conditions import typed_equal

    assert typed_equal(nested(depth, 1, True), nested(depth, 1, True)) is True
    assert typed_equal(nested(depth, 1, True), nested(depth, 2, True)) is False
    assert typed_equal(nested(depth, 1, True), nested(depth, "1", True)) is False
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert typed_equal(cyclic, cyclic) is True  # terminates


@given(p=policies(), data=st.data())
def test_random_policies_never_raise_on_wild_requests(p: RPolicy, data: st.DataObject) -> None:
    policy = compile_text(p.text)
    request = {
        "agent_id": data.draw(st.one_of(st.sampled_from([a.agent_id for a in p.agents] + ["default"]), wild_ids)),
        "tool_id": data.draw(st.one_of(st.sampled_from(TOOLS), wild_ids)),
        "args": data.draw(wild_args),
        "principal": data.draw(anything),
        "time": data.draw(wild_time),
    }
    check_decision(evaluate(policy, request), request)


# =================================================================================================
# (c) the CLI never shows a traceback
# =================================================================================================

VALID_FILES = [
    RICH,
    """\
runtime {
  mode = "enforce"
  backend = "sqlite"
  cold_start_deny_window = "10s"
}

agent "support-bot" {
  default deny
  framework "langgraph"
  rules {
    permit knowledgebase/search
    permit ticket/read
    permit refund if amount < $25
    defer refund when amount < $500 notify "#payments"
    deny refund reason "too large"
  }
  rate_limit "refund": 5 per minute
  budget daily { max $1000 on_exceed defer }
  redact refund args: ["card.number", "card.cvv"]
  egress { allow = ["api.example.com"] }
  model_policy { allow = ["gpt-4o"] }
  session { max_duration = "24h" idle_timeout = "10m" }
  alert { on = "deny" notify = "slack://#sec-alerts" }
  command = "python agent.py"
}
""",
    """\
permit search
deny! shell/*
defer email/send if recipients > 10
permit *
""",
]


def run_check(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from faramesh.launchers.cli import main

    capsys.readouterr()
    rc = main(["check", "--dir", str(directory)])
    captured = capsys.readouterr()
    return rc, captured.err


def in_process_outcome(directory: Path) -> int:
    """What `check` should exit with: 0 when the stack compiles, else the error's own exit code."""
    from faramesh.engine.policy.stack import compile_stack

    try:
        compile_stack(directory)
    except FarameshError as err:
        return err.exit_code
    return 0  # any other exception propagates and fails the test: compile_stack must raise only FarameshError


def assert_cli_outcome(data: bytes, capsys: pytest.CaptureFixture[str], must_fail: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Path(tmp)
        (stack / "governance.fms").write_bytes(data)
        rc, err = run_check(stack, capsys)
        assert "Traceback" not in err
        assert rc != 70, err  # internal error: a bug
        expected = in_process_outcome(stack)
        assert rc == expected, (rc, expected, err)
        if must_fail:
            assert rc == 1, (data, err)
        if rc == 2:
            assert b"import" in data, (data, err)
        else:
            assert rc in (0, 1), err
        if rc != 0:
            assert err.strip(), "a failed check must say why"
            assert "error" in err


def test_valid_files_pass_check(capsys: pytest.CaptureFixture[str]) -> None:
    for text in VALID_FILES:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "governance.fms").write_text(text)
            rc, err = run_check(Path(tmp), capsys)
            assert rc == 0, err


CLI_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@CLI_SETTINGS
@given(st.binary(max_size=1500))
def test_random_bytes_never_give_a_traceback(capsys: pytest.CaptureFixture[str], data: bytes) -> None:
    assert_cli_outcome(data, capsys)


@CLI_SETTINGS
@given(st.binary(max_size=1500))
def test_random_bytes_that_are_not_utf8_fail_with_exit_1(capsys: pytest.CaptureFixture[str], data: bytes) -> None:
    assert_cli_outcome(b"agent \xff" + data, capsys, must_fail=True)


@CLI_SETTINGS
@given(st.text(max_size=800))
def test_random_text_after_a_stray_brace_fails_with_exit_1(capsys: pytest.CaptureFixture[str], text: str) -> None:
    assert_cli_outcome(("}" + text).encode("utf-8", "surrogatepass"), capsys, must_fail=True)


FRAGMENTS = [
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    '"',
    "=",
    "==",
    "=~",
    "!",
    "$",
    "$1.234",
    "$-1",
    "if",
    "when",
    "deny!",
    "permit",
    "agent",
    "default",
    "rules",
    "rate_limit",
    "budget",
    "redact",
    "egress",
    "alert",
    "runtime",
    "provider",
    "identity",
    "trust",
    'env("FARAMESH_SURELY_UNSET_VAR")',
    'env("HOME")',
    "\x00",
    "\n",
    "#",
    "*",
    "..",
    "//",
    ":",
    ";",
    ",",
    "-",
    "0",
    "-1",
    "99999999999999999999999",
    "1e5",
    "\u0455",
    "\u200b",
    "\ufeff",
    "é",
    "\t",
    "not",
    "in",
    "and",
    "or",
    "matches",
    "contains",
    '"(?=x)"',
    '"\\\\1"',
    '"["',
    "per",
    "day",
    "fortnight",
    "on_exceed",
    "warn_at",
    "max_calls",
    "max",
    "timezone",
    '"Mars/Olympus"',
    "ed25519:AAAA",
    "key",
    "import",
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID_FILES))
    for _ in range(draw(st.integers(1, 3))):
        n = len(text)
        kind = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "swap_lines", "truncate"]))
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 40)))
        if kind == "insert":
            frag = draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)))
            text = text[:i] + frag + text[i:]
        elif kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[j:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "swap_lines":
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
        else:
            text = text[:i]
    return text


@CLI_SETTINGS
@given(mutated())
def test_mutated_valid_files_fail_with_a_message(capsys: pytest.CaptureFixture[str], text: str) -> None:
    assert_cli_outcome(text.encode("utf-8", "surrogatepass"), capsys)


@CLI_SETTINGS
@given(st.data())
def test_files_truncated_inside_an_agent_block_fail_with_exit_1(
    capsys: pytest.CaptureFixture[str], data: st.DataObject
) -> None:
    text = data.draw(st.sampled_from(VALID_FILES[:2]))
    start = text.index('\nagent "') + 1
    end = text.index("\n}\n", start) + 1  # the agent's closing brace: the cut always leaves it out
    cut = data.draw(st.integers(start + 1, end - 1))
    assert_cli_outcome(text[:cut].encode(), capsys, must_fail=True)
