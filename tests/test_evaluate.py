"""The pure decision function (engine/policy/evaluate.py) and the condition semantics
(engine/policy/conditions.py), driven through FPL text as a user writes it."""

from __future__ import annotations

from typing import Any

import pytest
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.evaluate import DEFER, DENY, PERMIT, Decision, evaluate
from faramesh.engine.policy.model import CompiledPolicy, policy_from_json
from faramesh.engine.policy.parser import parse_fpl

T0 = 1767225600  # 2026-01-01T00:00:00Z, a Thursday


def compile_text(text: str) -> CompiledPolicy:
    return compile_files(parse_fpl(text, "governance.fms"), {"governance.fms": "x"}, env={})


def decide(
    policy: CompiledPolicy,
    tool: Any = "t",
    args: Any = None,
    agent: Any = "a",
    principal: Any = None,
    time: Any = T0,
    **extra: Any,
) -> Decision:
    request: dict[str, Any] = {"agent_id": agent, "tool_id": tool, "args": {} if args is None else args, "time": time}
    if principal is not None:
        request["principal"] = principal
    request.update(extra)
    return evaluate(policy, request)


def one_rule(cond: str, runtime: str = "") -> CompiledPolicy:
    """`permit t if <cond>` at line 3 over `default deny` at line 2 (line numbers after `runtime`)."""
    return compile_text(f'{runtime}agent "a" {{\n  default deny\n  permit t if {cond}\n}}\n')


def holds(cond: str, args: Any = None, runtime: str = "", **kw: Any) -> bool:
    d = decide(one_rule(cond, runtime), args=args, **kw)
    assert d.effect in (PERMIT, DENY)
    assert d.code in ("POLICY_PERMIT", "POLICY_DENY"), d
    return d.effect == PERMIT


NAN = float("nan")
INF = float("inf")
HUGE = 10**400

