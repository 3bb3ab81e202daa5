"""Compiler: env() resolution and secret fields, schema errors with "did you mean", determinism,
source references, immutability, the JSON artifact round trip, money and durations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from faramesh.engine.policy.compiler import CompileOptions, ResolvedImport, compile_files, parse_duration
from faramesh.engine.policy.errors import (
    CompiledPolicyError,
    PolicyEnvError,
    PolicySchemaError,
    PolicySecretError,
)
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.model import COMPILER, FORMAT, CompiledPolicy, policy_from_json
from faramesh.engine.policy.parser import parse_fpl
from faramesh.engine.policy.stack import compile_stack

NOW = 1_750_000_000
SENTINEL = "SENTINEL-7f3c9a-DO-NOT-LEAK"


def compile_src(
    src: str,
    env: dict[str, str] | None = None,
    *,
    allow_literal_secrets: bool = False,
    secrets_out: dict[str, str] | None = None,
) -> CompiledPolicy:
    digest = hashlib.sha256(src.encode()).hexdigest()
    return compile_files(
        parse_fpl(src),
        {"governance.fms": digest},
        (),
        env or {},
        CompileOptions(allow_literal_secrets=allow_literal_secrets),
        literal_secrets_out=secrets_out,
    )


def all_strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *all_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in all_strings(v)]
    return [value] if isinstance(value, str) else []


# ---------------------------------------------------------------------------------------------------
# env() and secrets

SECRET_STACK = """\
runtime {
  backend = "postgres"
  postgres_url = env("FARAMESH_PG_URL")
  wal_dir = env("WAL_DIR")
}
provider "vault" {
  type = "vault"
  addr = env("VAULT_ADDR")
  token = env("VAULT_TOKEN")
  mount = "kv/data/payments"
}
provider "splunk" {
  type = "splunk-sink"
  url = env("SPLUNK_URL")
  token = env("SPLUNK_HEC_TOKEN")
  index = "faramesh-decisions"
}
provider "dd" {
  type = "datadog-sink"
  api_key = env("DD_API_KEY")
}
identity "sso" {
  type = "oidc"
  issuer = "https://login.example.com"
  client_id = "faramesh"
  client_secret = env("OIDC_SECRET")
}
agent "a" {
  default deny
  command = env("AGENT_CMD")
  egress { allow = [env("API_HOST"), "static.example.com"] }
}
"""

SECRET_VARS = ("FARAMESH_PG_URL", "VAULT_TOKEN", "SPLUNK_URL", "SPLUNK_HEC_TOKEN", "DD_API_KEY", "OIDC_SECRET")
PLAIN_ENV = {
    "WAL_DIR": "/var/lib/faramesh/wal",
    "VAULT_ADDR": "https://vault.internal:8200",
    "AGENT_CMD": "python agent.py",
    "API_HOST": "api.example.com",
}


def test_env_is_resolved_at_compile_time_in_non_secret_fields() -> None:
    policy = compile_src(SECRET_STACK, PLAIN_ENV)
    assert policy.runtime["wal_dir"] == "/var/lib/faramesh/wal"
    assert policy.providers["vault"]["addr"] == "https://vault.internal:8200"
    assert policy.agents["a"].command == "python agent.py"
    assert tuple(policy.agents["a"].settings["egress"]["allow"]) == ("api.example.com", "static.example.com")


def test_secret_fields_compile_to_env_references() -> None:
    policy = compile_src(SECRET_STACK, PLAIN_ENV)
    assert dict(policy.runtime["postgres_url"]) == {"$env": "FARAMESH_PG_URL"}
    assert dict(policy.providers["vault"]["token"]) == {"$env": "VAULT_TOKEN"}
    assert dict(policy.providers["splunk"]["url"]) == {"$env": "SPLUNK_URL"}
    assert dict(policy.providers["splunk"]["token"]) == {"$env": "SPLUNK_HEC_TOKEN"}
    assert dict(policy.providers["dd"]["api_key"]) == {"$env": "DD_API_KEY"}
    assert dict(policy.identities["sso"]["client_secret"]) == {"$env": "OIDC_SECRET"}


def test_secret_values_never_reach_the_artifact_or_the_version() -> None:
    env_a = {**PLAIN_ENV, **{v: f"{SENTINEL}-{v}" for v in SECRET_VARS}}
    env_b = {**PLAIN_ENV, **{v: f"other-value-{v}" for v in SECRET_VARS}}
    env_a["SPLUNK_URL"] = f"https://user:{SENTINEL}@splunk.example.com:8088"
    a = compile_src(SECRET_STACK, env_a)
    b = compile_src(SECRET_STACK, env_b)
    raw = a.to_json()
    assert SENTINEL.encode() not in raw
    assert b"other-value" not in b.to_json()
    # The version is the SHA-256 of exactly these bytes, so changing the secrets changes nothing.
    assert a.version == hashlib.sha256(raw).hexdigest()
    assert raw == b.to_json() and a.version == b.version
    assert not any(SENTINEL in s for s in all_strings(a.to_dict()))


def test_unset_secret_env_vars_are_not_a_compile_error() -> None:
    policy = compile_src(SECRET_STACK, PLAIN_ENV)  # none of SECRET_VARS set
    assert dict(policy.providers["vault"]["token"]) == {"$env": "VAULT_TOKEN"}


def test_secret_never_reaches_the_artifact_through_compile_stack(tmp_path: Path) -> None:
    (tmp_path / "governance.fms").write_text(SECRET_STACK)
    env = {**PLAIN_ENV, "VAULT_TOKEN": SENTINEL, "FARAMESH_PG_URL": f"postgres://u:{SENTINEL}@db/x"}
    stack = compile_stack(tmp_path, env=env)
    assert SENTINEL.encode() not in stack.policy.to_json()
    assert stack.literal_secrets == {}
    assert list(tmp_path.iterdir()) == [tmp_path / "governance.fms"]  # compiling writes nothing


@pytest.mark.parametrize(
    ("src", "line", "field"),
    [
        ('provider "v" {\n  type = "vault"\n  token = "hvs.CAESI-literal"\n}\n', 3, 'provider "v".token'),
        ('runtime {\n  postgres_url = "postgres://app:hunter2@db:5432/faramesh"\n}\n', 2, "runtime.postgres_url"),
        ('runtime {\n  postgres_url = "postgres://db/faramesh?password=hunter2"\n}\n', 2, "runtime.postgres_url"),
        ('runtime {\n  postgres_url = "host=db user=app password=hunter2"\n}\n', 2, "runtime.postgres_url"),
        ('runtime {\n  postgres_url = "hunter2"\n}\n', 2, "runtime.postgres_url"),
        (
            'provider "s" {\n  type = "splunk-sink"\n  url = "https://x:hunter2@splunk:8088"\n}\n',
            3,
            'provider "s".url',
        ),
        ('provider "s" {\n  type = "splunk-sink"\n\n  token = "0000-hec"\n}\n', 4, 'provider "s".token'),
        (
            'identity "i" {\n  type = "oidc"\n  client_secret = "hunter2"\n}\n',
            3,
            'identity "i".client_secret',
        ),
    ],
)
def test_literal_secret_is_an_error(src: str, line: int, field: str) -> None:
    with pytest.raises(PolicySecretError) as exc:
        compile_src(src)
    assert exc.value.pos is not None and exc.value.pos.line == line
    assert field in exc.value.message and "--allow-literal-secrets" in exc.value.message
    assert exc.value.exit_code == 1


def test_allow_literal_secrets_keeps_the_value_out_of_the_artifact() -> None:
    src = (
        'runtime {\n  postgres_url = "postgres://app:' + SENTINEL + '@db/x"\n}\n'
        'provider "vault" {\n  type = "vault"\n  token = "' + SENTINEL + '-token"\n}\n'
    )
    out: dict[str, str] = {}
    policy = compile_src(src, allow_literal_secrets=True, secrets_out=out)
    raw = policy.to_json()
    assert SENTINEL.encode() not in raw
    pg_ref = dict(policy.runtime["postgres_url"])
    token_ref = dict(policy.providers["vault"]["token"])
    assert set(pg_ref) == {"$env"} and set(token_ref) == {"$env"}
    assert out == {
        pg_ref["$env"]: f"postgres://app:{SENTINEL}@db/x",
        token_ref["$env"]: f"{SENTINEL}-token",
    }
    assert pg_ref["$env"] != token_ref["$env"]


def test_allow_literal_secrets_through_compile_stack(tmp_path: Path) -> None:
    (tmp_path / "governance.fms").write_text(f'provider "v" {{\n  type = "vault"\n  token = "{SENTINEL}"\n}}\n')
    with pytest.raises(PolicySecretError):
        compile_stack(tmp_path, env={})
    stack = compile_stack(tmp_path, env={}, allow_literal_secrets=True)
    ref = dict(stack.policy.providers["v"]["token"])["$env"]
    assert dict(stack.literal_secrets) == {ref: SENTINEL}
    assert SENTINEL.encode() not in stack.policy.to_json()


def test_literal_secret_references_never_collide() -> None:
    """Two fields whose names differ only in punctuation must get different $env references."""
    src = (
        'provider "v-1" {\n  type = "vault"\n  token = "first"\n}\n'
        'provider "v_1" {\n  type = "vault"\n  token = "second"\n}\n'
    )
    out: dict[str, str] = {}
    policy = compile_src(src, allow_literal_secrets=True, secrets_out=out)
    ref1 = policy.providers["v-1"]["token"]["$env"]
    ref2 = policy.providers["v_1"]["token"]["$env"]
    assert ref1 != ref2
    assert (out[ref1], out[ref2]) == ("first", "second")


def test_literal_secrets_of_an_imported_artifact_never_reach_the_stack() -> None:
    """An artifact's runtime/provider blocks are validated but never applied: a literal secret in
    them must not replace the value behind the stack's own `$env` reference."""
    artifact = parse_fpl(
        'runtime {\n  postgres_url = "postgres://attacker:theirs@evil.example/x"\n}\n'
        'provider "v" {\n  type = "vault"\n  token = "their-token"\n}\n'
        'agent "other" {\n  default deny\n}\n',
        "example.com/r/policies/x@1.0.0",
    )
    imp = ResolvedImport("example.com/r/policies/x@1.0.0", None, "1.0.0", "0" * 64, "k", artifact)
    main_src = (
        'runtime {\n  postgres_url = "postgres://app:mine@db/x"\n}\n'
        'provider "v" {\n  type = "vault"\n  token = "my-token"\n}\n'
    )
    out: dict[str, str] = {}
    policy = compile_files(
        parse_fpl(main_src), {}, (imp,), {}, CompileOptions(allow_literal_secrets=True), literal_secrets_out=out
    )
    pg = policy.runtime["postgres_url"]["$env"]
    token = policy.providers["v"]["token"]["$env"]
    assert out == {pg: "postgres://app:mine@db/x", token: "my-token"}
    assert "other" in policy.agents


