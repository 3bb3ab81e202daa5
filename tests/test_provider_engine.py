"""The engine with real providers: `faramesh serve` (the real entry point, through tests/engine_harness.py's
launcher) brokering secrets from an OpenBao dev server at step 9 of the pipeline, permits only.

What is checked: a permit for a rule that names a credential carries the secret and its expiry; the DPR
records the reference, version and delivery tier (`sdk`, advisory) but never the value; a sentinel
secret and the Vault token appear in no file under the stack, state, runtime and log directories
(raw bytes, SQLite `-wal`/`-shm` included); Vault stopped → DENY CREDENTIAL_UNAVAILABLE without the
provider's failure text, `status` degraded with the provider DOWN and its last error; `dev` hands out
`STUB-<id>` values instead; the compiler checks credential references against the declared providers;
`check --strict` warns when a credential goes to an agent with an egress allow list; `apply` refuses
local signing in `mode = "enforce"` unless acknowledged.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import Bao, bao_server
from engine_harness import PYTHON, EngineDirs, EngineProcess, compile_policy, govern, make_stack, short_tmpdir
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.errors import PolicySchemaError, PolicySyntaxError
from faramesh.engine.policy.lint import lint
from faramesh.engine.policy.loaders import load_yaml
from faramesh.engine.policy.parser import parse_fpl
from faramesh.launchers.apply import local_signing_refusal

SENTINEL = "SENTINEL-" + secrets.token_hex(12)  # planted in Vault: must appear only in the permit reply
WAIT = 30.0  # an upper bound that keeps a broken test from hanging; no assertion depends on it


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    with bao_server(tmp_path_factory.mktemp("bao")) as bao:
        root = bao.client()
        root.sys.create_namespace(path="platform")
        ns = bao.client("platform")
        ns.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
        ns.secrets.kv.v2.create_or_update_secret(
            path="payments/stripe", secret={"api_key": SENTINEL, "account": "acct_1"}, mount_point="kv"
        )
        yield bao


def stack_text(addr: str, *, extra_rules: str = "", agent_extra: str = "", runtime: str = "") -> str:
    return f"""
runtime {{
  backend = "sqlite"
  wal_sync = "normal"
  cold_start_deny_window = "20s"
  {runtime}
}}

provider "vault" {{
  type = "vault"
  addr = "{addr}"
  token = env("VAULT_TOKEN")
  mount = "kv/data/payments"
  namespace = "platform"
  timeout = "2s"
  credential_ttl = "2m"
}}