# (condition, args, expected). Each row is one comparison with a present / missing / wrong-typed field.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    # == on numbers
    ("n == 5", {"n": 5}, True),
    ("n == 5", {"n": 5.0}, True),
    ("n == 5", {"n": 6}, False),
    ("n == 5", {"n": "5"}, False),
    ("n == 1", {"n": True}, False),  # booleans are not numbers
    ("n == 0", {"n": False}, False),
    ("n == 5", {}, False),
    ("n == 5", {"n": None}, False),
    ("n == 5", {"n": [5]}, False),
    ("n == 5", {"n": {"x": 5}}, False),
    ("n == 5", {"n": NAN}, False),
    ("n == 2.5", {"n": 2.5}, True),
    ("n == $25", {"n": 25}, True),  # money is the same scalar as a number
    ("n == $10.50", {"n": 10.5}, True),
    ("n == -3", {"n": -3}, True),
    # == on strings, booleans and lists
    ('s == "a"', {"s": "a"}, True),
    ('s == "a"', {"s": "A"}, False),  # string values are compared exactly
    ('s == "a"', {"s": ["a"]}, False),
    ('s == "a"', {}, False),
    ('s == "1"', {"s": 1}, False),
    ("b == true", {"b": True}, True),
    ("b == true", {"b": 1}, False),
    ("b == true", {"b": "true"}, False),
    ("b == false", {"b": False}, True),
    ("b == false", {"b": 0}, False),
    ("b == false", {}, False),
    ('l == [1, "a"]', {"l": [1, "a"]}, True),
    ('l == [1, "a"]', {"l": [1.0, "a"]}, True),
    ('l == [1, "a"]', {"l": [1, "a", 2]}, False),
    ('l == [1, "a"]', {"l": [True, "a"]}, False),
    ('l == [1, "a"]', {"l": "1a"}, False),
    ('l == [1, "a"]', {}, False),
    # != : false when missing or of another type
    ("n != 5", {"n": 6}, True),
    ("n != 5", {"n": 5}, False),
    ("n != 5", {"n": 5.0}, False),
    ("n != 5", {}, False),
    ("n != 5", {"n": "6"}, False),
    ("n != 1", {"n": True}, False),
    ("n != 5", {"n": None}, False),
    ("n != 5", {"n": [6]}, False),
    ("n != 5", {"n": {"v": 6}}, False),
    ("n != 5", {"n": NAN}, False),
    ('s != "a"', {"s": "b"}, True),
    ('s != "a"', {"s": 1}, False),
    ('s != "a"', {}, False),
    ("b != true", {"b": False}, True),
    ("b != true", {"b": 0}, False),
    ("l != [1]", {"l": [2]}, True),
    ("l != [1]", {"l": [1, 2]}, True),
    ("l != [1]", {"l": [1]}, False),
    ("l != [1]", {"l": 1}, False),
    # ordering
    ("n < 5", {"n": 4}, True),
    ("n < 5", {"n": 4.5}, True),
    ("n < 5", {"n": 5}, False),
    ("n < 5", {"n": "4"}, False),
    ("n < 5", {"n": True}, False),  # True < 5 in Python; not here
    ("n < 5", {"n": False}, False),
    ("n < 5", {}, False),
    ("n < 5", {"n": None}, False),
    ("n < 5", {"n": [1]}, False),
    ("n < 5", {"n": {"v": 1}}, False),
    ("n < 5", {"n": -INF}, True),
    ("n < 5", {"n": NAN}, False),
    ("n > 5", {"n": NAN}, False),
    ("n >= 5", {"n": NAN}, False),
    ("n <= 5", {"n": NAN}, False),
    ("n > 5", {"n": HUGE}, True),
    ("n < 5", {"n": -HUGE}, True),
    ("n > 5", {"n": INF}, True),
    ("n <= 5", {"n": 5}, True),
    ("n <= 5", {"n": 5.0}, True),
    ("n <= 5", {"n": 5.01}, False),
    ("n >= 5", {"n": 5}, True),
    ("n >= 5", {"n": 4.99}, False),
    ("n > 5", {"n": 5}, False),
    ("n > -1", {"n": 0}, True),
    ("amount < $25", {"amount": 24.99}, True),
    ("amount < $25", {"amount": 25}, False),
    ('s < "b"', {"s": "a"}, True),
    ('s < "b"', {"s": "c"}, False),
    ('s < "b"', {"s": 1}, False),
    ('s >= "b"', {"s": "b"}, True),
    ('"b" > s', {"s": "a"}, True),  # literal on the left
    ("5 > n", {"n": 4}, True),
    ("5 > n", {"n": "4"}, False),
    ("5 > n", {}, False),
    # in / not in
    ('s in ["a", "b"]', {"s": "a"}, True),
    ('s in ["a", "b"]', {"s": "c"}, False),
    ('s in ["a", "b"]', {"s": "A"}, False),
    ('s in ["a", "b"]', {}, False),
    ('s in ["a", "b"]', {"s": 1}, False),
    ('s in ["a", "b"]', {"s": ["a"]}, False),
    ('s in ["a", "b"]', {"s": {"a": 1}}, False),
    ('s in "abc"', {"s": "b"}, True),  # substring
    ('s in "abc"', {"s": "d"}, False),
    ('s in "abc"', {"s": 1}, False),
    ("n in [1, 2]", {"n": 1}, True),
    ("n in [1, 2]", {"n": 1.0}, True),
    ("n in [1, 2]", {"n": True}, False),
    ("n in [1, 2]", {"n": "1"}, False),
    ("n in [1, 2]", {"n": NAN}, False),
    ('s not in ["a", "b"]', {"s": "c"}, True),
    ('s not in ["a", "b"]', {"s": "a"}, False),
    ('s not in ["a", "b"]', {}, False),  # missing: false, not "true because absent"
    ('s not in ["a", "b"]', {"s": {"a": 1}}, False),
    ('s not in ["a", "b"]', {"s": None}, True),  # null is a value, and it is not in the list
    ('s not in "abc"', {"s": "x"}, True),
    ('s not in "abc"', {"s": "a"}, False),
    ('s not in "abc"', {"s": 1}, False),  # number vs string haystack: incompatible
    ("n not in [1, 2]", {"n": 3}, True),
    ("n not in [1, 2]", {"n": NAN}, False),
    ("s in l", {"s": "a", "l": ["a"]}, True),  # path on both sides
    ("s in l", {"s": "a", "l": 5}, False),
    ("s not in l", {"s": "a", "l": 5}, False),
    ("s not in l", {"s": "a"}, False),
    # contains
    ("l contains 1", {"l": [1, 2]}, True),
    ("l contains 1", {"l": [1.0]}, True),
    ("l contains 1", {"l": ["1"]}, False),
    ("l contains 1", {"l": [True]}, False),
    ("l contains 1", {"l": "1"}, False),
    ("l contains 1", {}, False),
    ("l contains 1", {"l": {"1": 1}}, False),
    ('s contains "b"', {"s": "abc"}, True),
    ('s contains "b"', {"s": "ac"}, False),
    ('[1, "a"] contains n', {"n": "a"}, True),
    ('[1, "a"] contains n', {"n": 2}, False),
    ('[1, "a"] contains n', {}, False),
    # regexes (RE2, unanchored search)
    ('s =~ "^a.c$"', {"s": "abc"}, True),
    ('s =~ "^a.c$"', {"s": "xabc"}, False),
    ('s =~ "b"', {"s": "abc"}, True),  # search, not match
    ('s matches "b"', {"s": "abc"}, True),
    ('s matches "^b"', {"s": "abc"}, False),
    ('s =~ "b"', {"s": 1}, False),
    ('s =~ "b"', {"s": ["abc"]}, False),
    ('s =~ "b"', {"s": None}, False),
    ('s =~ "b"', {}, False),
    ('s =~ "(?i)ABC"', {"s": "xabcx"}, True),
    ('s =~ "^\\d+$"', {"s": "123"}, True),
    ('s =~ "^\\d+$"', {"s": "12a"}, False),
    ('s =~ "rm\\s+-rf"', {"s": "sudo rm  -rf /"}, True),
    ('s =~ ""', {"s": ""}, True),
    # nested paths; bare names are arguments
    ("d.x > 1", {"d": {"x": 2}}, True),
    ("args.d.x > 1", {"d": {"x": 2}}, True),
    ("d.x > 1", {"d": {"x": "2"}}, False),
    ("d.x > 1", {"d": [2]}, False),
    ("d.x > 1", {"d": "x"}, False),
    ("d.x > 1", {"d": None}, False),
    ("d.x > 1", {}, False),
    ("d.x.y.z == 1", {"d": {"x": {"y": {"z": 1}}}}, True),
    ("d.x.y.z == 1", {"d": {"x": {"y": 1}}}, False),
    ('card.number == "4111"', {"card": {"number": "4111"}}, True),
    ("args == 1", {}, False),  # a whole object compares with nothing
    ("a == b", {"a": 1, "b": 1}, True),
    ("a == b", {"a": 1, "b": "1"}, False),
    ("a == b", {}, False),  # two missing fields are not equal
    ("a != b", {}, False),
    ("a == b", {"a": None, "b": None}, True),
    # bare operand as a condition means `== true`
    ("flagged", {"flagged": True}, True),
    ("flagged", {"flagged": 1}, False),
    ("flagged", {"flagged": "yes"}, False),
    ("flagged", {}, False),
    # boolean connectives
    ('n > 1 and s == "a"', {"n": 2, "s": "a"}, True),
    ('n > 1 and s == "a"', {"n": 2}, False),
    ('n > 1 or s == "a"', {"s": "a"}, True),
    ('n > 1 or s == "a"', {"n": "9", "s": "b"}, False),
    ("not n > 1", {"n": 0}, True),
    ("not n > 1", {"n": 2}, False),
    ("not n > 1", {}, True),  # not over a missing field: the comparison is false, `not` negates it
    ("not n > 1", {"n": "9"}, True),
    ('not (n > 1 or s == "a")', {}, True),
    ('not (n > 1 or s == "a")', {"s": "a"}, False),
    ("not not n > 1", {}, False),
    ('not s =~ "x"', {}, True),
    ('not s in ["a"]', {}, True),
    ('n > 1 and s == "a" or b == true', {"b": True}, True),  # and binds tighter than or
    ('n > 1 and (s == "a" or b == true)', {"b": True}, False),
]