def test_credential_free_literal_url_in_a_secret_url_field_is_kept() -> None:
    policy = compile_src('runtime {\n  postgres_url = "postgres://db.internal:5432/faramesh"\n}\n')
    assert policy.runtime["postgres_url"] == "postgres://db.internal:5432/faramesh"


def test_url_field_with_credentials_is_a_secret_error_even_from_env() -> None:
    with pytest.raises(PolicySecretError, match="credentials"):
        compile_src('provider "v" {\n  type = "vault"\n  addr = "https://u:p@vault:8200"\n}\n')
    with pytest.raises(PolicySecretError, match="credentials") as exc:
        compile_src(
            'provider "v" {\n  type = "vault"\n  addr = env("VAULT_ADDR")\n}\n',
            {"VAULT_ADDR": f"https://u:{SENTINEL}@v"},
        )
    assert SENTINEL not in str(exc.value)


def test_secret_field_with_a_non_string_is_a_schema_error() -> None:
    with pytest.raises(PolicySchemaError, match="token"):
        compile_src('provider "v" {\n  type = "vault"\n  token = 12345\n}\n')


@pytest.mark.parametrize(
    ("src", "var", "line"),
    [
        ('provider "v" {\n  type = "vault"\n  addr = env("VAULT_ADDR")\n}\n', "VAULT_ADDR", 3),
        ('runtime {\n  mode = "enforce"\n\n  wal_dir = env("WAL_DIR")\n}\n', "WAL_DIR", 4),
        ('agent "a" {\n  default deny\n  command = env("AGENT_CMD")\n}\n', "AGENT_CMD", 3),
        ('agent "a" {\n  egress {\n    allow = ["x", env("EGRESS_HOST")]\n  }\n}\n', "EGRESS_HOST", 3),
        ('provider "k" {\n  type = "kms"\n  backend = "aws-kms"\n  key_arn = env("KMS_ARN")\n}\n', "KMS_ARN", 4),
    ],
)
def test_unset_non_secret_env_var_names_variable_and_line(src: str, var: str, line: int) -> None:
    with pytest.raises(PolicyEnvError) as exc:
        compile_src(src, {"UNRELATED": "1"})
    err = exc.value
    assert var in err.message
    assert err.pos is not None and err.pos.line == line
    assert str(err).startswith(f"governance.fms:{line}:")
    assert err.code == "POLICY_ENV_UNSET"


