"""Issue 6, acceptance: the seed's production stack, applied for real against real backends on loopback.

The stack is the seed's "full production stack" (shared/seed/tutorial-from-dev-to-production.txt), taken
verbatim from the tutorial and changed only where a test machine must differ, each change asserted to
apply exactly once (`production_text`):

- `policies/stripe@1.3.0` → `@1.0.0`, the version the vendored registry of examples/support-bot holds;
- `wal_dir`, the SPIFFE `socket` and the KMS endpoint point into this test's temporary directories and
  at the local moto_server (`endpoint_url = env("FARAMESH_KMS_ENDPOINT")`);
- the `$25` refund rule names the credential it brokers (`credential "vault:stripe#api_key"`), and so
  does the `$500` defer rule, so that both a permit and an approved defer carry a Vault secret;
- the AWS key pair reaches the applied engine the way an operator's would: `apply` carries the AWS
  variables of its environment into the engine's environment file when the policy uses AWS
  (`test_an_applied_engine_gets_the_aws_credentials_its_kms_provider_reads`), so boto3 never falls back
  to the instance-metadata address, which a test must never dial.

Backends, each started here on loopback and stopped at the end (DESIGN.md §7): an OpenBao dev server
(namespace `platform`, KV v2 at `kv`, a sentinel secret at `payments/stripe`), moto_server (an
ECC_NIST_P256 SIGN_VERIFY key), a PostgreSQL cluster (tests/pg_cluster.py, a fresh database), a Splunk
HEC receiver (tests/test_sinks.py) and a SPIFFE Workload API server (tests/spiffe_server.py) whose
socket sits in a directory the `faramesh` user can traverse.

`faramesh apply` runs as root with relocated state, runtime, log and config dirs (never in the checkout
or /var, /etc): it writes the secret references into `$FARAMESH_CONFIG_DIR/<stack-id>.env` (root 0600)
and starts the engine as the `faramesh` user. Then the seed's "Verifying" list is walked with the real
CLI and with the stdlib client (engine/client.py, copied as `faramesh_client`) run as the support-bot
agent's own uid through its socket: `status` READY with every provider, sink and identity HEALTHY; a
permit returns with its Vault credential; a defer creates an approval that `faramesh approvals approve`
resolves, after which the identical call is permitted; a deny raises `ToolDenied` with the rule and its
reason; `audit verify` passes with the KMS's signatures (per-key counts, also against the public key
fetched from the KMS); `plan` runs (and replays the last 24h unchanged); the DPRs arrive at the HEC
receiver. Last, `apply --stop` leaves nothing running.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import EXAMPLE_STACK, REPO, SEED_TUTORIAL, seed_stack_text

if TYPE_CHECKING:
    from backends import Bao, Moto
    from faramesh.engine.paths import StackPaths
    from pg_cluster import PgCluster
    from test_sinks import Receiver

pytest_plugins = ["pg_cluster"]

IS_ROOT = os.geteuid() == 0
NOT_ROOT = "`faramesh apply` runs as root (it starts the engine as the `faramesh` user)"

CONSOLE_SCRIPT = Path(sys.executable).with_name("faramesh")
CLIENT_SOURCE = REPO / "engine" / "client.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # what an agent runs (the launcher's interpreter), never the virtualenv
TRUST_DOMAIN = "corp.example.com"
AGENT = "support-bot"
AGENTS = ("support-bot", "payment-bot", "default")  # the stack's own agent, plus the imported two
CREDENTIAL = 'credential "vault:stripe#api_key"'
SENTINEL = "SENTINEL-" + secrets.token_hex(12)  # planted in Vault: only ever in a permit's reply
CARD_NUMBER = "4242424242424242"  # redacted from every DPR, so from every record the SIEM gets
WAIT = 30.0  # an upper bound that keeps a broken run from hanging; no assertion depends on it

def production_text(seed: str, *, wal_dir: Path, spire_socket: Path) -> str:
    """The seed's production stack with this machine's addresses (module docstring); each edit applies once."""

    def once(text: str, old: str, new: str) -> str:
        assert text.count(old) == 1, f"the seed's stack no longer holds exactly one {old!r}"
        return text.replace(old, new)

    text = once(seed, "policies/stripe@1.3.0", "policies/stripe@1.0.0")
    text = once(text, 'wal_dir = "/var/lib/faramesh/wal"', f'wal_dir = "{wal_dir}"')
    text = once(text, 'socket = "/run/spire/agent.sock"', f'socket = "{spire_socket}"')
    text = once(
        text,
        'key_arn = env("FARAMESH_KMS_KEY_ARN")\n',
        'key_arn = env("FARAMESH_KMS_KEY_ARN")\n  endpoint_url = env("FARAMESH_KMS_ENDPOINT")\n',
    )
    text = once(text, "permit refund if amount < $25\n", f"permit refund if amount < $25 {CREDENTIAL}\n")
    return once(text, "defer refund if amount < $500\n", f"defer refund if amount < $500 {CREDENTIAL}\n")


def agent_block(text: str) -> list[str]:
    """The support-bot block's lines, stripped (the seed's text is not indented, the example's is)."""
    lines = text[text.index(f'agent "{AGENT}" {{') :].splitlines()
    depth = 0
    for end, line in enumerate(lines):
        depth += line.count("{") - line.count("}")
        if depth == 0:
            return [line.strip() for line in lines[: end + 1]]
    raise AssertionError(f'agent "{AGENT}" is not closed')


