"""`runtime { backend = "postgres"  postgres_url = env("FARAMESH_PG_URL") }` end to end: the real
`faramesh serve` (a subprocess, tests/engine_harness.py `EngineProcess`) keeps its WAL in a throwaway
PostgreSQL cluster (tests/pg_cluster.py), and the real `faramesh` CLI audits the same database.

- serve answers govern calls (permit, defer, deny) from PostgreSQL; `audit verify | tail | show |
  export`, `explain` and `audit verify-bundle` read the engine's own chain, pinned to its key;
- a missing FARAMESH_PG_URL refuses the start (exit 4) naming the variable, and the audit commands
  say the same; a wrong password is refused by the database without the password leaking;
- the password appears in no output, log or status reply of any of these commands;
- SIGKILL under load: the restarted engine verifies its chain, and every call that got a reply is in
  the WAL with the effect it was told.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from engine_harness import (
    REPO,
    Conn,
    EngineDirs,
    EngineProcess,
    compile_policy,
    govern,
    make_stack,
    pinned_key,
    policy_text,
    short_tmpdir,
)
from faramesh.engine.policy import schema
from faramesh.engine.wal.audit_ops import PinnedKeys, verify_wal

if TYPE_CHECKING:
    from pg_cluster import PgCluster

pytest_plugins = ["pg_cluster"]  # the session's cluster (fixtures)

if os.environ.get("CI") == "true":  # a missing psycopg fails CI (DESIGN.md §7)
    import faramesh.engine.wal.pg_store as pg
else:
    pg = pytest.importorskip("faramesh.engine.wal.pg_store")

FARAMESH = str(REPO / ".venv" / "bin" / "faramesh")
URL_VAR = "FARAMESH_PG_URL"


def pg_policy(wal_sync: str = "normal") -> str:
    """The harness's test stack, its WAL in PostgreSQL."""
    text = policy_text(wal_sync=wal_sync)
    return text.replace('backend = "sqlite"', f'backend = "postgres"\n  postgres_url = env("{URL_VAR}")', 1)