def test_env_values_are_typed_by_the_field() -> None:
    policy = compile_src(
        'runtime {\n  os_tier = env("OS_TIER")\n  cold_start_deny_window = env("WINDOW")\n  mode = env("MODE")\n}\n',
        {"OS_TIER": "true", "WINDOW": "30s", "MODE": "enforce"},
    )
    assert dict(policy.runtime) == {"os_tier": True, "cold_start_deny_window": 30, "mode": "enforce"}
    with pytest.raises(PolicySchemaError, match="mode"):
        compile_src('runtime {\n  mode = env("MODE")\n}\n', {"MODE": "yolo"})


# ---------------------------------------------------------------------------------------------------
# schema errors and "did you mean"


@pytest.mark.parametrize(
    ("src", "suggestion", "line"),
    [
        ('runtime {\n  mdoe = "enforce"\n}\n', "mode", 2),
        ('runtim {\n  mode = "enforce"\n}\n', "runtime", 1),
        ('provider "v" {\n  type = "vualt"\n}\n', "vault", 2),
        ('provider "v" {\n  type = "vault"\n  tokn = env("T")\n}\n', "token", 3),
        ('identity "i" {\n  type = "spife"\n}\n', "spiffe", 2),
        ('identity "i" {\n  type = "oidc"\n  clientid = "x"\n}\n', "client_id", 3),
        ('agent "a" {\n  egres { allow = ["x"] }\n}\n', "egress", 2),
        ('agent "a" {\n  sesion { idle_timeout = "5m" }\n}\n', "session", 2),
        ('agent "a" {\n  budget daily { max_call = 3 }\n}\n', "max_calls", 2),
        ('agent "a" {\n  comand = "python a.py"\n}\n', "command", 2),
        ('agent "a" {\n  egress { alow = ["x"] }\n}\n', "allow", 2),
        ('runtime {\n  wal_sync = "ful"\n}\n', "full", 2),
        ('agent "a" {\n  rate_limit "x": 5 per minit\n}\n', "minute", 2),
        ('provider "v" {\n  type = "splunk_sink"\n}\n', "splunk-sink", 2),
    ],
)
def test_unknown_names_get_did_you_mean(src: str, suggestion: str, line: int) -> None:
    with pytest.raises(PolicySchemaError) as exc:
        compile_src(src)
    assert f"did you mean `{suggestion}`" in exc.value.message
    assert exc.value.pos is not None and exc.value.pos.line == line