@pytest.mark.parametrize(("cond", "args", "expected"), CASES, ids=[f"{c}|{a!r}" for c, a, _ in CASES])
def test_condition_semantics(cond: str, args: dict[str, Any], expected: bool) -> None:
    assert holds(cond, args) is expected


# ---- principal, tool and agent in conditions ---------------------------------------------------

PRINCIPAL_CASES: list[tuple[str, Any, bool]] = [
    ('"ops" in principal.groups', {"groups": ["ops", "dev"]}, True),
    ('"ops" in principal.groups', {"groups": ["OPS"]}, False),
    ('"ops" in principal.groups', {"groups": []}, False),
    ('"ops" in principal.groups', {}, False),
    ('"ops" in principal.groups', None, False),
    ('"ops" in principal.groups', "ops", False),  # a principal that is not an object
    ('"ops" in principal.groups', ["ops"], False),
    ('"ops" in principal.groups', {"groups": {"ops": True}}, False),
    ('"ops" in principal.groups', {"groups": "devops"}, True),  # a string haystack is a substring test
    ('principal.groups contains "ops"', {"groups": ["ops"]}, True),
    ('principal.groups contains "ops"', {"groups": ["dev"]}, False),
    ('principal.groups contains "ops"', {"groups": 7}, False),
    ('principal.groups contains "ops"', {}, False),
    ('"ops" not in principal.groups', {"groups": ["dev"]}, True),
    ('"ops" not in principal.groups', {"groups": ["ops"]}, False),
    ('"ops" not in principal.groups', {}, False),
    ('"ops" not in principal.groups', None, False),
    ('principal.role == "admin"', {"role": "admin"}, True),
    ('principal.role == "admin"', {"role": "Admin"}, False),
    ('principal.role != "admin"', {}, False),
    ("principal.org.tier >= 2", {"org": {"tier": 3}}, True),
    ("principal.org.tier >= 2", {"org": {"tier": "3"}}, False),
    ("not principal.verified", {}, True),
    ("principal.verified", {"verified": True}, True),
]


