"""governance.fms.yaml / governance.fms.json: the same policy as FPL, one format per stack, errors with
line numbers and "did you mean" for unknown keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from faramesh.engine.policy.ast import EnvRef
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.errors import PolicyEnvError, PolicyLoadError, PolicySchemaError, PolicySyntaxError
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.loaders import load_json, load_yaml
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.policy.stack import compile_stack, read_stack

NOW = 1_750_000_000
ENV = {"VAULT_ADDR": "https://vault.internal:8200"}

FPL = """\
runtime {
  mode = "enforce"
  backend = "sqlite"
  cold_start_deny_window = "10s"
  strip_env = ["AWS_SECRET_ACCESS_KEY"]
}
provider "vault" {
  type = "vault"
  addr = env("VAULT_ADDR")
  token = env("VAULT_TOKEN")
}
identity "prod" {
  type = "spiffe"
  trust_domain = "corp.example.com"
}
agent "support-bot" {
  default deny
  framework "langgraph"
  command = "python agent.py"
  rules {
    permit knowledgebase/search
    permit refund if amount < $25 and currency in ["usd", "eur"]
    defer refund when amount < 500 notify "#approvals" reason "mid-size refund"
    deny! admin/*
    permit ticket/* if not (principal.role == "guest" or ticket.id =~ "^X-")
    deny refund
  }
  rate_limit "refund": 5 per minute
  rate_limit "stripe/*": 100 per hour
  budget daily { max $1000 on_exceed defer }
  budget weekly { max = $10.50; max_calls = 100; warn_at = 0.8 }
  redact refund args: ["card.number", "card.cvv"]
  egress { allow = ["api.example.com"]; deny = ["169.254.169.254"] }
  model_policy { allow = ["gpt-4o"] }
  session { max_duration = "24h"; idle_timeout = "10m" }
  alert { on = "deny" notify = "slack://#sec-alerts" }
  alert { on = "rate_exceeded" notify = "#ops" }
}
agent "ops/runner" {
  default permit
  deny shell/* when cmd contains "rm"
}
permit legacy/ping
"""

YAML = """\
# the same policy as FPL above
runtime:
  mode: enforce
  backend: sqlite
  cold_start_deny_window: 10s
  strip_env: [AWS_SECRET_ACCESS_KEY]
providers:
  vault:
    type: vault
    addr: 'env("VAULT_ADDR")'
    token: 'env("VAULT_TOKEN")'
identities:
  prod: {type: spiffe, trust_domain: corp.example.com}
agents:
  support-bot:
    default: deny
    framework: langgraph
    command: python agent.py
    rules:
      - {effect: permit, tool: knowledgebase/search}
      - effect: permit
        tool: refund
        condition: 'amount < $25 and currency in ["usd", "eur"]'
      - {effect: defer, tool: refund, condition: amount < 500, notify: "#approvals", reason: mid-size refund}
      - {effect: "deny!", tool: admin/*}
      - effect: permit
        tool: ticket/*
        condition: not (principal.role == "guest" or ticket.id =~ "^X-")
      - {effect: deny, tool: refund}
    rate_limits:
      - {tool: refund, limit: 5, per: minute}
      - {tool: stripe/*, limit: 100, per: hour}
    budgets:
      daily: {max: 1000, on_exceed: defer}
      weekly: {max: 10.50, max_calls: 100, warn_at: 0.8}
    redactions:
      - {tool: refund, args: [card.number, card.cvv]}
    egress: {allow: [api.example.com], deny: [169.254.169.254]}
    model_policy: {allow: [gpt-4o]}
    session: {max_duration: 24h, idle_timeout: 10m}
    alerts:
      - {on: deny, notify: "slack://#sec-alerts"}
      - on: rate_exceeded
        notify: "#ops"
  ops/runner:
    default: permit
    rules:
      - {effect: deny, tool: shell/*, condition: cmd contains "rm"}
rules:
  - {effect: permit, tool: legacy/ping}
"""

DOC: dict[str, Any] = {
    "runtime": {
        "mode": "enforce",
        "backend": "sqlite",
        "cold_start_deny_window": "10s",
        "strip_env": ["AWS_SECRET_ACCESS_KEY"],
    },
    "providers": {"vault": {"type": "vault", "addr": 'env("VAULT_ADDR")', "token": 'env("VAULT_TOKEN")'}},
    "identities": {"prod": {"type": "spiffe", "trust_domain": "corp.example.com"}},
    "agents": {
        "support-bot": {
            "default": "deny",
            "framework": "langgraph",
            "command": "python agent.py",
            "rules": [
                {"effect": "permit", "tool": "knowledgebase/search"},
                {"effect": "permit", "tool": "refund", "condition": 'amount < $25 and currency in ["usd", "eur"]'},
                {
                    "effect": "defer",
                    "tool": "refund",
                    "condition": "amount < 500",
                    "notify": "#approvals",
                    "reason": "mid-size refund",
                },
                {"effect": "deny!", "tool": "admin/*"},
                {
                    "effect": "permit",
                    "tool": "ticket/*",
                    "condition": 'not (principal.role == "guest" or ticket.id =~ "^X-")',
                },
                {"effect": "deny", "tool": "refund"},
            ],
            "rate_limits": [
                {"tool": "refund", "limit": 5, "per": "minute"},
                {"tool": "stripe/*", "limit": 100, "per": "hour"},
            ],
            "budgets": {
                "daily": {"max": 1000, "on_exceed": "defer"},
                "weekly": {"max": 10.50, "max_calls": 100, "warn_at": 0.8},
            },
            "redactions": [{"tool": "refund", "args": ["card.number", "card.cvv"]}],
            "egress": {"allow": ["api.example.com"], "deny": ["169.254.169.254"]},
            "model_policy": {"allow": ["gpt-4o"]},
            "session": {"max_duration": "24h", "idle_timeout": "10m"},
            "alerts": [{"on": "deny", "notify": "slack://#sec-alerts"}, {"on": "rate_exceeded", "notify": "#ops"}],
        },
        "ops/runner": {
            "default": "permit",
            "rules": [{"effect": "deny", "tool": "shell/*", "condition": 'cmd contains "rm"'}],
        },
    },
    "rules": [{"effect": "permit", "tool": "legacy/ping"}],
}


def without_refs(node: Any) -> Any:
    """to_dict() minus what necessarily differs between formats: source references and digests."""
    if isinstance(node, dict):
        return {k: without_refs(v) for k, v in node.items() if k not in ("ref", "default_ref", "sources")}
    if isinstance(node, list):
        return [without_refs(v) for v in node]
    return node


def stack_with(tmp_path: Path, name: str, text: str) -> CompiledPolicy:
    d = tmp_path / name.replace(".", "_")
    d.mkdir()
    (d / name).write_text(text)
    return compile_stack(d, env=ENV).policy


@pytest.fixture
def compiled(tmp_path: Path) -> dict[str, CompiledPolicy]:
    return {
        "fpl": stack_with(tmp_path, "governance.fms", FPL),
        "yaml": stack_with(tmp_path, "governance.fms.yaml", YAML),
        "json": stack_with(tmp_path, "governance.fms.json", json.dumps(DOC, indent=2)),
    }


def test_yaml_and_json_compile_to_the_same_policy_as_fpl(compiled: dict[str, CompiledPolicy]) -> None:
    fpl = without_refs(compiled["fpl"].to_dict())
    assert without_refs(compiled["yaml"].to_dict()) == fpl
    assert without_refs(compiled["json"].to_dict()) == fpl
    # and the comparison is not vacuous
    bot = fpl["agents"]["support-bot"]
    assert len(bot["rules"]) == 6 and len(bot["rate_limits"]) == 2 and len(bot["budgets"]) == 2
    assert bot["budgets"][1]["max_cents"] == 1050
    assert bot["settings"]["egress"] == {"allow": ["api.example.com"], "deny": ["169.254.169.254"]}
    assert fpl["providers"]["vault"] == {"type": "vault", "addr": ENV["VAULT_ADDR"], "token": {"$env": "VAULT_TOKEN"}}
    assert sorted(fpl["agents"]) == ["default", "ops/runner", "support-bot"]


def test_sources_name_the_format_file(compiled: dict[str, CompiledPolicy]) -> None:
    assert list(compiled["fpl"].sources) == ["governance.fms"]
    assert list(compiled["yaml"].sources) == ["governance.fms.yaml"]
    assert list(compiled["json"].sources) == ["governance.fms.json"]


REQUESTS = [
    ("support-bot", "knowledgebase/search", {}, {}, "PERMIT"),
    ("support-bot", "refund", {"amount": 10, "currency": "usd"}, {}, "PERMIT"),
    ("support-bot", "refund", {"amount": 10, "currency": "gbp"}, {}, "DEFER"),
    ("support-bot", "refund", {"amount": 900}, {}, "DENY"),
    ("support-bot", "admin/users", {}, {}, "DENY"),
    ("support-bot", "ticket/read", {"ticket": {"id": "T-1"}}, {"role": "staff"}, "PERMIT"),
    ("support-bot", "ticket/read", {"ticket": {"id": "X-1"}}, {"role": "staff"}, "DENY"),
    ("support-bot", "ticket/read", {"ticket": {"id": "T-1"}}, {"role": "guest"}, "DENY"),
    ("ops/runner", "shell/exec", {"cmd": "rm -rf /"}, {}, "DENY"),
    ("ops/runner", "shell/exec", {"cmd": "ls"}, {}, "PERMIT"),
    ("default", "legacy/ping", {}, {}, "PERMIT"),
    ("default", "legacy/other", {}, {}, "DENY"),
]


@pytest.mark.parametrize(("agent", "tool", "args", "principal", "effect"), REQUESTS)
def test_all_formats_decide_alike(
    compiled: dict[str, CompiledPolicy],
    agent: str,
    tool: str,
    args: dict[str, Any],
    principal: dict[str, Any],
    effect: str,
) -> None:
    req = {"agent_id": agent, "tool_id": tool, "args": args, "principal": principal, "time": NOW}
    decisions = {fmt: evaluate(policy, req) for fmt, policy in compiled.items()}
    assert {fmt: d.effect for fmt, d in decisions.items()} == {"fpl": effect, "yaml": effect, "json": effect}
    assert decisions["yaml"].code == decisions["fpl"].code == decisions["json"].code


def test_yaml_refs_point_at_the_rule_lines(compiled: dict[str, CompiledPolicy]) -> None:
    lines = YAML.splitlines()
    bot = compiled["yaml"].agents["support-bot"]
    for rule in bot.rules:
        file, _, line = rule.ref.partition(":")
        assert file == "governance.fms.yaml"
        text = lines[int(line) - 1]
        assert rule.pattern in text or "effect" in text, (rule.ref, text)
    assert [r.ref for r in bot.rules] == [f"governance.fms.yaml:{n}" for n in (20, 21, 24, 25, 26, 29)]
    assert compiled["yaml"].agents["default"].rules[0].ref == "governance.fms.yaml:50"


def test_json_refs_point_at_the_rule_lines(compiled: dict[str, CompiledPolicy]) -> None:
    text = json.dumps(DOC, indent=2)
    lines = text.splitlines()
    refs = [r.ref for r in compiled["json"].agents["support-bot"].rules]
    assert len(set(refs)) == len(refs), refs  # every rule has its own line
    for rule in compiled["json"].agents["support-bot"].rules:
        n = int(rule.ref.rpartition(":")[2])
        # the rule object opens on that line, and its tool is on it or shortly after
        window = "\n".join(lines[n - 1 : n + 8])
        assert lines[n - 1].strip().startswith("{") and f'"tool": "{rule.pattern}"' in window, (rule.ref, window)


# ---------------------------------------------------------------------------------------------------
# the loaders' own forms


def test_yaml_imports_trust_and_env_references() -> None:
    pf = load_yaml(
        "imports:\n"
        '  - "example.com/hub/policies/a@1.0.0"\n'
        '  - {path: "example.com/hub/policies/stripe@1.0.0", as: stripe}\n'
        "trust:\n"
        '  - {publisher: example.com/hub, key: "ed25519:nxNjaQnS3L+zzKrRq48XfYBDWlFXkNJkxUiTD8j0sFs="}\n'
        "runtime:\n"
        "  postgres_url: 'env(\"PG_URL\")'\n"
    )
    assert [(i.path, i.alias, i.pos.line) for i in pf.imports] == [
        ("example.com/hub/policies/a@1.0.0", None, 1),  # a scalar has no mark of its own: the list's line
        ("example.com/hub/policies/stripe@1.0.0", "stripe", 3),
    ]
    assert [(t.publisher, t.key) for t in pf.trust] == [
        ("example.com/hub", "ed25519:nxNjaQnS3L+zzKrRq48XfYBDWlFXkNJkxUiTD8j0sFs=")
    ]
    (runtime,) = pf.blocks
    (field,) = runtime.fields
    assert isinstance(field.value, EnvRef) and field.value.name == "PG_URL"


def test_yaml_on_off_yes_no_are_strings_not_booleans() -> None:
    # YAML 1.1 would read the `on:` key as True and `yes` as a boolean.
    policy = compile_files(
        load_yaml("agents:\n  a:\n    alerts:\n      - {on: deny, notify: '#x'}\n    framework: yes\n"), {}
    )
    assert [dict(a) for a in policy.agents["a"].alerts] == [{"on": "deny", "notify": "#x"}]
    assert policy.agents["a"].framework == "yes"
    rt = compile_files(load_yaml("runtime: {os_tier: true, immutable_config: false}\n"), {}).runtime
    assert (rt["os_tier"], rt["immutable_config"]) == (True, False)


def test_unset_env_in_yaml_names_variable_and_line() -> None:
    pf = load_yaml("runtime:\n  mode: enforce\nproviders:\n  v:\n    type: vault\n    addr: 'env(\"VAULT_ADDR\")'\n")
    with pytest.raises(PolicyEnvError) as exc:
        compile_files(pf, {}, (), {})
    assert "VAULT_ADDR" in exc.value.message
    assert exc.value.pos is not None and exc.value.pos.line == 5  # the provider mapping starts on line 5


def test_empty_yaml_and_json_documents() -> None:
    assert load_yaml("").agents == ()
    assert load_yaml("# nothing\n").flat_rules == ()
    assert load_json("{}").agents == ()


# ---------------------------------------------------------------------------------------------------
# one format per stack


@pytest.mark.parametrize(
    "names",
    [
        ("governance.fms", "governance.fms.yaml"),
        ("governance.fms", "governance.fms.json"),
        ("governance.fms.yaml", "governance.fms.json"),
        ("governance.fms", "governance.fms.yaml", "governance.fms.json"),
    ],
)
def test_two_formats_in_one_stack_is_an_error(tmp_path: Path, names: tuple[str, ...]) -> None:
    texts = {"governance.fms": FPL, "governance.fms.yaml": YAML, "governance.fms.json": json.dumps(DOC)}
    for name in names:
        (tmp_path / name).write_text(texts[name])
    with pytest.raises(PolicyLoadError) as exc:
        compile_stack(tmp_path, env=ENV)
    for name in names:
        assert name in exc.value.message
    assert exc.value.exit_code == 1


def test_no_policy_file_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "governance.yaml").write_text(YAML)  # not one of the recognised names
    with pytest.raises(PolicyLoadError, match=r"governance\.fms"):
        read_stack(tmp_path)


def test_non_utf8_policy_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "governance.fms.yaml").write_bytes(b"agents:\n  a: {default: \xff}\n")
    with pytest.raises(PolicyLoadError, match="UTF-8"):
        read_stack(tmp_path)


# ---------------------------------------------------------------------------------------------------
# errors carry line numbers and "did you mean"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("agents:\n  a:\n    default: deny\n   rules: []\n", 4),
        ("agents:\n  a:\n    rules: [\n      {effect: permit, tool: x\n", 5),
        ("runtime:\n  mode: 'enforce\n", 3),
        ("agents:\n  a: {default: deny}\n\tb: {}\n", 3),
    ],
)
def test_yaml_syntax_errors_carry_line_numbers(text: str, line: int) -> None:
    with pytest.raises(PolicySyntaxError) as exc:
        load_yaml(text)
    assert exc.value.pos is not None and exc.value.pos.line == line, str(exc.value)
    assert exc.value.pos.file == "governance.fms.yaml"
    assert "invalid YAML" in exc.value.message


def test_yaml_duplicate_key_names_its_line() -> None:
    with pytest.raises(PolicySyntaxError, match="appears twice") as exc:
        load_yaml("agents:\n  a:\n    default: deny\n    default: permit\n")
    assert exc.value.pos is not None and exc.value.pos.line == 4


def test_yaml_condition_syntax_error_names_the_rule_line() -> None:
    text = (
        "agents:\n  a:\n    rules:\n"
        "      - {effect: permit, tool: x}\n"
        "      - {effect: permit, tool: y, condition: 'amount <'}\n"
    )
    with pytest.raises(PolicySyntaxError, match="in condition") as exc:
        load_yaml(text)
    assert exc.value.pos is not None and exc.value.pos.line == 5


def test_yaml_schema_errors_name_the_line() -> None:
    text = "agents:\n  a:\n    default: deny\n    rules:\n      - {effect: allow, tool: x}\n"
    with pytest.raises(PolicySchemaError, match="permit, defer, deny or deny!") as exc:
        load_yaml(text)
    assert exc.value.pos is not None and exc.value.pos.line == 5
    text = "agents:\n  a:\n    budgets:\n      daily:\n        max: 10\n        max_call: 3\n"
    with pytest.raises(PolicySchemaError, match="did you mean `max_calls`") as exc:
        compile_files(load_yaml(text), {})
    assert exc.value.pos is not None and exc.value.pos.line == 5


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("agent:\n  a: {default: deny}\n", "agents"),
        ("rule:\n  - {effect: permit, tool: x}\n", "rules"),
        ("provider:\n  v: {type: vault}\n", "providers"),
        ("runtim:\n  mode: enforce\n", "runtime"),
        ("agents:\n  a:\n    rule: []\n", "rules"),
        ("agents:\n  a:\n    rate_limit: []\n", "rate_limits"),
        ("agents:\n  a:\n    budget: {}\n", "budgets"),
        ("agents:\n  a:\n    alert: []\n", "alerts"),
        ("agents:\n  a:\n    egres: {allow: [x]}\n", "egress"),
        ("agents:\n  a:\n    rules:\n      - {effect: permit, tool: x, conditon: 'a == 1'}\n", "condition"),
        ("agents:\n  a:\n    rules:\n      - {effects: permit, tool: x}\n", "effect"),
    ],
)
def test_unknown_yaml_keys_get_did_you_mean(text: str, suggestion: str) -> None:
    with pytest.raises(PolicySchemaError) as exc:
        load_yaml(text)
    assert f"did you mean `{suggestion}`" in exc.value.message
    assert exc.value.pos is not None and exc.value.pos.line >= 1


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ('{"agent": {}}', "agents"),
        ('{"agents": {"a": {"rulez": []}}}', "rules"),
        ('{"agents": {"a": {"rules": [{"effect": "permit", "tol": "x"}]}}}', "tool"),
    ],
)
def test_unknown_json_keys_get_did_you_mean(text: str, suggestion: str) -> None:
    with pytest.raises(PolicySchemaError, match=f"did you mean `{suggestion}`"):
        load_json(text)


def test_unknown_fields_inside_blocks_get_did_you_mean_at_compile() -> None:
    for text, suggestion in (
        ("runtime: {mdoe: enforce}\n", "mode"),
        ("providers:\n  v: {type: vault, tokn: x}\n", "token"),
        ("agents:\n  a:\n    session: {idle_timout: 5m}\n", "idle_timeout"),
    ):
        with pytest.raises(PolicySchemaError, match=f"did you mean `{suggestion}`"):
            compile_files(load_yaml(text), {})


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('{\n  "agents": {\n    "a": {"default": "deny",}\n  }\n}\n', 3, 29),
        ('{"agents": {}', 1, 14),
        ('{\n  "agents": {\n    "a": {"default": deny}\n  }\n}\n', 3, 22),
    ],
)
def test_json_syntax_errors_carry_line_and_column(text: str, line: int, column: int) -> None:
    with pytest.raises(PolicySyntaxError, match="invalid JSON") as exc:
        load_json(text)
    assert exc.value.pos is not None
    assert (exc.value.pos.line, exc.value.pos.column) == (line, column), str(exc.value)


def test_json_duplicate_key_is_an_error_at_its_object() -> None:
    with pytest.raises(PolicySyntaxError, match="appears twice") as exc:
        load_json('{\n  "agents": {\n    "a": {"default": "deny", "default": "permit"}\n  }\n}\n')
    assert exc.value.pos is not None and exc.value.pos.line == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just\n- a list\n", "must be a mapping"),
        ("agents: [a, b]\n", "must be a mapping"),
        ("agents:\n  a:\n    rules: {effect: permit}\n", "must be a list"),
        ("agents:\n  a:\n    rules:\n      - {effect: permit, tool: [x]}\n", "`tool` must be a string"),
        ("agents:\n  a:\n    rules:\n      - {effect: permit, tool: x, condition: 5}\n", "FPL expression syntax"),
        ("agents:\n  a:\n    rate_limits:\n      - {tool: x, limit: five, per: minute}\n", "a rate limit is"),
        ("agents:\n  a:\n    redactions:\n      - {tool: x, args: card.number}\n", "a redaction is"),
        ("imports:\n  - {as: stripe}\n", "an import is"),
        ("trust:\n  - {publisher: x}\n", "a trust entry is"),
        ("agents:\n  a:\n    default: [deny]\n", "`default` must be"),
        ("runtime:\n  strip_env: [{a: b}]\n", "unsupported value"),
    ],
)
def test_yaml_shape_errors(text: str, message: str) -> None:
    with pytest.raises(PolicySchemaError, match=message.replace("(", r"\(")):
        load_yaml(text)


def test_yaml_strict_deny_and_default_deny_bang() -> None:
    policy = compile_files(
        load_yaml(
            "agents:\n  a:\n    default: permit\n    rules:\n"
            "      - {effect: permit, tool: x}\n"
            "      - {effect: 'deny!', tool: '*'}\n"
        ),
        {},
    )
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x"}).effect == "DENY"
    with pytest.raises(PolicySchemaError, match="default deny!"):
        compile_files(load_yaml("agents:\n  a:\n    default: 'deny!'\n"), {})


def test_pathological_yaml_and_json_nesting_are_syntax_errors() -> None:
    with pytest.raises(PolicySyntaxError, match="nested too deeply"):
        load_yaml("[" * 100000)
    with pytest.raises(PolicySyntaxError, match="nested too deeply"):
        load_json("[" * 100000 + "]" * 100000)