def test_unknown_provider_type_lists_known_types() -> None:
    with pytest.raises(PolicySchemaError) as exc:
        compile_src('provider "x" {\n  type = "zzzz"\n}\n')
    assert "vault" in exc.value.message and "kms" in exc.value.message
    assert "did you mean" not in exc.value.message


def test_provider_needs_a_type() -> None:
    with pytest.raises(PolicySchemaError, match="needs `type`"):
        compile_src('provider "v" {\n  addr = "https://v"\n}\n')


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ('runtime {\n  os_tier = "yes"\n}\n', "true or false"),
        ('runtime {\n  strip_env = "HOME"\n}\n', "list of strings"),
        ('runtime {\n  strip_env = ["HOME", 3]\n}\n', "list of strings"),
        ("runtime {\n  wal_dir = 7\n}\n", "must be a string"),
        ('agent "a" {\n  budget daily { max_calls = 1.5 }\n}\n', "whole number"),
        ('agent "a" {\n  budget daily { max_calls = -1 }\n}\n', "whole number"),
        ('agent "a" {\n  budget daily { max $5 warn_at = "high" }\n}\n', "must be a number"),
        ('agent "a" {\n  budget daily { max $5 warn_at 0 }\n}\n', "fraction"),
        ('agent "a" {\n  budget daily { max = -5 }\n}\n', "amount"),
        ('agent "a" {\n  budget daily { max = "lots" }\n}\n', "amount"),
        ('agent "a" {\n  budget daily { max $10.505 }\n}\n', "fractions of a cent"),
        ('agent "a" {\n  budget quarterly { max $10 }\n}\n', "needs `period`"),
        ('agent "a" {\n  budget daily { on_exceed defer }\n}\n', "needs `max` or `max_calls`"),
        ('agent "a" {\n  budget daily { max $1 }\n  budget daily { max $2 }\n}\n', "declared twice"),
        ('runtime {\n  timezone = "Mars/Olympus"\n}\n', "unknown timezone"),
        ('runtime {\n  mode = "enforce"\n}\nruntime {\n  mode = "enforce"\n}\n', "declared twice"),
        ('runtime {\n  mode = "enforce"\n  mode = "enforce"\n}\n', "set twice"),
        ('identity "i" {\n  type = "spiffe"\n}\nidentity "i" {\n  type = "spiffe"\n}\n', "declared twice"),
        ('trust {\n  key "p" ed25519:' + "A" * 43 + '=\n  key "p" ed25519:' + "A" * 43 + "=\n}\n", "twice"),
        ('agent "a" {\n  permit x if time.second > 3\n}\n', "time field"),
        ('agent "a" {\n  permit x if tool.name == "y"\n}\n', "has no fields"),
        ('agent "a" {\n  permit x if a =~ "(a)\\\\1"\n}\n', "backtracking"),
    ],
)
def test_schema_errors(src: str, message: str) -> None:
    with pytest.raises(PolicySchemaError, match=re.escape(message)) as exc:
        compile_src(src)
    assert exc.value.pos is not None and exc.value.pos.line >= 1