@pytest.mark.parametrize(("cond", "principal", "expected"), PRINCIPAL_CASES)
def test_principal_conditions(cond: str, principal: Any, expected: bool) -> None:
    policy = one_rule(cond)
    request: dict[str, Any] = {"agent_id": "a", "tool_id": "t", "args": {}, "time": T0}
    if principal is not None:
        request["principal"] = principal
    d = evaluate(policy, request)
    assert (d.effect == PERMIT) is expected, d


def test_tool_and_agent_in_conditions() -> None:
    policy = compile_text(
        """agent "a" {
  default deny
  deny * if tool =~ "^shell/" and agent == "a"
  permit * if tool == "ticket/read"
  defer * if tool in ["refund", "payout"]
}
agent "b" {
  default deny
  permit * if agent == "b" and not tool =~ "^shell/"
}
"""
    )
    assert decide(policy, "Shell/Exec").rule_ref == "governance.fms:3"  # the canonical (lower-cased) id
    assert decide(policy, "Shell/Exec").effect == DENY
    assert decide(policy, "Ticket/READ").effect == PERMIT  # `tool` is the canonical id
    assert decide(policy, "refund").effect == DEFER
    assert decide(policy, "other").rule_ref == "governance.fms:2"
    assert decide(policy, "shell/exec", agent="b").effect == DENY
    assert decide(policy, "shell/exec", agent="b").rule_ref == "governance.fms:8"
    assert (decide(policy, "x/y", agent="b").effect, decide(policy, "x/y", agent="b").rule_ref) == (
        PERMIT,
        "governance.fms:9",
    )


# ---- time --------------------------------------------------------------------------------------

TOKYO = 'runtime { timezone = "Asia/Tokyo" }\n'
NEW_YORK = 'runtime { timezone = "America/New_York" }\n'