agent "bot" {{
  default deny
  rules {{
    permit stripe/refund credential "vault:stripe#api_key"
    permit stripe/balance credential "vault:stripe#nope"
    permit search
    deny shell/*
    {extra_rules}
  }}
  {agent_extra}
}}
"""


class Served:
    def __init__(self, root: Path, text: str, env: dict[str, str]) -> None:
        self.root = root
        self.stack = make_stack(root, text)
        self.policy_file = root / "policy.json"
        compile_policy(self.stack, self.policy_file)
        self.dirs = EngineDirs.fresh()
        self.engine = EngineProcess(self.stack, self.policy_file, self.dirs, hooks=env)

    def __enter__(self) -> Served:
        self.engine.start(timeout=WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.ensure_stopped()

    def cleanup(self) -> None:
        self.dirs.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


def wal_bodies(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [json.loads(r[0]) for r in conn.execute("SELECT body FROM records ORDER BY seq")]
    finally:
        conn.close()


def files_containing(roots: list[Path], needles: list[str]) -> list[str]:
    """Every regular file under `roots` whose raw bytes contain one of `needles` (names of the hits)."""
    hits = []
    encoded = [n.encode() for n in needles]
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{path}: {n.decode()[:12]}…" for n in encoded if n in data]
    return hits


def wait_for(predicate: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


# ------------------------------------------------------------------------------------------ the engine


def test_a_permit_carries_the_secret_and_the_dpr_only_its_reference(vault: Bao) -> None:
    root = short_tmpdir("fpe")
    served = Served(root, stack_text(vault.addr), {"VAULT_TOKEN": vault.root_token})
    try:
        with served:
            engine = served.engine
            status = wait_for(lambda: engine.status())
            rows = {p["name"]: p for p in status["providers"]}
            assert rows["vault"]["type"] == "vault" and rows["vault"]["pid"] not in (None, engine.pid)
            with engine.agent("bot") as bot:
                permit = bot.call(govern("stripe/refund", {"amount": 10}, call_id="c-1"))
                plain = bot.call(govern("search", {"q": "x"}, call_id="c-2"))
                missing = bot.call(govern("stripe/balance", call_id="c-3"))
                denied = bot.call(govern("shell/exec", {"cmd": "id"}, call_id="c-4"))
            assert permit["effect"] == "PERMIT", permit
            credential = permit["credential"]
            assert credential["value"] == SENTINEL and credential["ref"] == "vault:stripe#api_key"
            assert credential["version"] == "1" and credential["delivery"] == "sdk" and credential["advisory"] is True
            assert credential["ttl_seconds"] == 120 and credential["expires_at"].endswith("Z")
            assert plain["effect"] == "PERMIT" and "credential" not in plain
            # A secret the provider cannot serve (no such field) is a deny, never a permit without it.
            assert missing["effect"] == "DENY" and missing["structured_denial"]["code"] == "CREDENTIAL_UNAVAILABLE"
            assert "nope" not in json.dumps(missing["structured_denial"]) and "credential" not in missing
            assert denied["effect"] == "DENY" and "credential" not in denied
            healthy = engine.status()
            assert healthy is not None and {p["name"]: p["health"] for p in healthy["providers"]} == {
                "vault": "HEALTHY"
            }
            assert healthy["daemon"]["degraded"] is False
        bodies = {b.get("call_id"): b for b in wal_bodies(served.engine.wal_path)}
        granted = bodies["c-1"]["credential_ref"]
        assert granted == {
            "ref": "vault:stripe#api_key",
            "provider": "vault",
            "version": "1",
            "delivery": "sdk",
            "advisory": True,
            "ttl_seconds": 120,
            "expires_at": credential["expires_at"],
        }
        assert bodies["c-1"]["effect"] == "PERMIT" and bodies["c-1"]["tier"] == "sdk"
        refused = bodies["c-3"]
        assert (refused["effect"], refused["code"], refused["policy_effect"]) == (
            "DENY",
            "CREDENTIAL_UNAVAILABLE",
            "PERMIT",
        )
        assert refused["credential_ref"]["error"] == "PROVIDER_NOT_FOUND"
        assert bodies["c-2"]["credential_ref"] is None
        # The sentinel and the token: in no file of the stack, state, runtime or log directories (the
        # SQLite WAL and its -wal/-shm companions, the keys, the engine's log, the compiled policy).
        roots = [served.root, served.dirs.state_root, served.dirs.runtime_root]
        assert any(p.name.endswith(".sqlite") for p in served.dirs.state_root.rglob("*"))
        assert files_containing(roots, [SENTINEL, vault.root_token]) == []
    finally:
        served.cleanup()


def test_vault_stopped_denies_with_credential_unavailable(tmp_path: Path) -> None:
    with bao_server(tmp_path) as bao:
        root_client = bao.client()
        root_client.secrets.kv.v2.create_or_update_secret(path="stripe", secret={"api_key": "v-" + SENTINEL},
                                                          mount_point="secret")  # fmt: skip
        text = stack_text(bao.addr).replace('  mount = "kv/data/payments"\n  namespace = "platform"\n', "")
        served = Served(short_tmpdir("fpv"), text, {"VAULT_TOKEN": bao.root_token})
        try:
            with served:
                engine = served.engine
                with engine.agent("bot") as bot:
                    before = bot.call(govern("stripe/refund", call_id="ok"))
                    assert before["effect"] == "PERMIT" and before["credential"]["value"] == "v-" + SENTINEL
                    bao.proc.terminate()
                    bao.proc.wait(10)
                    after = bot.call(govern("stripe/refund", call_id="down"))
                    assert after["effect"] == "DENY" and "credential" not in after
                    denial = after["structured_denial"]
                    assert denial["code"] == "CREDENTIAL_UNAVAILABLE" and denial["resolution"]["type"] == "retry_after"
                    # The provider's failure text (Vault's address, the errno) is not the agent's business.
                    assert "127.0.0.1" not in json.dumps(after) and "refused" not in json.dumps(after)
                    assert bot.call(govern("search", call_id="plain"))["effect"] == "PERMIT"  # decisions go on
                status = wait_for(lambda: (s := engine.status()) and s["providers"][0]["health"] == "DOWN" and s)
                row = status["providers"][0]
                assert row["last_error"].startswith("PROVIDER_UNREACHABLE") and bao.root_token not in row["last_error"]
                assert status["daemon"]["degraded"] is True and "vault" in status["daemon"]["last_error"]
                cli = subprocess.run(
                    [PYTHON, "-m", "faramesh.launchers.cli", "status", "--dir", str(served.stack)],
                    env=engine.env, capture_output=True, text=True, timeout=WAIT,
                )  # fmt: skip
                assert cli.returncode == 3, cli.stderr
                assert "provider  vault (vault): DOWN" in cli.stdout and "PROVIDER_UNREACHABLE" in cli.stdout
            bodies = {b.get("call_id"): b for b in wal_bodies(engine.wal_path)}
            assert bodies["down"]["code"] == "CREDENTIAL_UNAVAILABLE"
            assert bodies["down"]["credential_ref"]["error"] == "PROVIDER_UNREACHABLE"
            assert bodies["ok"]["credential_ref"]["version"] == "1"
            roots = [served.root, served.dirs.state_root, served.dirs.runtime_root]
            assert files_containing(roots, ["v-" + SENTINEL, bao.root_token]) == []
        finally:
            served.cleanup()


def test_dev_hands_out_stub_secrets(tmp_path: Path) -> None:
    """`faramesh dev` runs no provider: a rule's credential is a `STUB-<id>` value, tagged stub in the DPR."""
    from engine_harness import InProcessEngine

    text = stack_text("http://127.0.0.1:9", extra_rules='defer stripe/charge credential "vault:stripe#account"')
    policy = compile_files(parse_fpl(text), {})
    engine = InProcessEngine(policy, short_tmpdir("fpd"), layout="dev").start()
    try:
        with engine.conn("dev") as conn:
            first = conn.call(govern("stripe/refund", agent_id="bot", call_id="s1"))
            second = conn.call(govern("stripe/refund", agent_id="bot", call_id="s2"))
            status = conn.call({"type": "status"})
            # An approved defer carries its rule's credential in the permit that the approval grants.
            deferred = conn.call(govern("stripe/charge", {"amount": 5}, agent_id="bot"))
            assert deferred["effect"] == "DEFER" and "credential" not in deferred
            conn.call({"type": "approve", "approval_id": deferred["defer_token"]})
            approved = conn.call(govern("stripe/charge", {"amount": 5}, agent_id="bot"))
    finally:
        engine.stop()
    assert approved["effect"] == "PERMIT" and approved["credential"]["ref"] == "vault:stripe#account"
    assert approved["credential"]["value"].startswith("STUB-")
    values = [r["credential"]["value"] for r in (first, second)]
    assert all(v.startswith("STUB-") and len(v) > 10 for v in values) and values[0] != values[1]
    assert first["credential"]["stub"] is True and first["credential"]["ref"] == "vault:stripe#api_key"
    assert [(p["name"], p["health"], p["stub"]) for p in status["providers"]] == [("vault", "HEALTHY", True)]
    records = [json.loads(r.body) for r in engine.store.records()]
    refs = [r["credential_ref"] for r in records if r.get("call_id") in ("s1", "s2")]
    assert all(ref["stub"] is True and ref["delivery"] == "sdk" for ref in refs)
    assert not any(v in json.dumps(records) for v in values)


# ------------------------------------------------------------------------------------ policy: the syntax


PROVIDERS = """
provider "vault" {
  type = "vault"
  addr = "http://127.0.0.1:8200"
  token = env("VAULT_TOKEN")
}
provider "audit-kms" {
  type = "kms"
  backend = "aws-kms"
  key_arn = "arn:aws:kms:us-west-2:1:key/k"
}
"""


def compile_text(rules: str, extra: str = "") -> Any:
    return compile_files(
        parse_fpl(PROVIDERS + f'agent "a" {{\n  default deny\n  rules {{\n{rules}\n  }}\n{extra}}}\n'), {}
    )


def test_a_rule_names_its_credential_and_the_compiler_checks_it() -> None:
    policy = compile_text('    permit refund credential "vault:payments/stripe#api_key" reason "r"\n'
                          '    defer refund/big credential "vault:payments/stripe"')  # fmt: skip
    agent = policy.agents["a"]
    assert [r.credential for r in agent.rules] == ["vault:payments/stripe#api_key", "vault:payments/stripe"]
    assert dict(agent.credentials) == {"governance.fms:15": "vault:payments/stripe#api_key",
                                       "governance.fms:16": "vault:payments/stripe"}  # fmt: skip
    assert json.loads(policy.to_json())["agents"]["a"]["rules"][0]["credential"] == "vault:payments/stripe#api_key"
    # A rule without one compiles to exactly what it did before (policy hashes do not move).
    assert "credential" not in json.loads(compile_text("    permit refund").to_json())["agents"]["a"]["rules"][0]
    problems = {
        'permit x credential "nope:s"': 'names provider "nope", which this stack does not declare',
        'permit x credential "audit-kms:s"': "does not serve secrets",
        'deny x credential "vault:s"': "only permit and defer rules can name a credential",
        'permit x credential "vault:../s"': "empty or `..` path segment",
        'permit x credential "vault"': "must look like `<provider>:<name>`",
        'permit x credential "vault:a"; permit y': "on a line of its own",
    }
    for rule, message in problems.items():
        with pytest.raises(PolicySchemaError, match=message):
            compile_text("    " + rule)
    with pytest.raises(PolicySyntaxError, match="at most one `credential`"):
        compile_text('    permit x credential "vault:a" credential "vault:b"')
    with pytest.raises(PolicySchemaError, match="one `kms` provider"):
        compile_files(parse_fpl(PROVIDERS + PROVIDERS.replace('"vault"', '"v2"', 1).replace('"audit-kms"', '"k2"')), {})


def test_yaml_rules_name_credentials_the_same_way() -> None:
    text = """
providers:
  vault: {type: vault, addr: "http://127.0.0.1:8200", token: 'env("VAULT_TOKEN")'}
agents:
  a:
    default: deny
    rules:
      - {effect: permit, tool: refund, credential: "vault:stripe#api_key"}
"""
    policy = compile_files(load_yaml(text, "governance.fms.yaml"), {})
    assert policy.agents["a"].rules[0].credential == "vault:stripe#api_key"
    bad = text.replace("vault:stripe", "other:stripe")
    with pytest.raises(PolicySchemaError, match='provider "other"'):
        compile_files(load_yaml(bad, "governance.fms.yaml"), {})


def test_check_strict_warns_when_a_credential_can_leave_through_egress() -> None:
    with_egress = compile_text('    permit refund credential "vault:stripe#api_key"',
                               '  egress { allow = ["api.stripe.com"] }\n')  # fmt: skip
    findings = [f for f in lint(with_egress) if f.code == "CREDENTIAL_EXFILTRABLE"]
    assert len(findings) == 1 and "api.stripe.com" in findings[0].message and findings[0].ref == "governance.fms:15"
    assert not [f for f in lint(compile_text('    permit refund credential "vault:s"')) if f.code.startswith("CRED")]
    no_allow = compile_text('    permit refund credential "vault:s"', "  egress { allow = [] }\n")
    assert not [f for f in lint(no_allow) if f.code == "CREDENTIAL_EXFILTRABLE"]


def test_check_strict_exits_3_on_the_credential_warning(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, PROVIDERS + 'agent "a" {\n  default deny\n  rules {\n'
                       '    permit refund credential "vault:stripe#api_key"\n  }\n'
                       '  egress { allow = ["api.stripe.com"] }\n}\n')  # fmt: skip
    env = {**os.environ, "VAULT_TOKEN": "unused"}
    run = subprocess.run([PYTHON, "-m", "faramesh.launchers.cli", "check", "--strict", "--dir", str(stack)],
                         env=env, capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    assert run.returncode == 3 and "[CREDENTIAL_EXFILTRABLE]" in run.stderr, run.stderr
    assert subprocess.run([PYTHON, "-m", "faramesh.launchers.cli", "check", "--dir", str(stack)],
                          env=env, capture_output=True, timeout=WAIT).returncode == 0  # fmt: skip


def test_apply_refuses_local_signing_in_enforce_mode_unless_acknowledged() -> None:
    kms = {"k": {"type": "kms", "backend": "aws-kms", "key_arn": "arn"}}
    local = {"k": {"type": "kms", "backend": "local"}}
    enforce = {"mode": "enforce"}
    assert "no `kms` provider" in (local_signing_refusal(enforce, {}) or "")
    assert 'backend = "local"' in (local_signing_refusal(enforce, local) or "")
    assert local_signing_refusal(enforce, kms) is None
    assert local_signing_refusal({**enforce, "signing_warning_acknowledged": True}, {}) is None
    assert local_signing_refusal({**enforce, "signing_warning_acknowledged": True}, local) is None
    # Only a stack that declares itself production (writes the mode) is held to it.
    assert local_signing_refusal({}, {}) is None and local_signing_refusal({"mode": "audit"}, local) is None


def test_apply_refuses_an_enforce_stack_that_signs_locally(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, 'runtime {\n  mode = "enforce"\n}\nagent "a" {\n  default deny\n}\n')
    run = subprocess.run([PYTHON, "-m", "faramesh.launchers.cli", "apply", "--dir", str(stack)],
                         capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    if os.geteuid() != 0:  # apply needs root before it reads the policy at all
        assert run.returncode == 4 and "needs root" in run.stderr
        return
    assert run.returncode == 1, run.stderr
    assert "local audit signing" in run.stderr and "signing_warning_acknowledged" in run.stderr
    assert "nothing changed" in run.stderr and not (stack / ".faramesh").exists()


def test_without_its_provider_a_permit_is_denied_and_gives_back_what_it_used(tmp_path: Path) -> None:
    """An engine that runs no provider (here: in-process, serve layout) never permits a call whose rule
    names a credential; the approval that call would have used stays APPROVED for a later retry, and the
    rate token it would have spent is not spent."""
    from engine_harness import InProcessEngine

    extra = 'defer stripe/charge credential "vault:stripe#account"'
    text = stack_text("http://127.0.0.1:9", extra_rules=extra, agent_extra='rate_limit "stripe/*": 2 per hour')
    engine = InProcessEngine(compile_files(parse_fpl(text), {}), short_tmpdir("fpn")).start()
    try:
        with engine.conn("bot") as bot, engine.conn("operator") as op:
            deferred = bot.call(govern("stripe/charge", {"amount": 5}))
            op.call({"type": "approve", "approval_id": deferred["defer_token"]})
            refused = [bot.call(govern("stripe/charge", {"amount": 5})) for _ in range(3)]
            approvals = op.call({"type": "approvals_list", "all": True})["approvals"]
    finally:
        engine.stop()
    # Three refusals, not RATE_EXCEEDED: the denied permits gave their rate tokens back.
    assert [r["structured_denial"]["code"] for r in refused] == ["CREDENTIAL_UNAVAILABLE"] * 3
    assert [a["status"] for a in approvals] == ["APPROVED"] and all("credential" not in r for r in refused)