def test_duplicate_agents_and_providers_are_errors_at_the_second_declaration() -> None:
    with pytest.raises(PolicySchemaError, match='agent "a" is declared twice') as exc:
        compile_src('agent "a" {\n  default deny\n}\n\nagent "a" {\n  default permit\n}\n')
    assert exc.value.pos is not None and exc.value.pos.line == 5
    with pytest.raises(PolicySchemaError, match='provider "v" is declared twice') as exc:
        compile_src('provider "v" {\n  type = "vault"\n}\nprovider "v" {\n  type = "kms"\n}\n')
    assert exc.value.pos is not None and exc.value.pos.line == 4


def test_default_strict_deny_is_rejected() -> None:
    with pytest.raises(PolicySchemaError, match=r"default deny!") as exc:
        compile_src('agent "a" {\n  permit x\n  default deny!\n}\n')
    assert exc.value.pos is not None and exc.value.pos.line == 3


def test_supervised_command_with_two_agents_names_them() -> None:
    src = (
        'runtime {\n  supervised_command = "python agent.py"\n}\n'
        'agent "alpha" {\n  default deny\n}\n'
        'agent "beta" {\n  default deny\n}\n'
    )
    with pytest.raises(PolicySchemaError) as exc:
        compile_src(src)
    msg = exc.value.message
    assert "supervised_command" in msg and "alpha" in msg and "beta" in msg and "command" in msg
    assert exc.value.pos is not None and exc.value.pos.line == 1


def test_supervised_command_counts_the_v0_default_agent() -> None:
    with pytest.raises(PolicySchemaError, match="default"):
        compile_src('runtime {\n  supervised_command = "x"\n}\nagent "alpha" {\n  default deny\n}\npermit y\n')


def test_supervised_command_with_one_agent_and_per_agent_commands_compile() -> None:
    one = compile_src('runtime {\n  supervised_command = "python agent.py"\n}\nagent "alpha" {\n  default deny\n}\n')
    assert one.runtime["supervised_command"] == "python agent.py"
    two = compile_src('agent "alpha" {\n  command = "python a.py"\n}\nagent "beta" {\n  command = "python b.py"\n}\n')
    assert {k: a.command for k, a in two.agents.items()} == {"alpha": "python a.py", "beta": "python b.py"}


# ---------------------------------------------------------------------------------------------------
# money and durations