@pytest.mark.parametrize(
    ("cond", "runtime", "when", "expected"),
    [
        ("time.hour == 0", "", T0, True),  # UTC unless runtime says otherwise
        ("time.hour == 9", TOKYO, T0, True),  # 00:00Z is 09:00 in Tokyo
        ("time.hour == 0", TOKYO, T0, False),
        ("time.weekday == 4", TOKYO, T0, True),  # ISO: Thursday = 4
        ('time.day == "thu"', TOKYO, T0, True),
        ("time.minute == 30", TOKYO, T0 + 30 * 60, True),
        ("time.hour == 8", TOKYO, T0 - 3600, True),
        ("time.weekday == 3", "", T0 - 1, True),  # 23:59:59 Wednesday in UTC ...
        ("time.weekday == 4", TOKYO, T0 - 1, True),  # ... but already Thursday in Tokyo
        ("time.hour == 23", NEW_YORK, T0 + 4 * 3600, True),  # EST (UTC-5) in winter: 04:00Z is 23:00
        ('time.day == "wed"', NEW_YORK, T0 + 4 * 3600, True),
        ("time.hour == 8", NEW_YORK, 1782907200, True),  # EDT (UTC-4) in summer: 12:00Z is 08:00
        ("time.hour >= 9 and time.hour < 17", TOKYO, T0 + 0.5, True),  # float times work
        ("time.weekday >= 6", TOKYO, T0 + 2 * 86400, True),  # Saturday
    ],
)
def test_time_fields_in_the_runtime_timezone(cond: str, runtime: str, when: Any, expected: bool) -> None:
    assert holds(cond, {}, runtime=runtime, time=when) is expected


@pytest.mark.parametrize(
    "when", [None, "1767225600", True, False, NAN, INF, -INF, 10**30, 1e300, -(10**15), [T0], {"t": T0}]
)
@pytest.mark.parametrize("runtime", ["", TOKYO])
def test_missing_or_invalid_time_makes_time_comparisons_false(when: Any, runtime: str) -> None:
    for cond in ("time.hour >= 0", "time.weekday >= 1", 'time.day != "xyz"', "time.minute < 60"):
        assert holds(cond, {}, runtime=runtime, time=when) is False
    assert holds("not time.hour >= 0", {}, runtime=runtime, time=when) is True


def test_request_without_a_time_key() -> None:
    policy = one_rule("time.hour >= 0")
    d = evaluate(policy, {"agent_id": "a", "tool_id": "t", "args": {}})
    assert (d.effect, d.code, d.rule_ref) == (DENY, "POLICY_DENY", "governance.fms:2")


# ---- rule order, deny!, defaults ---------------------------------------------------------------

ORDER_POLICY = """\
agent "a" {
  default defer
  permit refund if amount < $25
  defer refund if amount < $500
  deny refund reason "too large" notify "#payments"
  permit stripe/*
  deny! stripe/payout if amount > 100
  permit ticket/*
  deny ticket/delete
}
"""


@pytest.mark.parametrize(
    ("tool", "args", "effect", "code", "ref"),
    [
        ("refund", {"amount": 10}, PERMIT, "POLICY_PERMIT", "governance.fms:3"),
        ("refund", {"amount": 100}, DEFER, "POLICY_DEFER", "governance.fms:4"),
        ("refund", {"amount": 1000}, DENY, "POLICY_DENY", "governance.fms:5"),
        ("refund", {}, DENY, "POLICY_DENY", "governance.fms:5"),  # missing amount: both conditions false
        ("refund", {"amount": "10"}, DENY, "POLICY_DENY", "governance.fms:5"),
        ("stripe/charge", {}, PERMIT, "POLICY_PERMIT", "governance.fms:6"),
        ("stripe/payout", {"amount": 50}, PERMIT, "POLICY_PERMIT", "governance.fms:6"),
        # deny! later in the file beats the earlier permit
        ("stripe/payout", {"amount": 101}, DENY, "POLICY_DENY", "governance.fms:7"),
        ("Stripe/Payout", {"amount": 101}, DENY, "POLICY_DENY", "governance.fms:7"),
        # first match wins: the later plain deny never runs
        ("ticket/delete", {}, PERMIT, "POLICY_PERMIT", "governance.fms:8"),
        ("unknown/tool", {}, DEFER, "POLICY_DEFER", "governance.fms:2"),
    ],
)
def test_first_match_and_strict_deny(tool: str, args: dict[str, Any], effect: str, code: str, ref: str) -> None:
    d = decide(compile_text(ORDER_POLICY), tool, args)
    assert (d.effect, d.code, d.rule_ref) == (effect, code, ref)