def rule_line(text: str, rule: str) -> str:
    """`governance.fms:N` of the line holding `rule` (what a DPR's rule_ref says)."""
    [number] = [i for i, line in enumerate(text.splitlines(), 1) if line.strip() == rule]
    return f"governance.fms:{number}"


# --------------------------------------------------------------------------------------------- plumbing

AGENT_CALL = """\
import json, sys
import faramesh_client as fm

request = json.loads(sys.argv[1])
client = fm.Client(request["socket"], agent_id=request["agent_id"], timeout=20)
try:
    permit = client.govern(request["tool"], request["args"])
    out = {"raised": None, "effect": "PERMIT", "action_id": permit.action_id, "credential": permit.credential,
           "approval_id": permit.approval_id, "approver": permit.reply.get("approver")}
except fm.EngineUnavailable as exc:
    out = {"raised": type(exc).__name__, "effect": None, "code": exc.code, "message": exc.human_message}
except fm.ToolDenied as exc:
    out = {"raised": type(exc).__name__, "effect": exc.effect, "code": exc.code, "message": exc.human_message,
           "rule_ref": exc.rule_ref, "approval_id": exc.approval_id, "action_id": exc.action_id}
finally:
    client.close()
print(json.dumps(out))
"""


@dataclass
class Production:
    base: Path
    stack: Path
    env: dict[str, str]  # the operator's shell: relocations and the variables the stack references
    text: str
    bao: Bao
    moto: Moto
    kms_arn: str
    receiver: Receiver
    pg: PgCluster
    pg_db: str
    agent_dir: Path
    apply: subprocess.CompletedProcess[str] | None = None
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # the smoke test's answers, by step
    approve: subprocess.CompletedProcess[str] | None = None
    approval: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # everything the CLI printed, for the leak scan
    elapsed: dict[str, float] = field(default_factory=dict)

    def faramesh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(CONSOLE_SCRIPT), *args, "--dir", str(self.stack)],
            env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.outputs += [done.stdout, done.stderr]
        return done

    def json_of(self, *args: str) -> tuple[int, dict[str, Any]]:
        done = self.faramesh(*args, "--format", "json")
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            shown = f"{done.stdout}\n{done.stderr}"
            raise AssertionError(f"`faramesh {' '.join(args)}` printed no JSON:\n{shown}") from None

    def status(self) -> dict[str, Any]:
        return self.json_of("status")[1]

    def paths(self) -> StackPaths:
        from faramesh.engine.paths import stack_paths

        return stack_paths(self.stack, env=self.env)

    def as_agent(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """One governed call by the support-bot agent: its own uid, its own socket, the stdlib client."""
        uid = agent_uid(self)
        request = {"socket": str(self.paths().agent_socket(AGENT)), "agent_id": AGENT, "tool": tool, "args": args}
        done = subprocess.run(
            [SYSTEM_PYTHON, "-S", str(self.agent_dir / "agent_call.py"), json.dumps(request)],
            user=uid, group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
            capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]


def agent_uid(p: Production) -> int:
    from faramesh.engine.runner import load_installed_policy
    from faramesh.supervisor.layout import plan_agents

    plans = plan_agents(p.stack, load_installed_policy(p.paths().policy_copy), p.paths())
    [uid] = [plan.uid for plan in plans if plan.agent_id == AGENT]
    return uid


def wait_for(what: str, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def processes_mentioning(marker: str) -> list[str]:
    """`pid: command line` of every process whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if marker.encode() in cmdline:
                shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry}: {shown}")
    return found


def clear_flags(root: Path) -> None:
    from faramesh.sandbox.immutable import clear_immutable

    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(Exception):
                    clear_immutable(path)


def relocated_env(base: Path) -> dict[str, str]:
    """The operator's environment with every Faramesh directory moved under `base` (never /var, /etc)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARAMESH_", "AWS_", "VAULT_", "SPLUNK_"))}
    env.update(
        FARAMESH_STATE_DIR=str(base / "state"),
        FARAMESH_RUNTIME_DIR=str(base / "run"),
        FARAMESH_LOG_DIR=str(base / "log"),
        FARAMESH_CONFIG_DIR=str(base / "etc"),
    )
    return env


def new_base(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: agent socket paths fit sun_path
    os.chmod(base, 0o755)  # the engine (`faramesh`) and the agent's uid traverse it, as under /var and /run
    return base


# --------------------------------------------------------------------------------------------- backends


def plant_vault(bao: Bao) -> None:
    """The seed's `mount = "kv/data/payments"` in namespace `platform`: KV v2 at `kv`, names under payments/."""
    bao.client().sys.create_namespace(path="platform")
    ns = bao.client("platform")
    ns.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
    ns.secrets.kv.v2.create_or_update_secret(
        path="payments/stripe", secret={"api_key": SENTINEL, "account": "acct_1"}, mount_point="kv"
    )


@contextlib.contextmanager
def workload_api(sock_dir: Path) -> Iterator[Path]:
    """SPIRE's agent, as the engine meets it: a Workload API socket holding an SVID for every agent."""
    from spiffe_server import WorkloadApiServer, issue_svid, make_ca

    ca = make_ca(TRUST_DOMAIN)
    path = sock_dir / "agent.sock"
    svids = [issue_svid(ca, f"spiffe://{TRUST_DOMAIN}/agent/{agent}") for agent in AGENTS]
    server = WorkloadApiServer(str(path), svids, cas=[ca]).start()
    try:
        # SPIRE's socket is world-connectable (its selectors say who gets which SVID); gRPC creates it
        # under the umask, so the engine's `faramesh` user could not connect to it as created.
        os.chmod(path, 0o666)
        yield path
    finally:
        server.stop()


@contextlib.contextmanager
def database(cluster: PgCluster) -> Iterator[str]:
    name = f"fa_{secrets.token_hex(5)}"
    cluster.admin().execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        if not cluster.running:
            cluster.start()
        with contextlib.suppress(Exception):
            cluster.admin().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def teardown(stack: Path, base: Path, env: dict[str, str]) -> None:
    """Always: stop, unlock, clear what is still immutable, kill what is left, remove the directory."""
    for args in (("apply", "--stop"), ("unlock",)):
        with contextlib.suppress(Exception):
            subprocess.run([str(CONSOLE_SCRIPT), *args, "--dir", str(stack)], env=env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    clear_flags(base)
    for found in processes_mentioning(str(base)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(found.split(":", 1)[0]), signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------- the run


def smoke_test(p: Production) -> None:
    """The seed's "Run a smoke test through the agent", recorded step by step for the tests below."""
    p.calls["search"] = p.as_agent("knowledgebase/search", {"query": "reset password"})
    p.calls["refund $10"] = p.as_agent("refund", {"amount": 10, "card": {"number": CARD_NUMBER, "cvv": "123"}})
    p.calls["refund $100"] = p.as_agent("refund", {"amount": 100})
    approval_id = p.calls["refund $100"].get("approval_id")
    if approval_id:
        listed = p.faramesh("approvals", "list")
        p.approval["listed"] = approval_id in listed.stdout
        p.approve = p.faramesh("approvals", "approve", approval_id, "--reason", "acceptance: within policy")
        p.calls["refund $100 again"] = p.as_agent("refund", {"amount": 100})
        rc, shown = p.json_of("approvals", "show", approval_id)
        p.approval["show"] = shown if rc == 0 else {}
    p.calls["refund $1000"] = p.as_agent("refund", {"amount": 1000})
    p.calls["shell/exec"] = p.as_agent("shell/exec", {"cmd": "cat /etc/shadow"})


@pytest.fixture(scope="module")
def production(pg_cluster: PgCluster) -> Iterator[Production]:
    from backends import bao_server, moto_server
    from test_sinks import HEC_TOKEN, Receiver, hec_answer

    if not IS_ROOT:
        pytest.skip(NOT_ROOT)
    if not SEED_TUTORIAL.is_file() and os.environ.get("CI") != "true":
        pytest.skip("../shared/seed (the tutorial holding the production stack) is absent from this checkout")
    started = time.monotonic()
    base = new_base("fmacc-")
    stack = base / "stack"
    env = relocated_env(base)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, True)
        backends = base / "backends"
        backends.mkdir(mode=0o700)
        bao = cleanup.enter_context(bao_server(backends))
        moto = cleanup.enter_context(moto_server(backends))
        pg_db = cleanup.enter_context(database(pg_cluster))
        receiver = Receiver(hec_answer(index="faramesh-decisions")).start()
        cleanup.callback(receiver.stop)
        spire = base / "spire"
        spire.mkdir(mode=0o755)
        spire_socket = cleanup.enter_context(workload_api(spire))
        plant_vault(bao)
        kms_arn = moto.p256_key()

        # The dev stack, with the seed's production runtime/provider/identity blocks in place of its own.
        shutil.copytree(EXAMPLE_STACK, stack, ignore=shutil.ignore_patterns(".faramesh", "__pycache__", "workspace"))
        text = production_text(seed_stack_text(), wal_dir=base / "wal", spire_socket=spire_socket)
        (stack / "governance.fms").write_text(text, encoding="utf-8")
        agent_dir = base / "agent"
        agent_dir.mkdir(mode=0o755)
        (agent_dir / "agent_call.py").write_text(AGENT_CALL)
        shutil.copyfile(CLIENT_SOURCE, agent_dir / "faramesh_client.py")
        for script in agent_dir.iterdir():
            script.chmod(0o644)
        env.update(
            FARAMESH_PG_URL=pg_cluster.url(pg_db),
            VAULT_ADDR=bao.addr,
            VAULT_TOKEN=bao.root_token,
            FARAMESH_KMS_KEY_ARN=kms_arn,
            FARAMESH_KMS_ENDPOINT=moto.endpoint,
            SPLUNK_URL=receiver.url,
            SPLUNK_HEC_TOKEN=HEC_TOKEN,
            AWS_ACCESS_KEY_ID=moto.env()["AWS_ACCESS_KEY_ID"],
            AWS_SECRET_ACCESS_KEY=moto.secret_key,
        )
        p = Production(base, stack, env, text, bao, moto, kms_arn, receiver, pg_cluster, pg_db, agent_dir)
        cleanup.callback(teardown, stack, base, env)
        p.elapsed["backends"] = time.monotonic() - started
        p.apply = p.faramesh("apply", timeout=90)
        p.elapsed["apply"] = time.monotonic() - started
        if p.apply.returncode == 0:
            smoke_test(p)
        p.elapsed["smoke test"] = time.monotonic() - started
        yield p
        sys.stderr.write(f"\nacceptance timings (s since start): {json.dumps(p.elapsed)}\n")


def applied(p: Production) -> None:
    assert p.apply is not None and p.apply.returncode == 0, (
        f"`faramesh apply` failed (exit {p.apply and p.apply.returncode}):\n"
        f"{p.apply and p.apply.stdout}\n{p.apply and p.apply.stderr}"
    )


# --------------------------------------------------------------------------------------------- tests


def test_the_stack_is_the_seeds_production_stack_and_applies(production: Production) -> None:
    p = production
    dev_block = agent_block((EXAMPLE_STACK / "governance.fms").read_text())
    # The agent block is the dev one (the seed's promise), but for the credential the refund rules name.
    assert [line.replace(f" {CREDENTIAL}", "") for line in agent_block(p.text)] == dev_block
    applied(p)
    assert p.apply is not None and "engine READY" in p.apply.stdout, p.apply
    # The engine runs as `faramesh`; its secrets came from the root-only environment file apply wrote.
    paths = p.paths()
    env_file = paths.env_file(p.env)
    st = env_file.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    written = env_file.read_text()
    for name in ("FARAMESH_PG_URL", "VAULT_TOKEN", "SPLUNK_URL", "SPLUNK_HEC_TOKEN"):
        assert f"{name}=" in written, name
    pid = int((paths.state_dir / "engine.lock").read_text().strip())
    uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(pwd.getpwnam("faramesh").pw_uid)] * 4, uid_line


def test_status_is_ready_with_every_provider_healthy(production: Production) -> None:
    p = production
    applied(p)
    rc, status = p.json_of("status")
    assert rc == 0, status
    daemon = status["daemon"]
    assert daemon["state"] == "READY" and daemon["degraded"] is False, daemon
    assert daemon["mode"] == "enforce" and daemon["wal"]["backend"] == "postgres", daemon
    assert daemon["wal"]["checkpoints"]["signer"] == f"aws-kms:{p.kms_arn}", daemon["wal"]
    health = {(row["name"], row["type"]): row["health"] for row in status["providers"]}
    assert health == {("vault", "vault"): "HEALTHY", ("audit-kms", "kms"): "HEALTHY"}, status["providers"]
    assert all(row["pid"] not in (None, daemon["pid"]) for row in status["providers"])  # child processes
    assert [(s["name"], s["type"], s["health"]) for s in status["sinks"]] == [("splunk", "splunk-sink", "HEALTHY")]
    assert [(i["name"], i["type"], i["health"]) for i in status["identity"]] == [("prod", "spiffe", "HEALTHY")]
    assert status["supervisor"]["alive"] is True, status["supervisor"]
    text = p.faramesh("status")
    assert text.returncode == 0, text.stdout + text.stderr
    assert "READY" in text.stdout and "identity  prod (spiffe): HEALTHY" in text.stdout, text.stdout
    assert "sink      splunk (splunk-sink): HEALTHY" in text.stdout, text.stdout


def test_a_permit_returns_with_its_vault_credential(production: Production) -> None:
    p = production
    applied(p)
    search = p.calls["search"]
    assert search["effect"] == "PERMIT" and search["raised"] is None and search["credential"] is None, search
    refund = p.calls["refund $10"]
    assert refund["effect"] == "PERMIT" and refund["raised"] is None, refund
    credential = refund["credential"]
    assert credential is not None, refund
    assert credential["value"] == SENTINEL and credential["ref"] == "vault:stripe#api_key", credential
    assert credential["delivery"] == "sdk" and credential["advisory"] is True and credential["ttl_seconds"] > 0


def test_a_defer_creates_an_approvable_record(production: Production) -> None:
    p = production
    applied(p)
    deferred = p.calls["refund $100"]
    assert deferred["raised"] == "ToolDenied" and deferred["effect"] == "DEFER", deferred
    assert deferred["code"] == "POLICY_DEFER" and deferred["rule_ref"] == rule_line(
        p.text, f"defer refund if amount < $500 {CREDENTIAL}"
    ), deferred
    approval_id = deferred["approval_id"]
    assert approval_id, deferred
    assert p.approval.get("listed") is True  # `faramesh approvals list` shows it pending
    assert p.approve is not None and p.approve.returncode == 0, p.approve and (p.approve.stdout + p.approve.stderr)
    retried = p.calls["refund $100 again"]
    assert retried["effect"] == "PERMIT" and retried["approval_id"] == approval_id, retried
    assert retried["approver"] == "uid:0", retried  # the operator who approved (root, through operator.sock)
    assert retried["credential"] is not None and retried["credential"]["value"] == SENTINEL  # the rule's credential
    shown = p.approval["show"]
    assert shown.get("status") == "USED" and shown.get("approver") == "uid:0", shown  # approved by root, then used
    assert shown.get("used_by") == retried["action_id"], shown


def test_a_deny_raises_with_the_right_reason(production: Production) -> None:
    p = production
    applied(p)
    denied = p.calls["refund $1000"]
    assert denied["raised"] == "ToolDenied" and denied["effect"] == "DENY", denied
    assert denied["code"] == "POLICY_DENY" and denied["rule_ref"] == rule_line(p.text, "deny refund"), denied
    assert denied["message"] == "deny refund", denied  # the rule carries no `reason`: its text is the reason
    default = p.calls["shell/exec"]
    assert default["raised"] == "ToolDenied" and default["effect"] == "DENY", default
    assert default["code"] == "POLICY_DENY" and default["rule_ref"] == rule_line(p.text, "default deny"), default
    assert default["message"] == "no rule matched; agent default deny", default


def test_audit_verify_passes_with_kms_signatures(production: Production) -> None:
    from cryptography.hazmat.primitives import serialization
    from faramesh.engine.wal.signer import key_fingerprint

    p = production
    applied(p)

    def all_signed() -> bool:
        wal = p.status()["daemon"]["wal"]
        return bool(wal["seq"] == wal["signed_through"] and wal["checkpoints"]["queue"] == 0)

    wait_for("every record signed by the KMS", all_signed)
    kms_der = p.moto.client("kms").get_public_key(KeyId=p.kms_arn)["PublicKey"]
    kms_fp = key_fingerprint(base64.b64encode(kms_der).decode())
    rc, report = p.json_of("audit", "verify")
    assert rc == 0 and report["ok"] is True and report["offender"] is None, report
    assert report["unsigned_tail"] == 0 and report["dev_records"] == 0, report
    assert report["key_counts"].get(kms_fp, 0) >= 1, report["key_counts"]
    assert any(k.get("key_id") == f"aws-kms:{p.kms_arn}" for k in report["pinned_keys"]), report["pinned_keys"]
    text = p.faramesh("audit", "verify")
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"key {kms_fp} (aws-kms:{p.kms_arn}): {report['key_counts'][kms_fp]} checkpoint(s)" in text.stdout
    # Independent assurance: the public key as the KMS hands it out, pinned by the operator.
    pem = serialization.load_der_public_key(kms_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys = p.base / "kms-public.pem"
    keys.write_bytes(pem)
    rc, pinned = p.json_of("audit", "verify", "--key", str(keys), "--require-signed")
    assert rc == 0 and pinned["ok"] is True, pinned


def test_plan_runs_and_replays_the_last_day_unchanged(production: Production) -> None:
    p = production
    applied(p)
    rc, plan = p.json_of("plan", "--since", "24h")
    assert rc == 0, plan
    assert plan["compared_with"] == "applied" and plan["changes"] == [], plan
    replay = plan["replay"]
    assert replay["changed"] == 0 and replay["requests"] >= len(p.calls), replay
    text = p.faramesh("plan", "--since", "24h")
    assert text.returncode == 0, text.stdout + text.stderr


def test_dprs_arrive_at_the_sink(production: Production) -> None:
    from test_sinks import hec_events, hec_ids

    p = production
    applied(p)
    decided = {step: c["action_id"] for step, c in p.calls.items() if c.get("action_id")}
    assert len(decided) == len(p.calls), p.calls
    wait_for("every decision's DPR at the HEC receiver", lambda: set(decided.values()) <= set(hec_ids(p.receiver)))
    events = {e["event"]["id"]: e for req in p.receiver.taken() for e in hec_events(req.body)}
    assert events[decided["refund $1000"]]["event"]["effect"] == "DENY"
    assert events[decided["refund $10"]]["event"]["credential_ref"]["ref"] == "vault:stripe#api_key"
    assert all(e["index"] == "faramesh-decisions" for e in events.values())
    raw = b"".join(req.body for req in p.receiver.snapshot())
    assert CARD_NUMBER.encode() not in raw and SENTINEL.encode() not in raw  # redacted; a reference, no value


def test_no_secret_lands_anywhere_but_where_it_is_delivered(production: Production) -> None:
    from pg_cluster import ADMIN
    from test_sinks import HEC_TOKEN

    p = production
    applied(p)
    env_file = p.paths().env_file(p.env)
    secrets_ = {"sentinel": SENTINEL, "vault token": p.bao.root_token, "HEC token": HEC_TOKEN,
                "AWS secret": p.moto.secret_key, "database password": p.pg.password}  # fmt: skip
    hits = []
    for root in (p.stack, p.base / "state", p.base / "run", p.base / "log", p.base / "wal", p.base / "etc"):
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file() and not path.is_symlink() and path != env_file:
                data = path.read_bytes()
                hits += [f"{path}: {what}" for what, value in secrets_.items() if value.encode() in data]
    hits += [f"CLI output: {what}" for what, value in secrets_.items() for out in p.outputs if value in out]
    # The WAL the engine keeps in PostgreSQL, as a backup would hold it (through the cluster's own socket).
    dump = p.pg._run([str(p.pg.bindir / "pg_dump"), "-h", str(p.pg.socket_dir), "-p", str(p.pg.port),
                      "-U", ADMIN, p.pg_db])  # fmt: skip
    assert dump.returncode == 0 and "CREATE TABLE faramesh.records" in dump.stdout, dump.stderr
    hits += [f"pg_dump: {what}" for what, value in secrets_.items() if value in dump.stdout]
    hits += [f"HEC receiver: {what}" for what, value in secrets_.items() for req in p.receiver.snapshot()
             if value.encode() in req.body]  # fmt: skip
    assert hits == []
    assert SENTINEL not in env_file.read_text()  # the sentinel lives in Vault only


def test_apply_stop_leaves_nothing_running(production: Production) -> None:
    from faramesh.supervisor.layout import is_zombie_or_gone

    p = production
    applied(p)
    status = p.status()
    supervisor = status.get("supervisor") or {}
    pids = {
        "engine": status["daemon"]["pid"],
        **{f'provider "{row["name"]}"': row["pid"] for row in status["providers"]},
        "egress proxy": (status.get("egress_proxy") or {}).get("pid"),
        "supervisor": supervisor.get("pid"),
        "zygote": supervisor.get("zygote_pid"),
    }
    stopped = p.faramesh("apply", "--stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    # Once `apply --stop` has returned, every process of the stack is gone (provider children included).
    alive = {what: pid for what, pid in pids.items() if isinstance(pid, int) and not is_zombie_or_gone(pid)}
    assert alive == {}, f"still running after `apply --stop` returned: {alive}; {processes_mentioning(str(p.base))}"
    assert processes_mentioning(str(p.base)) == []
    assert not p.paths().operator_socket.exists()
    assert p.faramesh("status").returncode == 4


# ------------------------------------------------------------------------------- the product gaps shown


def test_an_applied_engine_gets_the_aws_credentials_its_kms_provider_reads() -> None:
    """The aws-kms provider reads the engine's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (README,
    "Providers"), but an applied engine's environment holds only the variables the policy references,
    so exported AWS credentials never reach it and boto3 falls back to instance metadata.

    Nothing is started: an engine lock held here makes `apply` stop right after it wrote the engine's
    environment file (exit 4, "holds this stack but is not READY"), so no provider ever dials anything."""
    from faramesh.engine.paths import stack_paths
    from faramesh.supervisor.service_user import engine_environment

    if not IS_ROOT:
        pytest.skip(NOT_ROOT)
    base = new_base("fmaws-")
    stack = base / "stack"
    stack.mkdir(mode=0o755)
    env = relocated_env(base)
    env.update(AWS_ACCESS_KEY_ID="AKIAFARAMESHTEST", AWS_SECRET_ACCESS_KEY="aws-secret-" + secrets.token_hex(8))
    (stack / "governance.fms").write_text(
        'runtime {\n  backend = "sqlite"\n}\n\n'
        'provider "audit-kms" {\n  type = "kms"\n  backend = "aws-kms"\n'
        '  key_arn = "arn:aws:kms:us-west-2:123456789012:key/acceptance"\n  endpoint_url = "http://127.0.0.1:9"\n}\n\n'
        'agent "bot" {\n  default deny\n}\n'
    )
    paths = stack_paths(stack, env=env)
    paths.state_dir.mkdir(parents=True, mode=0o700)
    try:
        with open(paths.lock_file, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            done = subprocess.run([str(CONSOLE_SCRIPT), "apply", "--dir", str(stack)], env=env, capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
            engine_env = engine_environment(paths, env)
            lock.truncate(0)  # released before the teardown's `apply --stop`, which signals a lock holder
        assert done.returncode == 4 and "not READY" in done.stderr, done.stdout + done.stderr
    finally:
        teardown(stack, base, env)
    assert processes_mentioning(str(base)) == []
    assert {k: engine_env.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == {
        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
    }, "an applied engine never gets the AWS credentials exported for `apply`"


def test_status_is_degraded_while_an_identity_block_is_down() -> None:
    """With its SPIFFE Workload API unreachable (here: the engine's user could not connect to the socket)
    every call is denied IDENTITY_UNAVAILABLE, yet `status` said READY, not degraded, exit 0: the
    identity rows are left out of `degraded`. Seen in the acceptance run with the socket at gRPC's 0755."""
    from engine_harness import EngineDirs, EngineProcess, compile_policy, govern, make_stack, short_tmpdir

    root = short_tmpdir("fmid")
    text = (
        'runtime {\n  backend = "sqlite"\n  cold_start_deny_window = "10s"\n}\n\n'
        f'identity "prod" {{\n  type = "spiffe"\n  socket = "{root}/no-spire-agent.sock"\n'
        f'  trust_domain = "{TRUST_DOMAIN}"\n}}\n\n'
        'agent "bot" {\n  default deny\n  rules {\n    permit search\n  }\n}\n'
    )
    stack = make_stack(root, text)
    _, policy_file = compile_policy(stack, root / "policy.json")
    assert policy_file is not None
    dirs = EngineDirs.fresh()
    engine = EngineProcess(stack, policy_file, dirs)
    try:
        engine.start(timeout=WAIT)
        with engine.agent("bot") as bot:
            reply = bot.call(govern("search"))
        assert reply["effect"] == "DENY" and reply["structured_denial"]["code"] == "IDENTITY_UNAVAILABLE", reply
        status = engine.status()
        assert status is not None and [i["health"] for i in status["identity"]] == ["DOWN"], status
        done = subprocess.run([str(CONSOLE_SCRIPT), "status", "--dir", str(stack)], env=engine.env,
                              capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)  # fmt: skip
        assert (status["daemon"]["degraded"], done.returncode) == (True, 3), (status["daemon"], done.stdout)
    finally:
        engine.ensure_stopped()
        dirs.cleanup()
        shutil.rmtree(root, ignore_errors=True)