@pytest.mark.parametrize(
    ("amount", "cents"),
    [("$1000", 100000), ("$10.50", 1050), ("$10.00", 1000), ("$0.01", 1), ("$25", 2500), ("1000", 100000), ("0", 0)],
)
def test_budget_money_compiles_to_integer_cents(amount: str, cents: int) -> None:
    policy = compile_src(f'agent "a" {{\n  budget daily {{ max {amount} }}\n}}\n')
    (budget,) = policy.agents["a"].budgets
    assert budget.max_cents == cents and type(budget.max_cents) is int
    assert json.loads(policy.to_json())["agents"]["a"]["budgets"][0]["max_cents"] == cents


def test_runtime_call_cost_is_money() -> None:
    assert compile_src("runtime {\n  call_cost = $0.05\n}\n").runtime["call_cost"] == 5


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("24h", 86400), ("5m", 300), ("2d", 172800), ("0s", 0), ("500ms", 0.5), ("1000ms", 1)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    policy = compile_src(f'agent "a" {{\n  session {{ max_duration = "{text}" }}\n}}\n')
    value = policy.agents["a"].settings["session"]["max_duration"]
    assert value == seconds
    if float(seconds).is_integer():
        assert type(value) is int


@pytest.mark.parametrize("bad", ['"10"', '"ten seconds"', '"10 s"', '"1h30m"', '"-5s"', '"10w"', "10", '""'])
def test_bad_durations_are_errors(bad: str) -> None:
    with pytest.raises(PolicySchemaError, match="must be a duration") as exc:
        compile_src(f"runtime {{\n  cold_start_deny_window = {bad}\n}}\n")
    assert exc.value.pos is not None and exc.value.pos.line == 2


# ---------------------------------------------------------------------------------------------------
# the artifact: format, refs, determinism, immutability, round trip

ARTIFACT_STACK = """\
runtime {
  mode = "enforce"
  backend = "sqlite"
  strip_env = ["Z_VAR", "A_VAR", "M_VAR"]
}
provider "zeta" {
  type = "vault"
  addr = "https://z.example.com"
}
provider "alpha" {
  type = "s3-sink"
  bucket = "b"
}

agent "support-bot" {
  default deny
  rules {
    permit knowledgebase/search
    permit refund if amount < $25 and currency in ["usd", "eur"]
    defer refund if amount < $500
    deny! admin/*
  }
  rate_limit "refund": 5 per minute
  budget daily { max $1000 on_exceed defer }
  redact refund args: ["card.number"]
  egress { allow = ["b.example.com", "a.example.com"] }
  alert { on = "deny" notify = "#sec" }
}
agent "ops/runner" {
  default permit
  deny shell/rm when path =~ "^/etc"
}
deny legacy/tool
"""


def test_artifact_has_format_compiler_and_version() -> None:
    policy = compile_src(ARTIFACT_STACK)
    data = json.loads(policy.to_json())
    assert data["format"] == FORMAT == "faramesh.policy/v1"
    assert data["compiler"] == COMPILER and COMPILER.startswith("faramesh-fplc/")
    assert data["sources"] == {"governance.fms": hashlib.sha256(ARTIFACT_STACK.encode()).hexdigest()}
    assert re.fullmatch(r"[0-9a-f]{64}", policy.version)
    assert policy.version == hashlib.sha256(policy.to_json()).hexdigest()


def test_every_rule_carries_its_source_line() -> None:
    policy = compile_src(ARTIFACT_STACK)
    lines = ARTIFACT_STACK.splitlines()
    seen = 0
    for agent in policy.agents.values():
        for rule in agent.rules:
            m = re.fullmatch(r"governance\.fms:(\d+)", rule.ref)
            assert m, rule.ref
            text = lines[int(m.group(1)) - 1].strip()
            effect = "deny!" if rule.strict else rule.effect
            assert text.startswith(f"{effect} {rule.pattern}"), (rule.ref, text)
            seen += 1
    assert seen == 6
    bot = policy.agents["support-bot"]
    assert [r.ref for r in bot.rules] == [f"governance.fms:{n}" for n in (18, 19, 20, 21)]
    assert (bot.ref, bot.default_ref) == ("governance.fms:15", "governance.fms:16")
    assert bot.rate_limits[0].ref == "governance.fms:23"
    assert bot.budgets[0].ref == "governance.fms:24"
    assert bot.redactions[0].ref == "governance.fms:25"
    assert policy.agents["default"].rules[0].ref == "governance.fms:33"