def test_reason_and_notify_are_carried() -> None:
    d = decide(compile_text(ORDER_POLICY), "refund", {"amount": 1000})
    assert d.reason == "too large"
    assert d.notify == "#payments"
    assert d.tool == "refund"


def test_strict_deny_before_a_permit_and_with_a_false_condition() -> None:
    policy = compile_text(
        """agent "a" {
  deny! shell/* if cmd =~ "rm"
  permit shell/*
}
"""
    )
    assert decide(policy, "shell/exec", {"cmd": "rm -rf /"}).rule_ref == "governance.fms:2"
    assert decide(policy, "shell/exec", {"cmd": "ls"}).effect == PERMIT
    assert decide(policy, "shell/exec", {}).effect == PERMIT  # missing field: the deny! condition is false


def test_strict_deny_beats_defer_and_a_later_strict_is_not_needed() -> None:
    policy = compile_text(
        """agent "a" {
  default permit
  defer x
  permit x
  deny! x if n > 1
  deny! x if n > 2
}
"""
    )
    assert decide(policy, "x", {"n": 0}).effect == DEFER
    d = decide(policy, "x", {"n": 5})
    assert (d.effect, d.rule_ref) == (DENY, "governance.fms:5")  # the first matching deny!


@pytest.mark.parametrize(
    ("default", "effect", "code", "ref"),
    [
        ("  default permit\n", PERMIT, "POLICY_PERMIT", "governance.fms:2"),
        ("  default defer\n", DEFER, "POLICY_DEFER", "governance.fms:2"),
        ("  default deny\n", DENY, "POLICY_DENY", "governance.fms:2"),
        ("", DENY, "POLICY_DENY", "governance.fms:1"),  # no default → deny, citing the agent
    ],
)
def test_defaults(default: str, effect: str, code: str, ref: str) -> None:
    policy = compile_text(f'agent "a" {{\n{default}  permit known\n}}\n')
    d = decide(policy, "other")
    assert (d.effect, d.code, d.rule_ref) == (effect, code, ref)
    assert decide(policy, "known").effect == PERMIT


def test_empty_agent_denies_everything() -> None:
    policy = compile_text('agent "a" {\n}\n')
    d = decide(policy, "x")
    assert (d.effect, d.code) == (DENY, "POLICY_DENY")


def test_rules_block_and_inline_rules_keep_source_order() -> None:
    policy = compile_text(
        """agent "a" {
  default deny
  rules {
    permit a/*
  }
  deny a/b
}
"""
    )
    assert decide(policy, "a/b").rule_ref == "governance.fms:4"


def test_agent_ids_with_slashes_and_unknown_agents() -> None:
    policy = compile_text('agent "team/bot" {\n  default permit\n}\n')
    assert decide(policy, "x", agent="team/bot").effect == PERMIT
    for bad in ("team/Bot", "TEAM/BOT", "team", "other", "", None, 1, ["team/bot"], {"id": "team/bot"}):
        d = decide(policy, "x", agent=bad)
        assert (d.effect, d.code, d.rule_ref) == (DENY, "UNKNOWN_AGENT", None), bad
    d = evaluate(policy, {"tool_id": "x", "args": {}})
    assert (d.effect, d.code) == (DENY, "UNKNOWN_AGENT")


def test_unknown_agent_is_checked_before_the_tool_id() -> None:
    policy = compile_text('agent "a" {\n  default permit\n}\n')
    assert decide(policy, " bad", agent="zz").code == "UNKNOWN_AGENT"


# ---- v0 flat rules -----------------------------------------------------------------------------


def test_v0_flat_rules_belong_to_agent_default() -> None:
    policy = compile_text(
        """# a v0 file
permit search
deny! shell/*
permit *
"""
    )
    assert set(policy.agents) == {"default"}
    d = decide(policy, "search", agent="default")
    assert (d.effect, d.rule_ref) == (PERMIT, "governance.fms:2")
    d = decide(policy, "shell/exec", agent="default")
    assert (d.effect, d.rule_ref) == (DENY, "governance.fms:3")
    assert decide(policy, "other", agent="default").rule_ref == "governance.fms:4"
    assert decide(policy, "search", agent="a").code == "UNKNOWN_AGENT"