@dataclass
class Setup:
    """One stack, its relocated engine dirs and the database its WAL goes to; every output it saw."""

    cluster: PgCluster
    root: Path
    stack: Path
    policy_file: Path
    dirs: EngineDirs
    url: str
    outputs: list[str] = field(default_factory=list)  # everything printed or logged, for the leak check

    def env(self, **extra: str | None) -> dict[str, str]:
        """The CLI's environment: the engine's relocated dirs and the URL (`NAME=None` removes one)."""
        env = {**os.environ, **self.dirs.env(), URL_VAR: self.url}
        env.pop("FARAMESH_SOCKET", None)
        for name, value in extra.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def engine(self, env: Mapping[str, str] | None = None) -> EngineProcess:
        engine = EngineProcess(self.stack, self.policy_file, self.dirs)
        engine.env = dict(env if env is not None else self.env())
        return engine

    def faramesh(self, *args: str | Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [FARAMESH, *(str(a) for a in args)],
            env=dict(env if env is not None else self.env()),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=str(self.root),
            stdin=subprocess.DEVNULL,
        )
        self.outputs += [done.stdout, done.stderr]
        return done

    def audit_json(self, *args: str | Path, rc: int = 0) -> Any:
        done = self.faramesh("audit", *args, "--dir", self.stack, "--format", "json")
        assert done.returncode == rc, (args, done.returncode, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def collect_logs(self, engine: EngineProcess) -> None:
        self.outputs.append(engine.log())
        for log in engine.paths.log_dir.glob("*.log") if engine.paths.log_dir.is_dir() else []:
            self.outputs.append(log.read_text(errors="replace"))


@pytest.fixture
def setup(pg_cluster: PgCluster) -> Iterator[Setup]:
    """A fresh database per test (the engine uses the default `faramesh` schema in it), dropped after."""
    dbname = f"fe_{secrets.token_hex(5)}"
    pg_cluster.admin().execute(f"CREATE DATABASE {dbname}")
    root = short_tmpdir("fpe")
    stack = make_stack(root, pg_policy())
    (stack / ".faramesh").mkdir()
    _, policy_file = compile_policy(stack, stack / ".faramesh" / "policy.json")  # where `apply` puts it
    assert policy_file is not None
    dirs = EngineDirs.fresh()
    s = Setup(pg_cluster, root, stack, policy_file, dirs, pg_cluster.url(dbname))
    try:
        yield s
    finally:
        dirs.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        if not pg_cluster.running:
            pg_cluster.start()
        with contextlib.suppress(Exception):
            pg_cluster.admin().execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@contextlib.contextmanager
def serving(s: Setup, env: Mapping[str, str] | None = None) -> Iterator[EngineProcess]:
    engine = s.engine(env)
    try:
        engine.start(timeout=30)
        yield engine
    finally:
        engine.ensure_stopped()
        s.collect_logs(engine)


def assert_no_password(s: Setup) -> None:
    leaked = [text[:200] for text in s.outputs if s.cluster.password in text]
    assert not leaked, f"the database password appears in output: {leaked}"


# ------------------------------------------------------------------------------------ the whole story


def test_serve_on_postgres_governs_and_the_audit_commands_read_its_chain(setup: Setup) -> None:
    s = setup
    with serving(s) as engine:
        with engine.agent("bot") as bot:
            permit = bot.call(govern("ticket/read"))
            defer = bot.call(govern("refund", {"amount": 100, "card": {"number": "4111111111111111"}}))
            deny = bot.call(govern("refund", {"amount": 900}))
        assert (permit["effect"], defer["effect"], deny["effect"]) == ("PERMIT", "DEFER", "DENY"), (permit, defer, deny)
        status = engine.status()
        assert status is not None
        s.outputs.append(json.dumps(status))
        wal = status["daemon"]["wal"]
        chain = (engine.paths.state_dir / "chain_id").read_text().strip()
        assert wal["backend"] == "postgres" and wal["chain_id"] == chain and chain in wal["path"]
        # read beside the running engine: its own snapshot, no lock the engine waits for
        live = s.audit_json("tail", "--lines", "10")
        assert {r["id"] for r in live["records"]} >= {permit["action_id"], defer["action_id"], deny["action_id"]}
        assert engine.terminate() == 0  # drains and writes the shutdown checkpoint

    verified = s.audit_json("verify")
    assert verified["ok"] is True and verified["keys_pinned"] is True, verified
    assert verified["chain_id"] == chain and verified["unsigned_tail"] == 0
    assert verified["records"] == verified["total_records"] >= 4  # the policy activation and three decisions
    assert "postgresql://127.0.0.1:" in verified["wal"] and chain in verified["wal"]

    tail = s.audit_json("tail", "--effect", "deny")
    assert [(r["id"], r["code"]) for r in tail["records"]] == [(deny["action_id"], "POLICY_DENY")]

    shown = s.audit_json("show", defer["action_id"])
    assert shown["dpr"]["effect"] == "DEFER" and shown["request_args"]["card"]["number"] == "[REDACTED]"
    assert shown["chain"]["proof"]["ok"] is True and shown["chain"]["checkpoint"]["key_pinned"] is True

    explained = s.faramesh("explain", deny["action_id"], "--dir", s.stack, "--format", "json")
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["agrees_with_record"] is True

    bundle = s.root / "bundle.jsonl"
    exported = s.faramesh("audit", "export", "--dir", s.stack, "--out", bundle)
    assert exported.returncode == 0, exported.stderr
    key_file = s.root / "engine.pub"
    (public,) = pinned_key(engine.paths.state_dir).values()
    key_file.write_text(f"ed25519:{public}\n")
    checked = s.faramesh("audit", "verify-bundle", bundle, "--key", key_file, "--format", "json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is True and report["chain_id"] == chain and report["records"] == verified["records"]

    # PostgreSQL is backed up with its own tools; asking for a chain the database lacks is a failed check
    backup = s.faramesh("audit", "backup", s.root / "copy.sqlite", "--dir", s.stack)
    assert backup.returncode == 1 and "pg_dump" in backup.stderr, backup.stderr
    assert not (s.root / "copy.sqlite").exists()
    other = s.faramesh("audit", "verify", "--dir", s.stack, "--chain", "01NOSUCHCHAIN")
    assert other.returncode == 1 and "no chain 01NOSUCHCHAIN" in other.stderr, other.stderr
    picked = s.audit_json("verify", "--chain", chain)
    assert picked["ok"] is True and picked["chain_id"] == chain

    # An operator without the variable: the engine's environment file (as `apply` writes it) resolves it
    config = s.root / "config"
    config.mkdir()
    env_file = engine.paths.env_file({"FARAMESH_CONFIG_DIR": str(config)})
    env_file.write_text(f'{URL_VAR}="{s.url}"\n')
    env_file.chmod(0o600)
    from_file = s.faramesh("audit", "verify", "--dir", s.stack, env=s.env(**{URL_VAR: None},
                                                                          FARAMESH_CONFIG_DIR=str(config)))  # fmt: skip
    assert from_file.returncode == 0 and "intact" in from_file.stdout, from_file.stdout + from_file.stderr

    # `plan --since` replays the recorded calls from the same database under an edited policy
    gov = s.stack / "governance.fms"
    gov.write_text(gov.read_text().replace("defer refund if amount < $500", "defer refund if amount < $1000"))
    planned = s.faramesh("plan", "--dir", s.stack, "--since", "1h", "--format", "json")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    replay = json.loads(planned.stdout)["replay"]
    assert replay["wal"] is not None and chain in replay["wal"], replay
    assert replay["transitions"] == [{"from": "DENY", "to": "DEFER", "calls": 1, "examples": [deny["action_id"]]}]

    assert_no_password(s)


# ------------------------------------------------------------------------------------ refusals


def test_a_missing_url_variable_refuses_serve_with_exit_4_and_the_audit_names_it(setup: Setup) -> None:
    s = setup
    env = s.env(**{URL_VAR: None})
    engine = s.engine(env)
    try:
        engine.start(wait_ready=False)
        assert engine.wait(60) == 4
    finally:
        engine.ensure_stopped()
        s.collect_logs(engine)
    log = engine.log()
    assert f'env("{URL_VAR}")' in log and f"{URL_VAR} is not set" in log, log
    assert "Traceback" not in log
    audit = s.faramesh("audit", "verify", "--dir", s.stack, env=env)
    assert audit.returncode == 1 and f"{URL_VAR} is not set" in audit.stderr, audit.stderr

    # the variable set, but to a wrong password: the database refuses, and neither password leaks
    sentinel = "Wr0ng-pw-" + secrets.token_hex(6)
    wrong = s.env(**{URL_VAR: s.cluster.url(s.url.rsplit("/", 1)[1], password=sentinel)})
    engine = s.engine(wrong)
    try:
        engine.start(wait_ready=False)
        assert engine.wait(60) != 0
    finally:
        engine.ensure_stopped()
        s.collect_logs(engine)
    assert "password authentication failed" in engine.log(), engine.log()
    audit = s.faramesh("audit", "tail", "--dir", s.stack, env=wrong)
    assert audit.returncode == 1 and "password authentication failed" in audit.stderr, audit.stderr
    assert not [text for text in s.outputs if sentinel in text]
    assert_no_password(s)


def test_the_postgres_wal_commits_off_the_event_loop_and_describes_itself_without_the_password(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faramesh.engine.paths import stack_paths
    from faramesh.engine.runner import serve_server

    s = setup
    monkeypatch.setenv(URL_VAR, s.url)  # serve_server reads the engine's own environment
    paths = stack_paths(s.stack, env=s.env())
    server = serve_server(s.stack, paths, s.policy_file)  # builds the store; nothing connects yet
    try:
        assert server.wal.commit_inline is False  # a network round trip never runs on the event loop
        assert isinstance(server.wal.store, pg.PgStore) and server.wal.store.sync == "normal"
        chain = (paths.state_dir / "chain_id").read_text().strip()
        assert server.config.wal_description["chain_id"] == chain == server.wal.store.chain_id
        assert s.cluster.password not in json.dumps(server.config.wal_description)
        # the same stack id and state dir on the next start: the engine continues its own chain
        again = serve_server(s.stack, paths, s.policy_file).wal.store
        assert isinstance(again, pg.PgStore) and again.chain_id == chain
    finally:
        server.wal.store.close()


def test_backend_postgres_without_a_url_is_a_schema_problem() -> None:
    problem = schema.runtime_problem({"backend": "postgres", "wal_sync": "full"})
    assert problem is not None and problem[1] == "backend" and "postgres_url" in problem[0]
    assert schema.runtime_problem({"backend": "postgres", "postgres_url": {"$env": URL_VAR}}) is None
    assert schema.runtime_problem({"backend": "sqlite"}) is None


# ------------------------------------------------------------------------------------ crash under load


class Load:
    """Clients on threads governing until the engine dies under them; every reply is logged."""

    CALLS: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("bot", "ticket/read", {}),  # PERMIT
        ("bot", "refund", {"amount": 900}),  # DENY
        ("bot", "refund", {"amount": 100}),  # DEFER
        ("other", "ticket/read", {}),  # PERMIT
        ("bot", "shell/exec", {}),  # DENY (default)
    )

    def __init__(self, engine: EngineProcess, clients: int) -> None:
        self.engine = engine
        self.answered: dict[str, str] = {}
        self.lock = threading.Lock()
        self.enough = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(clients)]

    def client(self, n: int) -> None:
        conns: dict[str, Conn] = {}
        try:
            for i in range(10_000):
                agent, tool, args = self.CALLS[(n + i) % len(self.CALLS)]
                conn = conns.get(agent) or conns.setdefault(agent, self.engine.agent(agent, timeout=20))
                reply = conn.call(govern(tool, args))
                with self.lock:
                    self.answered[reply["action_id"]] = reply["effect"]
                    if len(self.answered) >= 300:
                        self.enough.set()
        except (OSError, ConnectionError, ValueError):
            pass  # the engine was killed under us
        finally:
            for c in conns.values():
                c.close()


def test_sigkill_under_load_loses_no_answered_call_and_the_restart_verifies(setup: Setup) -> None:
    s = setup
    # No periodic checkpoint: the kill is sure to leave an unsigned tail for the restart to verify and sign.
    with serving(s, s.env(FARAMESH_TEST_CHECKPOINT_INTERVAL="3600")) as engine:
        load = Load(engine, clients=4)
        for t in load.threads:
            t.start()
        assert load.enough.wait(60), f"only {len(load.answered)} calls answered"
        os.kill(engine.pid, signal.SIGKILL)  # while the clients still call
        assert engine.wait(30) == -signal.SIGKILL
        for t in load.threads:
            t.join(30)
        assert not any(t.is_alive() for t in load.threads)
    with load.lock:
        answered = dict(load.answered)
    assert len(answered) >= 300

    with serving(s) as again:  # start-up verifies the chain the kill left (and takes its chain lock again)
        chain = (again.paths.state_dir / "chain_id").read_text().strip()
        with again.agent("bot") as bot:
            after = bot.call(govern("ticket/read"))
        assert after["effect"] == "PERMIT"
        assert again.terminate() == 0

    pins = PinnedKeys()
    (public,) = pinned_key(again.paths.state_dir).values()
    pins.add(public, "the engine's key")
    with pg.PgReader(s.url, chain) as reader:
        result = verify_wal(reader, pins)
        assert result.report.ok, result.report.to_dict()
        assert result.report.recovery_signed, "the restart signs the tail the kill left unsigned"
        stored = {r.id: r.effect for r in reader.records()}
    missing = [a for a in answered if a not in stored]
    assert not missing, f"{len(missing)} answered calls are not in the WAL, e.g. {missing[:3]}"
    wrong = [(a, e, stored[a]) for a, e in answered.items() if stored[a] != e]
    assert not wrong, f"effects differ from what the clients were told: {wrong[:3]}"
    assert stored[after["action_id"]] == "PERMIT"
    assert_no_password(s)
