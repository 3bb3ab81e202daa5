"""FPL parser: every construct of issue #2 §2, syntax-error positions, the seed stack, the registry
artifacts and a generated 1,000-rule policy.

Each test asserts the parsed (or compiled) shape, and where the construct has a runtime meaning, the
decision the engine takes because of it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
from conftest import SHARED_REGISTRY, requires_shared, seed_stack_text
from faramesh.engine.policy.ast import BareWord, EnvRef
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.errors import PolicySchemaError, PolicySyntaxError
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.model import CompiledPolicy, thaw
from faramesh.engine.policy.parser import parse_condition, parse_fpl

NOW = 1_750_000_000  # a fixed request time (rate limits and budgets need one)


def compile_src(src: str, env: dict[str, str] | None = None) -> CompiledPolicy:
    digest = hashlib.sha256(src.encode()).hexdigest()
    return compile_files(parse_fpl(src), {"governance.fms": digest}, (), env or {})


def decide(policy: CompiledPolicy, agent: str, tool: str, **args: Any) -> tuple[str, str | None]:
    d = evaluate(policy, {"agent_id": agent, "tool_id": tool, "args": args, "time": NOW})
    return d.effect, d.rule_ref


def fields(block: Any) -> dict[str, Any]:
    return {a.name: a.value for a in block.fields}


def cond_of(src_condition: str) -> list[Any]:
    pf = parse_fpl(f'agent "a" {{ permit x if {src_condition} }}')
    return pf.agents[0].rules[0].condition


# ---------------------------------------------------------------------------------------------------
# top-level forms


def test_import_with_and_without_alias() -> None:
    pf = parse_fpl(
        'import "example.com/reg/frameworks/langgraph@1.0.0"\n'
        'import "example.com/reg/policies/stripe@1.3.0" as stripe\n'
    )
    assert [(i.path, i.alias) for i in pf.imports] == [
        ("example.com/reg/frameworks/langgraph@1.0.0", None),
        ("example.com/reg/policies/stripe@1.3.0", "stripe"),
    ]
    assert [i.pos.line for i in pf.imports] == [1, 2]


def test_runtime_block_values() -> None:
    pf = parse_fpl(
        "runtime {\n"
        '  mode = "enforce"\n'
        "  backend = sqlite\n"
        "  os_tier = true\n"
        "  immutable_config = false\n"
        '  postgres_url = env("FARAMESH_PG_URL")\n'
        '  strip_env = ["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN",]\n'
        "  env_allow = []\n"
        '  cold_start_deny_window = "10s"\n'
        "}\n"
    )
    (block,) = pf.blocks
    assert (block.kind, block.label) == ("runtime", None)
    f = fields(block)
    assert f["mode"] == "enforce"
    assert f["backend"] == BareWord("sqlite")
    assert f["os_tier"] is True
    assert f["immutable_config"] is False
    assert isinstance(f["postgres_url"], EnvRef) and f["postgres_url"].name == "FARAMESH_PG_URL"
    assert f["postgres_url"].pos.line == 6
    assert f["strip_env"] == ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")  # trailing comma accepted
    assert f["env_allow"] == ()
    # Durations are strings in the syntax; the compiler turns them into seconds.
    assert f["cold_start_deny_window"] == "10s"
    compiled = compile_src('runtime {\n  backend = sqlite\n  os_tier = true\n  cold_start_deny_window = "10s"\n}\n')
    assert dict(compiled.runtime) == {"backend": "sqlite", "os_tier": True, "cold_start_deny_window": 10}


def test_provider_and_identity_blocks() -> None:
    src = (
        'provider "vault" {\n'
        '  type = "vault"\n'
        '  addr = env("VAULT_ADDR")\n'
        '  mount = "kv/data/payments"\n'
        "}\n"
        'identity "prod" { type = "spiffe"; socket = "/run/spire/agent.sock"; trust_domain = "corp.example.com" }\n'
        'identity "sso" {\n  type = "oidc"\n  issuer = "https://login.example.com"\n  client_id = "faramesh"\n}\n'
    )
    pf = parse_fpl(src)
    assert [(b.kind, b.label) for b in pf.blocks] == [("provider", "vault"), ("identity", "prod"), ("identity", "sso")]
    assert fields(pf.blocks[0])["mount"] == "kv/data/payments"
    assert fields(pf.blocks[1])["trust_domain"] == "corp.example.com"
    policy = compile_src(src, {"VAULT_ADDR": "https://vault.internal:8200"})
    assert dict(policy.providers["vault"]) == {
        "type": "vault",
        "addr": "https://vault.internal:8200",
        "mount": "kv/data/payments",
    }
    assert policy.identities["prod"]["type"] == "spiffe"
    assert policy.identities["sso"]["issuer"] == "https://login.example.com"


def test_trust_block_keys() -> None:
    key = "ed25519:nxNjaQnS3L+zzKrRq48XfYBDWlFXkNJkxUiTD8j0sFs="
    pf = parse_fpl(
        f'trust {{\n  key "github.com/faramesh/faramesh-registry" {key}\n  key "example.com/acme" {key}\n}}\n'
    )
    assert [(k.publisher, k.key) for k in pf.trust] == [
        ("github.com/faramesh/faramesh-registry", key),
        ("example.com/acme", key),
    ]
    assert pf.trust[1].pos.line == 3


def test_trust_key_must_be_32_byte_ed25519() -> None:
    with pytest.raises(PolicySchemaError, match="32 bytes"):
        compile_src('trust { key "example.com/acme" ed25519:AAAA }')


def test_agent_ids_may_contain_slashes() -> None:
    policy = compile_src('agent "team-a/support/bot-1" {\n  default permit\n}\n')
    assert list(policy.agents) == ["team-a/support/bot-1"]
    assert decide(policy, "team-a/support/bot-1", "anything") == ("PERMIT", "governance.fms:2")
    assert decide(policy, "team-a/support", "anything")[0] == "DENY"


@pytest.mark.parametrize("bad_id", ["a//b", "/a", "a/", "a/../b", "has space"])
def test_malformed_agent_ids_are_rejected(bad_id: str) -> None:
    with pytest.raises(PolicySchemaError, match="agent id"):
        compile_src(f'agent "{bad_id}" {{ default deny }}')


def test_v0_flat_rules_compile_into_agent_default() -> None:
    src = "# a v0 policy\npermit http/get\ndeny! shell/*\ndefer payments/* when amount > 100\n"
    pf = parse_fpl(src)
    assert pf.agents == ()
    assert [(r.effect, r.strict, r.pattern) for r in pf.flat_rules] == [
        ("permit", False, "http/get"),
        ("deny", True, "shell/*"),
        ("defer", False, "payments/*"),
    ]
    policy = compile_src(src)
    assert list(policy.agents) == ["default"]
    agent = policy.agents["default"]
    assert [r.ref for r in agent.rules] == ["governance.fms:2", "governance.fms:3", "governance.fms:4"]
    assert agent.default is None  # no default → deny
    assert decide(policy, "default", "http/get") == ("PERMIT", "governance.fms:2")
    assert decide(policy, "default", "shell/exec") == ("DENY", "governance.fms:3")
    assert decide(policy, "default", "payments/send", amount=500) == ("DEFER", "governance.fms:4")
    assert decide(policy, "default", "payments/send", amount=5)[0] == "DENY"


def test_flat_rules_are_appended_to_a_declared_default_agent() -> None:
    policy = compile_src('agent "default" {\n  default deny\n  permit a\n}\npermit b\n')
    assert [r.pattern for r in policy.agents["default"].rules] == ["a", "b"]
    assert decide(policy, "default", "b") == ("PERMIT", "governance.fms:5")


# ---------------------------------------------------------------------------------------------------
# agents and rules


def test_default_statement_and_its_ref() -> None:
    for effect in ("permit", "defer", "deny"):
        policy = compile_src(f'agent "a" {{\n  rules {{ }}\n  default {effect}\n}}\n')
        assert policy.agents["a"].default == effect
        assert decide(policy, "a", "t") == (effect.upper(), "governance.fms:3")


def test_default_given_twice_is_a_syntax_error_at_the_second() -> None:
    with pytest.raises(PolicySyntaxError, match="twice") as exc:
        parse_fpl('agent "a" {\n  default deny\n  default permit\n}\n')
    assert exc.value.pos is not None and exc.value.pos.line == 3


def test_default_deny_bang_is_rejected() -> None:
    with pytest.raises(PolicySchemaError, match="default deny!"):
        compile_src('agent "a" {\n  default deny!\n}\n')


def test_rules_block_and_bare_rules_keep_source_order() -> None:
    src = 'agent "a" {\n  permit one\n  rules {\n    permit two\n    deny three\n  }\n  defer four\n}\n'
    agent = parse_fpl(src).agents[0]
    assert [(r.effect, r.pattern, r.pos.line) for r in agent.rules] == [
        ("permit", "one", 2),
        ("permit", "two", 4),
        ("deny", "three", 5),
        ("defer", "four", 7),
    ]


def test_if_and_when_are_the_same() -> None:
    with_if = parse_fpl('agent "a" { permit x if amount < 5 }').agents[0].rules[0]
    with_when = parse_fpl('agent "a" { permit x when amount < 5 }').agents[0].rules[0]
    assert with_if.condition == with_when.condition == ["cmp", "<", ["path", "amount"], ["lit", 5]]


def test_strict_deny_wins_over_an_earlier_permit() -> None:
    src = 'agent "a" {\n  default permit\n  permit shell/ls\n  deny! shell/*\n  deny shell/rm\n}\n'
    rules = parse_fpl(src).agents[0].rules
    assert [(r.effect, r.strict) for r in rules] == [("permit", False), ("deny", True), ("deny", False)]
    policy = compile_src(src)
    assert decide(policy, "a", "shell/ls") == ("DENY", "governance.fms:4")
    assert decide(policy, "a", "other") == ("PERMIT", "governance.fms:2")


def test_plain_deny_does_not_beat_an_earlier_permit() -> None:
    policy = compile_src('agent "a" {\n  permit shell/ls\n  deny shell/*\n}\n')
    assert decide(policy, "a", "shell/ls") == ("PERMIT", "governance.fms:2")


def test_notify_and_reason_on_a_rule_in_either_order() -> None:
    pf = parse_fpl(
        'agent "a" {\n'
        '  defer pay when amount > 10 notify "#payments" reason "large payment"\n'
        '  deny! wipe reason "never \\"wipe\\"" notify "#sec"\n'
        "}\n"
    )
    r1, r2 = pf.agents[0].rules
    assert (r1.notify, r1.reason) == ("#payments", "large payment")
    assert (r2.notify, r2.reason) == ("#sec", 'never "wipe"')
    policy = compile_src('agent "a" {\n  defer pay when amount > 10 notify "#payments" reason "large"\n}\n')
    d = evaluate(policy, {"agent_id": "a", "tool_id": "pay", "args": {"amount": 11}, "time": NOW})
    assert (d.effect, d.notify, d.reason) == ("DEFER", "#payments", "large")


def test_framework_and_command_in_an_agent() -> None:
    src = 'agent "a" {\n  framework "langgraph"\n  command = "python agent.py --serve"\n  default deny\n}\n'
    agent = parse_fpl(src).agents[0]
    assert agent.framework == "langgraph"
    assert fields(agent) == {"command": "python agent.py --serve"}
    compiled = compile_src(src).agents["a"]
    assert (compiled.framework, compiled.command) == ("langgraph", "python agent.py --serve")


def test_permit_star_matches_every_canonical_tool() -> None:
    policy = compile_src('agent "a" {\n  default deny\n  rules { permit * }\n}\n')
    assert policy.agents["a"].rules[0].pattern == "*"
    for tool in ("x", "stripe/charge", "a/b/c"):
        assert decide(policy, "a", tool) == ("PERMIT", "governance.fms:3")


def test_tool_globs() -> None:
    src = 'agent "a" {\n  default deny\n  permit stripe/*\n  permit *_search\n  defer "mcp/tools/call"\n}\n'
    assert [r.pattern for r in parse_fpl(src).agents[0].rules] == ["stripe/*", "*_search", "mcp/tools/call"]
    policy = compile_src(src)
    assert decide(policy, "a", "stripe/charge") == ("PERMIT", "governance.fms:3")
    assert decide(policy, "a", "stripe") == ("DENY", "governance.fms:2")
    assert decide(policy, "a", "paypal/charge") == ("DENY", "governance.fms:2")
    assert decide(policy, "a", "web_search") == ("PERMIT", "governance.fms:4")
    assert decide(policy, "a", "web_lookup") == ("DENY", "governance.fms:2")
    assert decide(policy, "a", "mcp/tools/call") == ("DEFER", "governance.fms:5")


def test_tool_ids_with_dots_colons_at_and_plus() -> None:
    rules = parse_fpl('agent "a" { permit fs.read:v2@local+x/a-b_c }').agents[0].rules
    assert rules[0].pattern == "fs.read:v2@local+x/a-b_c"


# ---------------------------------------------------------------------------------------------------
# conditions


def test_comparison_operators() -> None:
    for op in ("==", "!=", "<", "<=", ">", ">="):
        assert cond_of(f"amount {op} 3") == ["cmp", op, ["path", "amount"], ["lit", 3]]


def test_regex_match_operators_are_equivalent() -> None:
    a = cond_of('tool =~ "write|upload"')
    b = cond_of('tool matches "write|upload"')
    assert a == b == ["re", ["path", "tool"], "write|upload"]


def test_regex_escapes_are_kept_verbatim() -> None:
    assert cond_of(r'code =~ "^\d{3}-\w+$"') == ["re", ["path", "code"], r"^\d{3}-\w+$"]
    policy = compile_src('agent "a" {\n  permit x if code =~ "^\\d{3}$"\n}\n')
    assert decide(policy, "a", "x", code="123")[0] == "PERMIT"
    assert decide(policy, "a", "x", code="12a")[0] == "DENY"


def test_in_not_in_and_contains() -> None:
    assert cond_of('currency in ["usd", "eur"]') == [
        "cmp",
        "in",
        ["path", "currency"],
        ["list", ["lit", "usd"], ["lit", "eur"]],
    ]
    assert cond_of('currency not in ["usd"]') == ["cmp", "not_in", ["path", "currency"], ["list", ["lit", "usd"]]]
    assert cond_of('principal.groups contains "admins"') == [
        "cmp",
        "contains",
        ["path", "principal", "groups"],
        ["lit", "admins"],
    ]
    policy = compile_src(
        'agent "a" {\n'
        '  permit pay if currency in ["usd", "eur"]\n'
        '  defer pay if currency not in ["usd", "eur"]\n'
        '  permit admin if principal.groups contains "admins"\n'
        "}\n"
    )
    assert decide(policy, "a", "pay", currency="eur") == ("PERMIT", "governance.fms:2")
    assert decide(policy, "a", "pay", currency="gbp") == ("DEFER", "governance.fms:3")
    d = evaluate(policy, {"agent_id": "a", "tool_id": "admin", "principal": {"groups": ["devs", "admins"]}})
    assert (d.effect, d.rule_ref) == ("PERMIT", "governance.fms:4")
    d = evaluate(policy, {"agent_id": "a", "tool_id": "admin", "principal": {"groups": ["devs"]}})
    assert d.effect == "DENY"


def test_boolean_operator_precedence_and_parentheses() -> None:
    a, b, c = (["cmp", "==", ["path", n], ["lit", 1]] for n in "abc")
    assert cond_of("a == 1 or b == 1 and c == 1") == ["or", a, ["and", b, c]]
    assert cond_of("(a == 1 or b == 1) and c == 1") == ["and", ["or", a, b], c]
    assert cond_of("not a == 1 and b == 1") == ["and", ["not", a], b]
    assert cond_of("not (a == 1 and b == 1)") == ["not", ["and", a, b]]
    assert cond_of("a == 1 and b == 1 and c == 1") == ["and", a, b, c]
    policy = compile_src('agent "a" {\n  permit x if (a == 1 or b == 1) and not c == 1\n}\n')
    assert decide(policy, "a", "x", a=1, c=2)[0] == "PERMIT"
    assert decide(policy, "a", "x", b=1)[0] == "PERMIT"
    assert decide(policy, "a", "x", a=1, c=1)[0] == "DENY"
    assert decide(policy, "a", "x", c=2)[0] == "DENY"


def test_dotted_paths_and_bare_argument_names() -> None:
    assert cond_of('args.card.number == "4111"') == ["cmp", "==", ["path", "args", "card", "number"], ["lit", "4111"]]
    policy = compile_src(
        'agent "a" {\n'
        '  permit x if card.brand == "visa" and args.amount < 10 and principal.role == "ops" and time.hour >= 0\n'
        "}\n"
    )
    cond = thaw(policy.agents["a"].rules[0].condition)
    # bare names become args.<name>; the known roots stay as written
    paths = [c[2] for c in cond[1:]]
    assert paths == [
        ["path", "args", "card", "brand"],
        ["path", "args", "amount"],
        ["path", "principal", "role"],
        ["path", "time", "hour"],
    ]
    req = {"agent_id": "a", "tool_id": "x", "principal": {"role": "ops"}, "time": NOW}
    assert evaluate(policy, {**req, "args": {"card": {"brand": "visa"}, "amount": 5}}).effect == "PERMIT"
    assert evaluate(policy, {**req, "args": {"card": {"brand": "amex"}, "amount": 5}}).effect == "DENY"


def test_keywords_are_usable_as_names_in_conditions() -> None:
    cond = cond_of('tool == "x" and agent == "a" and default == 1 and rules == 2')
    assert [c[2] for c in cond[1:]] == [["path", "tool"], ["path", "agent"], ["path", "default"], ["path", "rules"]]


def test_money_literals_are_the_same_scalar_as_numbers() -> None:
    assert cond_of("amount < $25") == cond_of("amount < 25")
    assert cond_of("amount < $10.00") == cond_of("amount < 10")
    ten = cond_of("amount < $10.00")[3][1]
    assert ten == 10 and type(ten) is int
    assert cond_of("amount <= $10.50")[3] == ["lit", 10.5]
    policy = compile_src('agent "a" {\n  permit refund if amount < $25\n}\n')
    assert decide(policy, "a", "refund", amount=24.99)[0] == "PERMIT"
    assert decide(policy, "a", "refund", amount=25)[0] == "DENY"


def test_boolean_literals_and_bare_operand_conditions() -> None:
    assert cond_of("flagged == true") == ["cmp", "==", ["path", "flagged"], ["lit", True]]
    assert cond_of("dry_run != false") == ["cmp", "!=", ["path", "dry_run"], ["lit", False]]
    # a bare operand as the whole condition means `== true`
    assert cond_of("flagged") == ["cmp", "==", ["path", "flagged"], ["lit", True]]
    policy = compile_src('agent "a" {\n  deny x if flagged\n  permit x\n}\n')
    assert decide(policy, "a", "x", flagged=True) == ("DENY", "governance.fms:2")
    assert decide(policy, "a", "x", flagged="yes") == ("PERMIT", "governance.fms:3")


def test_negative_and_decimal_numbers() -> None:
    assert cond_of("delta > -5")[3] == ["lit", -5]
    assert cond_of("ratio < 0.25")[3] == ["lit", 0.25]


def test_string_list_and_nested_path_operands() -> None:
    assert cond_of("[1, 2] == nums") == ["cmp", "==", ["list", ["lit", 1], ["lit", 2]], ["path", "nums"]]
    assert cond_of('"abc" in haystack') == ["cmp", "in", ["lit", "abc"], ["path", "haystack"]]


def test_parse_condition_entry_point_matches_rule_conditions() -> None:
    text = '(amount > $10 or currency not in ["usd"]) and tool =~ "^pay"'
    assert parse_condition(text, "governance.fms.yaml") == cond_of(text)


def test_parse_condition_errors_are_syntax_errors() -> None:
    with pytest.raises(PolicySyntaxError, match="in condition"):
        parse_condition("amount <", "governance.fms.yaml")


# ---------------------------------------------------------------------------------------------------
# limits, budgets, redaction, blocks


@pytest.mark.parametrize(
    ("unit", "per_seconds"),
    [
        ("second", 1),
        ("seconds", 1),
        ("minute", 60),
        ("minutes", 60),
        ("hour", 3600),
        ("hours", 3600),
        ("day", 86400),
        ("days", 86400),
    ],
)
def test_rate_limit_units(unit: str, per_seconds: int) -> None:
    src = f'agent "a" {{\n  default permit\n  rate_limit "stripe/*": 7 per {unit}\n}}\n'
    (rl,) = parse_fpl(src).agents[0].rate_limits
    assert (rl.pattern, rl.count, rl.unit) == ("stripe/*", 7, unit)
    (compiled,) = compile_src(src).agents["a"].rate_limits
    # plurals compile to the singular unit
    assert (compiled.pattern, compiled.count, compiled.unit, compiled.per_seconds) == (
        "stripe/*",
        7,
        unit.removesuffix("s"),
        per_seconds,
    )
    assert compiled.ref == "governance.fms:3"


def test_rate_limit_bad_unit_and_zero_count() -> None:
    with pytest.raises(PolicySchemaError, match="did you mean `minute`"):
        compile_src('agent "a" { rate_limit "x": 5 per minit }')
    with pytest.raises(PolicySchemaError, match="at least one"):
        compile_src('agent "a" { rate_limit "x": 0 per minute }')


def test_rate_limit_is_enforced_by_the_compiled_policy() -> None:
    policy = compile_src('agent "a" {\n  default permit\n  rate_limit "refund": 5 per minute\n}\n')
    d = evaluate(policy, {"agent_id": "a", "tool_id": "refund", "args": {}, "time": NOW})
    assert d.effect == "PERMIT"
    (limit,) = policy.agents["a"].rate_limits
    assert limit.refill_per_second == pytest.approx(5 / 60)


def test_budget_with_and_without_equals_signs() -> None:
    src = (
        'agent "a" {\n'
        "  budget daily { max $1000 on_exceed defer }\n"
        "  budget weekly { max = $10.50; max_calls = 100; warn_at = 0.8; on_exceed = audit }\n"
        '  budget ops { period = "hourly"\n max_calls 5\n warn_at 0.5\n on_exceed "deny" }\n'
        "}\n"
    )
    daily, weekly, ops = parse_fpl(src).agents[0].budgets
    assert daily.name == "daily" and fields(daily) == {"max": 1000, "on_exceed": BareWord("defer")}
    assert fields(weekly) == {"max": 10.5, "max_calls": 100, "warn_at": 0.8, "on_exceed": BareWord("audit")}
    assert fields(ops) == {"period": "hourly", "max_calls": 5, "warn_at": 0.5, "on_exceed": "deny"}
    compiled = {b.name: b for b in compile_src(src).agents["a"].budgets}
    assert (compiled["daily"].period, compiled["daily"].max_cents, compiled["daily"].on_exceed) == (
        "daily",
        100000,
        "defer",
    )
    w = compiled["weekly"]
    assert (w.period, w.max_cents, w.max_calls, w.warn_at, w.on_exceed) == ("weekly", 1050, 100, 0.8, "audit")
    o = compiled["ops"]
    assert (o.period, o.max_cents, o.max_calls, o.on_exceed, o.ref) == ("hourly", None, 5, "deny", "governance.fms:4")


def test_redact() -> None:
    src = 'agent "a" {\n  redact refund args: ["card.number", "card.cvv"]\n  redact "stripe/*" args: [token]\n}\n'
    r1, r2 = parse_fpl(src).agents[0].redactions
    assert (r1.pattern, r1.paths) == ("refund", ("card.number", "card.cvv"))
    assert (r2.pattern, r2.paths) == ("stripe/*", (BareWord("token"),))
    compiled = compile_src(src).agents["a"].redactions
    assert [(r.pattern, r.paths, r.ref) for r in compiled] == [
        ("refund", ("card.number", "card.cvv"), "governance.fms:2"),
        ("stripe/*", ("token",), "governance.fms:3"),
    ]


def test_redact_rejects_empty_paths() -> None:
    with pytest.raises(PolicySchemaError, match="dotted argument paths"):
        compile_src('agent "a" { redact x args: ["card..number"] }')
    with pytest.raises(PolicySchemaError, match="dotted argument paths"):
        compile_src('agent "a" { redact x args: [] }')


def test_egress_model_policy_session_and_repeated_alerts() -> None:
    src = (
        'agent "a" {\n'
        '  egress { allow = ["api.example.com", "*.stripe.com"]; deny = ["169.254.169.254"] }\n'
        '  model_policy { allow = ["gpt-4o", "claude-*"] }\n'
        '  session { max_duration = "24h"; idle_timeout = "10m" }\n'
        '  alert { on = "deny" notify = "slack://#sec-alerts" }\n'
        '  alert { on = "rate_exceeded"; notify = "mailto:ops@example.com" }\n'
        "}\n"
    )
    agent = parse_fpl(src).agents[0]
    assert [b.kind for b in agent.blocks] == ["egress", "model_policy", "session", "alert", "alert"]
    assert fields(agent.blocks[0]) == {"allow": ("api.example.com", "*.stripe.com"), "deny": ("169.254.169.254",)}
    # '#' inside a string is not a comment
    assert fields(agent.blocks[3])["notify"] == "slack://#sec-alerts"
    compiled = compile_src(src).agents["a"]
    assert {k: dict(v) for k, v in compiled.settings.items()} == {
        "egress": {"allow": ("api.example.com", "*.stripe.com"), "deny": ("169.254.169.254",)},
        "model_policy": {"allow": ("gpt-4o", "claude-*")},
        "session": {"max_duration": 86400, "idle_timeout": 600},
    }
    assert [dict(a) for a in compiled.alerts] == [
        {"on": "deny", "notify": "slack://#sec-alerts"},
        {"on": "rate_exceeded", "notify": "mailto:ops@example.com"},
    ]


def test_non_repeatable_agent_block_twice_is_an_error() -> None:
    with pytest.raises(PolicySchemaError, match="egress` is declared twice"):
        compile_src('agent "a" {\n  egress { allow = ["a"] }\n  egress { allow = ["b"] }\n}\n')


def test_alert_needs_on_and_notify() -> None:
    with pytest.raises(PolicySchemaError, match="alert needs"):
        compile_src('agent "a" { alert { on = "deny" } }')


def test_comments_anywhere() -> None:
    src = (
        "# leading comment\n"
        'agent "a" { # trailing comment after a brace\n'
        "  default deny # after a default\n"
        "  # a comment line inside\n"
        "  permit x if amount < 5 # after a condition\n"
        '  permit y reason "# not a comment"\n'
        "}\n"
        "# trailing comment without newline"
    )
    agent = parse_fpl(src).agents[0]
    assert agent.default == "deny"
    assert [(r.pattern, r.pos.line) for r in agent.rules] == [("x", 5), ("y", 6)]
    assert agent.rules[1].reason == "# not a comment"


def test_whole_file_on_one_line_with_separators() -> None:
    pf = parse_fpl('agent "a" { default deny; permit x; rules { permit y, deny z }; rate_limit "x": 1 per second }')
    assert [r.pattern for r in pf.agents[0].rules] == ["x", "y", "z"]


def test_empty_file_parses_to_nothing() -> None:
    pf = parse_fpl("   \n# only a comment\n")
    assert (pf.imports, pf.blocks, pf.trust, pf.agents, pf.flat_rules) == ((), (), (), (), ())


# ---------------------------------------------------------------------------------------------------
# syntax errors: PolicySyntaxError with the right line and column


@pytest.mark.parametrize(
    ("src", "line", "column", "fragment"),
    [
        ('agent "a" {\n  default deny\n  permit refund if amount <\n}\n', 4, 1, "unexpected '}'"),
        ('agent "a" {\n  default deny\n  permit refund if amount < 5 )\n}\n', 3, 31, "unexpected ')'"),
        ('agent "a" {\n  default deny\n  perm refund\n}\n', 3, 8, "unexpected 'refund'"),
        ('agent "a" {\n  default maybe\n}\n', 2, 11, "unexpected"),
        ('runtime {\n  mode = "enforce"\n  wal_dir = \n}\n', 4, 1, "unexpected '}'"),
        ('agent "a" {\n  permit x if a == "unterminated\n}\n', 2, 20, "unexpected character '\"'"),
        ('agent "a" {\n  permit x ^ y\n}\n', 2, 12, "unexpected character '^'"),
        ('agent "a" {\n  default deny\n', 2, 15, "end of file"),
        ('import "x@1.0.0" as\n', 1, 20, "end of file"),
    ],
)
def test_syntax_errors_carry_line_and_column(src: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(PolicySyntaxError) as exc:
        parse_fpl(src)
    err = exc.value
    assert err.pos is not None
    assert (err.pos.file, err.pos.line, err.pos.column) == ("governance.fms", line, column), str(err)
    assert fragment in err.message
    assert str(err).startswith(f"governance.fms:{line}:{column}: ")
    assert err.exit_code == 1 and err.code == "POLICY_SYNTAX"


def test_syntax_error_names_the_file_given() -> None:
    with pytest.raises(PolicySyntaxError) as exc:
        parse_fpl("permit\n", "stacks/prod/governance.fms")
    assert exc.value.pos is not None and exc.value.pos.file == "stacks/prod/governance.fms"


def test_syntax_error_message_uses_readable_token_names() -> None:
    with pytest.raises(PolicySyntaxError) as exc:
        parse_fpl('agent "a" {\n  permit\n}\n')
    # The user reads "a tool id or glob", never lark's terminal name.
    assert "tool id or glob" in exc.value.message
    assert "TOOL_GLOB" not in exc.value.message


@pytest.mark.parametrize(
    "src",
    ["\x00", "agent", 'agent "a" {{{', "}", "permit x if", "$$$", 'trust { key "x" rsa:AAAA }'],
)
def test_garbage_raises_only_policy_syntax_error(src: str) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_fpl(src)


# ---------------------------------------------------------------------------------------------------
# the seed's production stack and the public registry artifacts


@requires_shared
def test_seed_production_stack_parses_unchanged() -> None:
    pf = parse_fpl(seed_stack_text())
    assert [(i.path.rsplit("@", 1)[1], i.alias) for i in pf.imports] == [("1.0.0", None), ("1.3.0", "stripe")]
    assert [(b.kind, b.label) for b in pf.blocks] == [
        ("runtime", None),
        ("provider", "vault"),
        ("provider", "audit-kms"),
        ("provider", "splunk"),
        ("identity", "prod"),
    ]
    runtime = fields(pf.blocks[0])
    assert runtime["postgres_url"] == EnvRef("FARAMESH_PG_URL", runtime["postgres_url"].pos)
    assert runtime["cold_start_deny_window"] == "10s"
    assert [t.publisher for t in pf.trust] == ["github.com/faramesh/faramesh-registry"]
    assert pf.trust[0].key == "ed25519:nxNjaQnS3L+zzKrRq48XfYBDWlFXkNJkxUiTD8j0sFs="
    (agent,) = pf.agents
    assert agent.agent_id == "support-bot" and agent.default == "deny"
    assert [(r.effect, r.pattern, r.condition is not None) for r in agent.rules] == [
        ("permit", "knowledgebase/search", False),
        ("permit", "ticket/read", False),
        ("permit", "refund", True),
        ("defer", "refund", True),
        ("deny", "refund", False),
    ]
    assert agent.rules[2].condition == ["cmp", "<", ["path", "amount"], ["lit", 25]]
    assert [(r.pattern, r.count, r.unit) for r in agent.rate_limits] == [("refund", 5, "minute")]
    (budget,) = agent.budgets
    assert fields(budget) == {"max": 1000, "on_exceed": BareWord("defer")}
    assert agent.redactions[0].paths == ("card.number", "card.cvv")
    assert [b.kind for b in agent.blocks] == ["egress", "alert"]


@requires_shared
def test_seed_agent_block_compiles_to_the_documented_decisions() -> None:
    text = seed_stack_text()
    agent_src = text[text.index('agent "support-bot"') :]
    policy = compile_src(agent_src)
    assert decide(policy, "support-bot", "knowledgebase/search")[0] == "PERMIT"
    assert decide(policy, "support-bot", "ticket/read")[0] == "PERMIT"
    assert decide(policy, "support-bot", "refund", amount=10)[0] == "PERMIT"
    assert decide(policy, "support-bot", "refund", amount=100)[0] == "DEFER"
    assert decide(policy, "support-bot", "refund", amount=1000)[0] == "DENY"
    assert decide(policy, "support-bot", "unknown/tool")[0] == "DENY"
    budget = policy.agents["support-bot"].budgets[0]
    assert (budget.max_cents, budget.on_exceed, budget.period) == (100000, "defer", "daily")


def _registry_artifacts() -> list[Any]:
    if not SHARED_REGISTRY.is_dir():
        return []
    return sorted(SHARED_REGISTRY.glob("artifacts/**/*.fpl"))


@requires_shared
def test_registry_mirror_has_artifacts() -> None:
    names = {p.relative_to(SHARED_REGISTRY).as_posix() for p in _registry_artifacts()}
    assert "artifacts/policies/faramesh/stripe/1.0.0/policy.fpl" in names
    assert "artifacts/frameworks/langgraph/1.0.0/profile.fpl" in names
    assert len(names) >= 14


@requires_shared
@pytest.mark.parametrize("artifact", _registry_artifacts(), ids=lambda p: p.relative_to(SHARED_REGISTRY).as_posix())
def test_every_registry_artifact_parses_and_compiles(artifact: Any) -> None:
    text = artifact.read_text(encoding="utf-8")
    pf = parse_fpl(text, artifact.name)
    assert pf.agents, "every artifact declares at least one agent"
    n_rules = sum(len(a.rules) for a in pf.agents)
    assert n_rules == sum(
        1
        for line in text.splitlines()
        if line.split("#")[0].strip().split(" ")[0] in ("permit", "defer", "deny", "deny!")
    ) + text.count("rules { permit * }")
    policy = compile_files(pf, {artifact.name: "0" * 64})
    assert sum(len(a.rules) for a in policy.agents.values()) == n_rules
    for agent in policy.agents.values():
        assert agent.default == "deny"
        for rule in agent.rules:
            assert rule.ref.startswith(f"{artifact.name}:")


@requires_shared
def test_registry_artifact_specific_forms() -> None:
    base = SHARED_REGISTRY / "artifacts"
    stripe = compile_files(parse_fpl((base / "policies/faramesh/stripe/1.0.0/policy.fpl").read_text()), {})
    d = evaluate(stripe, {"agent_id": "payment-bot", "tool_id": "stripe/charge", "args": {"amount": 5000}})
    assert (d.effect, d.notify) == ("DEFER", "#payments")
    shell = compile_files(parse_fpl((base / "policies/faramesh/shell/1.0.0/policy.fpl").read_text()), {})
    assert [r.strict for r in shell.agents["ops-agent"].rules] == [True, True, False]
    mcp = compile_files(parse_fpl((base / "policies/faramesh/mcp/1.0.0/policy.fpl").read_text()), {})
    # `tool` is matched case-insensitively, like tool globs
    assert thaw(mcp.agents["default"].rules[2].condition) == ["re", ["path", "tool"], "(?i)write|upload|send"]
    langgraph = compile_files(parse_fpl((base / "frameworks/langgraph/1.0.0/profile.fpl").read_text()), {})
    assert langgraph.agents["default"].framework == "langgraph"
    assert langgraph.runtime["mode"] == "enforce"


# ---------------------------------------------------------------------------------------------------
# scale


def _generated_policy(n: int) -> str:
    lines = ['agent "big" {', "  default deny"]
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines.append(f"  permit svc{i}/read")
        elif kind == 1:
            lines.append(f'  defer svc{i}/* when amount > {i} and currency in ["usd", "eur"]')
        elif kind == 2:
            lines.append(f'  deny tool_{i} if user =~ "^bad{i}"')
        else:
            lines.append(f"  deny! svc{i}/admin/*")
    lines.append("}")
    return "\n".join(lines) + "\n"


def test_thousand_rule_policy_parses_and_compiles() -> None:
    src = _generated_policy(1000)
    start = time.perf_counter()
    pf = parse_fpl(src)
    parsed = time.perf_counter()
    policy = compile_files(pf, {"governance.fms": hashlib.sha256(src.encode()).hexdigest()})
    done = time.perf_counter()
    print(f"\n1,000-rule policy: parse {1000 * (parsed - start):.1f} ms, compile {1000 * (done - parsed):.1f} ms")
    agent = policy.agents["big"]
    assert len(agent.rules) == 1000
    assert sum(r.strict for r in agent.rules) == 250
    assert sum(r.condition is not None for r in agent.rules) == 500
    assert [r.effect for r in agent.rules[:4]] == ["permit", "defer", "deny", "deny"]
    # rule i is on line i + 3
    assert all(r.ref == f"governance.fms:{i + 3}" for i, r in enumerate(agent.rules))
    assert decide(policy, "big", "svc996/read") == ("PERMIT", "governance.fms:999")
    assert decide(policy, "big", "svc997/pay", amount=5000, currency="usd") == ("DEFER", "governance.fms:1000")
    assert decide(policy, "big", "svc997/pay", amount=5000, currency="gbp") == ("DENY", "governance.fms:2")
    assert decide(policy, "big", "svc999/admin/x") == ("DENY", "governance.fms:1002")
    assert decide(policy, "big", "tool_998", user="bad998x") == ("DENY", "governance.fms:1001")


@pytest.mark.parametrize(
    "src",
    [
        'agent "a" { permit x if ' + "not " * 5000 + "a }",
        "runtime { strip_env = " + "[" * 5000 + "]" * 5000 + " }",
        'agent "a" { permit x if a in ' + "[" * 3000 + "]" * 3000 + " }",
    ],
    ids=["not-chain", "nested-list-value", "nested-list-operand"],
)
def test_pathological_nesting_is_a_syntax_error_not_a_recursion_error(src: str) -> None:
    with pytest.raises(PolicySyntaxError, match="nested too deeply"):
        parse_fpl(src)


def test_pathological_nesting_in_a_yaml_condition_is_a_syntax_error() -> None:
    with pytest.raises(PolicySyntaxError, match="nested too deeply"):
        parse_condition("not " * 5000 + "a", "governance.fms.yaml")