def test_v0_flat_rules_without_a_catch_all_deny_by_default() -> None:
    policy = compile_text("permit search\n")
    d = decide(policy, "other", agent="default")
    assert (d.effect, d.code) == (DENY, "POLICY_DENY")


# ---- request shape -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[1], "x", 5, True, (1,)])
def test_args_that_are_not_an_object_are_denied(args: Any) -> None:
    policy = compile_text('agent "a" {\n  permit *\n}\n')
    d = decide(policy, "x", args=args)
    assert (d.effect, d.code) == (DENY, "INVALID_REQUEST")


def test_null_or_missing_args_are_an_empty_object() -> None:
    policy = compile_text('agent "a" {\n  permit * if not n > 1\n}\n')
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x", "args": None}).effect == PERMIT
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x"}).effect == PERMIT


@pytest.mark.parametrize("request_obj", [None, [], "x", 1, {"agent_id": {"a": 1}}])
def test_garbage_requests_never_raise(request_obj: Any) -> None:
    policy = compile_text('agent "a" {\n  permit *\n}\n')
    d = evaluate(policy, request_obj)
    assert d.effect == DENY


def test_decisions_survive_the_artifact_round_trip() -> None:
    policy = compile_text(ORDER_POLICY + TOKYO + 'agent "b" {\n  permit x if time.hour == 9\n}\n')
    again = policy_from_json(policy.to_json())
    assert again.to_json() == policy.to_json()
    assert again.version == policy.version
    requests = [
        ("a", "refund", {"amount": 10}),
        ("a", "refund", {"amount": 100}),
        ("a", "stripe/payout", {"amount": 101}),
        ("b", "x", {}),
        ("a", "zzz", {}),
    ]
    for agent, tool, args in requests:
        assert decide(again, tool, args, agent=agent) == decide(policy, tool, args, agent=agent)
    assert decide(again, "x", agent="b").effect == PERMIT  # the timezone survived


def test_many_distinct_tool_ids_do_not_change_decisions() -> None:
    # The per-agent candidate cache is bounded; decisions must not depend on its state.
    policy = compile_text('agent "a" {\n  default permit\n  deny admin/*\n}\n')
    for i in range(5000):
        assert decide(policy, f"admin/x{i}").effect == DENY
        assert decide(policy, f"user/x{i}").effect == PERMIT


def test_the_policy_is_immutable() -> None:
    policy = compile_text(ORDER_POLICY)
    with pytest.raises((AttributeError, TypeError)):
        policy.agents["b"] = policy.agents["a"]  # type: ignore[index]
    with pytest.raises((AttributeError, TypeError)):
        policy.agents["a"].default = "permit"  # type: ignore[misc]


def test_regex_over_huge_input_is_fast() -> None:
    # RE2: a pattern that is catastrophic for a backtracking engine stays linear.
    import time

    policy = one_rule('s =~ "^(a+)+$"')
    start = time.perf_counter()
    d = decide(policy, "t", {"s": "a" * 50_000 + "!"})
    assert d.effect == DENY
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("tool_id", ["shell/exec", "SHELL/EXEC", "Shell/Exec"])
def test_tool_conditions_compare_case_insensitively_like_globs(tool_id: str) -> None:
    """`tool` holds the lower-cased id, so a literal or regex written in another case must still match:
    otherwise `deny * if tool == "Shell/Exec"` would silently never fire."""
    from faramesh.engine.policy.compiler import compile_files
    from faramesh.engine.policy.evaluate import evaluate
    from faramesh.engine.policy.parser import parse_fpl

    text = 'agent "a" { default permit rules { deny * if tool == "Shell/Exec"  deny * when tool =~ "^Admin/" } }'
    policy = compile_files(parse_fpl(text), {"governance.fms": "x"})
    assert evaluate(policy, {"agent_id": "a", "tool_id": tool_id, "args": {}, "time": 1}).effect == "DENY"
    assert evaluate(policy, {"agent_id": "a", "tool_id": "ADMIN/users", "args": {}, "time": 1}).effect == "DENY"
    assert evaluate(policy, {"agent_id": "a", "tool_id": "docs/read", "args": {}, "time": 1}).effect == "PERMIT"