def test_every_ref_in_the_artifact_is_a_file_line_reference() -> None:
    data = compile_src(ARTIFACT_STACK).to_dict()

    def refs(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k.endswith("ref") and v is not None] + [
                r for v in node.values() for r in refs(v)
            ]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    found = refs(data["agents"])
    assert len(found) >= 12
    assert all(re.fullmatch(r"governance\.fms:\d+", r) for r in found), found


def test_same_source_same_bytes_and_version() -> None:
    a, b = compile_src(ARTIFACT_STACK), compile_src(ARTIFACT_STACK)
    assert a is not b
    assert a.to_json() == b.to_json() and a.version == b.version
    # A one-character change in a rule changes the version.
    c = compile_src(ARTIFACT_STACK.replace("amount < $500", "amount < $501"))
    assert c.version != a.version


def test_artifact_bytes_are_canonical_json() -> None:
    raw = compile_src(ARTIFACT_STACK).to_json()
    data = json.loads(raw)
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert raw.isascii() and b"\n" not in raw


_SUBPROCESS_COMPILE = """
import hashlib, sys
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.parser import parse_fpl
src = open(sys.argv[1], encoding="utf-8").read()
policy = compile_files(parse_fpl(src), {"governance.fms": hashlib.sha256(src.encode()).hexdigest()})
sys.stdout.buffer.write(policy.to_json())
"""


def test_compile_is_deterministic_across_hash_seeds(tmp_path: Path) -> None:
    path = tmp_path / "governance.fms"
    path.write_text(ARTIFACT_STACK)
    local = compile_src(ARTIFACT_STACK).to_json()
    outputs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS_COMPILE, str(path)],
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == local


def test_compiled_objects_are_immutable() -> None:
    policy = compile_src(ARTIFACT_STACK)
    agent = policy.agents["support-bot"]
    rule = agent.rules[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.agents = {}  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.default = "permit"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.effect = "permit"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.budgets[0].max_cents = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.rate_limits[0].count = 1000  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.agents["evil"] = agent  # type: ignore[index]
    with pytest.raises(TypeError):
        policy.runtime["mode"] = "audit"  # type: ignore[index]
    with pytest.raises(TypeError):
        policy.providers["zeta"]["addr"] = "https://evil"  # type: ignore[index]
    with pytest.raises(TypeError):
        agent.settings["egress"]["allow"] = ["*"]  # type: ignore[index]
    with pytest.raises(TypeError):
        agent.alerts[0]["notify"] = "#elsewhere"  # type: ignore[index]
    with pytest.raises(TypeError):
        policy.sources["governance.fms"] = "0"  # type: ignore[index]
    assert isinstance(agent.rules, tuple)
    assert isinstance(agent.settings["egress"]["allow"], tuple)
    assert isinstance(policy.runtime["strip_env"], tuple)
    assert isinstance(agent.redactions[0].paths, tuple)
    assert evaluate(policy, {"agent_id": "support-bot", "tool_id": "admin/x", "time": NOW}).effect == "DENY"


def test_rule_conditions_are_immutable() -> None:
    policy = compile_src(ARTIFACT_STACK)
    rule = policy.agents["support-bot"].rules[1]
    before = policy.to_json()
    with pytest.raises(TypeError):
        rule.condition[1] = "or"  # type: ignore[index]
    assert policy.to_json() == before


def test_version_is_stable_for_the_object() -> None:
    policy = compile_src(ARTIFACT_STACK)
    assert policy.version == policy.version == hashlib.sha256(policy.to_json()).hexdigest()


def test_round_trip_through_json_gives_equal_bytes_and_decisions() -> None:
    policy = compile_src(ARTIFACT_STACK)
    raw = policy.to_json()
    again = policy_from_json(raw)
    assert again.to_json() == raw
    assert again.version == policy.version
    assert again == policy
    requests = [
        {"agent_id": "support-bot", "tool_id": "refund", "args": {"amount": 10, "currency": "usd"}},
        {"agent_id": "support-bot", "tool_id": "refund", "args": {"amount": 10, "currency": "gbp"}},
        {"agent_id": "support-bot", "tool_id": "refund", "args": {"amount": 600}},
        {"agent_id": "support-bot", "tool_id": "admin/users", "args": {}},
        {"agent_id": "ops/runner", "tool_id": "shell/rm", "args": {"path": "/etc/passwd"}},
        {"agent_id": "ops/runner", "tool_id": "shell/rm", "args": {"path": "/tmp/x"}},
        {"agent_id": "default", "tool_id": "legacy/tool", "args": {}},
    ]
    expected = ["PERMIT", "DEFER", "DENY", "DENY", "DENY", "PERMIT", "DENY"]
    for req, effect in zip(requests, expected, strict=True):
        req = {**req, "time": NOW}
        a, b = evaluate(policy, req), evaluate(again, req)
        assert a == b and a.effect == effect, (req, a)


def test_round_trip_of_secret_references() -> None:
    policy = compile_src(SECRET_STACK, PLAIN_ENV)
    again = policy_from_json(policy.to_json())
    assert dict(again.providers["vault"]["token"]) == {"$env": "VAULT_TOKEN"}
    assert again.to_json() == policy.to_json()


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"format": "faramesh.policy/v999", "agents": {}}',
        b'{"agents": {}}',
        b'{"format": "faramesh.policy/v1", "agents": {"a": {"agent_id": "a"}}}',
    ],
)
def test_policy_from_json_refuses_foreign_or_corrupt_artifacts(raw: bytes) -> None:
    with pytest.raises(CompiledPolicyError):
        policy_from_json(raw)


def test_timezone_is_carried_into_the_policy() -> None:
    policy = compile_src('runtime {\n  timezone = "Asia/Tokyo"\n}\nagent "a" {\n  permit x if time.hour == 9\n}\n')
    assert policy.runtime["timezone"] == "Asia/Tokyo"
    # 00:00 UTC is 09:00 in Tokyo
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x", "time": 1_750_032_000}).effect == "PERMIT"
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x", "time": 1_750_032_000 + 3600}).effect == "DENY"


@pytest.mark.parametrize(
    "condition",
    ["not " * 300 + "a", "a in " + "[" * 300 + "]" * 300],
    ids=["not-chain", "nested-lists"],
)
def test_deep_conditions_are_refused_at_compile_time(condition: str) -> None:
    with pytest.raises(PolicySchemaError, match="nested more than") as exc:
        compile_src(f'agent "a" {{\n  permit x if {condition}\n}}\n')
    assert exc.value.pos is not None and exc.value.pos.line == 2


def test_moderately_nested_conditions_compile_and_evaluate() -> None:
    policy = compile_src('agent "a" {\n  permit x if ' + "not " * 40 + "flagged\n}\n")
    # an even number of `not`s: the rule holds exactly when `flagged` is true
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x", "args": {"flagged": True}}).effect == "PERMIT"
    assert evaluate(policy, {"agent_id": "a", "tool_id": "x", "args": {"flagged": False}}).effect == "DENY"


def test_a_postgres_wal_without_its_url_is_refused_at_compile_time() -> None:
    src = 'runtime {\n  backend = "postgres"\n}\nagent "a" {\n  default deny\n}\n'
    with pytest.raises(PolicySchemaError, match="postgres_url") as info:
        compile_src(src)
    assert info.value.pos is not None and ":2:" in str(info.value.pos)
    ok = compile_src(src.replace('backend = "postgres"\n', 'backend = "postgres"\n  postgres_url = env("PG")\n'))
    assert ok.runtime["postgres_url"] == {"$env": "PG"}


@pytest.mark.parametrize("entry", ["api.*.com", "http://u@api.example.com", "10.0.0.0/33", "api.example.com:99999"])
def test_a_bad_egress_entry_is_a_compile_error(entry: str) -> None:
    src = f'agent "a" {{\n  default deny\n  egress {{ allow = ["{entry}"] }}\n}}\n'
    with pytest.raises(PolicySchemaError, match="egress"):
        compile_src(src)
    ok = compile_src('agent "a" {\n  default deny\n  egress { allow = ["api.example.com:443", "*.example.org"] }\n}\n')
    assert ok.agents["a"].settings["egress"]["allow"] == ("api.example.com:443", "*.example.org")
