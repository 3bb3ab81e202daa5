"""`config_event` (operator verb) and `faramesh unlock` recording `config_unlocked` on the WAL.

The verb is checked on an in-process engine (any user); `faramesh unlock` for real, as root, on a stack
copied to a temporary directory with temporary state, runtime and log dirs (never applied inside the
checkout). Teardown always stops everything and clears the immutable flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import InProcessEngine, compile_policy, make_stack, short_tmpdir
from faramesh.engine.paths import stack_paths
from test_apply import _clear_flags

IS_ROOT = os.geteuid() == 0
CONSOLE_SCRIPT = Path(sys.executable).with_name("faramesh")

POLICY = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "5s"
  immutable_config = true
}

agent "bot" {
  default deny
  rules {
    permit search
  }
}
"""


# --- the verb, on an in-process engine ------------------------------------------------------------------


@pytest.fixture
def engine() -> Iterator[InProcessEngine]:
    root = short_tmpdir()
    policy = compile_policy(make_stack(root))[0]
    eng = InProcessEngine(policy, root / "run").start()
    try:
        yield eng
    finally:
        eng.stop()
        shutil.rmtree(root, ignore_errors=True)


def _bodies(eng: InProcessEngine) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in eng.store.records()]


def test_config_event_on_the_operator_socket_appends_a_dpr(engine: InProcessEngine) -> None:
    paths = ["/srv/stack/governance.fms", "/srv/stack/.faramesh"]
    with engine.conn("operator") as op:
        reply = op.call({"type": "config_event", "event": "config_unlocked", "paths": paths, "by": "alice"})
        assert "error" not in reply, reply
        locked = op.call({"type": "config_event", "event": "config_locked", "paths": paths[:1]})
    record = next(b for b in _bodies(engine) if b.get("id") == reply["id"])
    assert record["action_type"] == reply["action_type"] == "config_unlocked"
    assert record["paths"] == paths
    assert record["policy_version"] == engine.server.policy.version == reply["policy_version"]
    assert record["identity"]["role"] == "operator" and record["identity"]["peer_uid"] == os.geteuid()
    assert record["by"] == f"uid:{os.geteuid()} (alice)"
    assert next(b for b in _bodies(engine) if b.get("id") == locked["id"])["action_type"] == "config_locked"


def test_config_event_is_refused_on_an_agent_socket_and_when_malformed(engine: InProcessEngine) -> None:
    before = len(_bodies(engine))
    with engine.conn("bot") as agent:
        reply = agent.call({"type": "config_event", "event": "config_unlocked", "paths": []})
        assert reply["error"]["code"] == "INVALID_REQUEST" and "operator verb" in reply["error"]["message"]
    with engine.conn("operator") as op:
        for bad in (
            {"type": "config_event", "event": "policy_activated"},
            {"type": "config_event"},
            {"type": "config_event", "event": "config_locked", "paths": "/etc"},
            {"type": "config_event", "event": "config_locked", "paths": [""]},
            {"type": "config_event", "event": "config_locked", "by": 7},
        ):
            assert op.call(bad)["error"]["code"] == "INVALID_REQUEST", bad
    assert len(_bodies(engine)) == before  # nothing recorded


# --- `faramesh unlock`, for real, as root ---------------------------------------------------------------


class Stack:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.stack = base / "stack"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_")}
        self.env.update(
            FARAMESH_STATE_DIR=str(base / "state"),
            FARAMESH_RUNTIME_DIR=str(base / "run"),
            FARAMESH_LOG_DIR=str(base / "log"),
        )

    def faramesh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args, "--dir", str(self.stack)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def records(self, action_type: str) -> list[dict[str, Any]]:
        from faramesh.engine.wal.store import SqliteReader

        wal = stack_paths(self.stack, env=self.env).wal_path(None)
        with SqliteReader(wal) as reader:
            bodies = [json.loads(r.body) for r in reader.records()]
        return [b for b in bodies if b.get("action_type") == action_type]

    def flagged(self, path: Path) -> bool:
        out = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        return "i" in out.split()[0]


@pytest.fixture
def applied() -> Iterator[Stack]:
    if not IS_ROOT:
        pytest.skip("apply and unlock need root")
    base = Path(tempfile.mkdtemp(prefix="faramesh-unlock-", dir="/tmp"))
    os.chmod(base, 0o755)
    s = Stack(base)
    s.stack.mkdir(mode=0o755)
    (s.stack / "governance.fms").write_text(POLICY)
    try:
        proc = s.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield s
    finally:
        with contextlib.suppress(Exception):
            s.faramesh("apply", "--stop")
        with contextlib.suppress(Exception):
            s.faramesh("unlock")
        _clear_flags(s.stack)
        shutil.rmtree(base, ignore_errors=True)


def test_unlock_with_a_running_engine_records_config_unlocked(applied: Stack) -> None:
    assert applied.flagged(applied.stack / "governance.fms")
    proc = applied.faramesh("unlock")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not applied.flagged(applied.stack / "governance.fms")
    assert "recorded config_unlocked" in proc.stdout
    (record,) = applied.records("config_unlocked")
    assert str(applied.stack / "governance.fms") in record["paths"]
    assert record["identity"]["peer_uid"] == 0 and record["identity"]["role"] == "operator"
    version = json.loads(applied.faramesh("status", "--format", "json").stdout)["daemon"]["policy_version"]
    assert record["policy_version"] == version
    verify = applied.faramesh("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    tail = applied.faramesh("audit", "tail", "--format", "json")
    assert tail.returncode == 0 and "config_unlocked" in tail.stdout
    # Nothing locked → nothing to record.
    again = applied.faramesh("unlock")
    assert again.returncode == 0 and "not locked" in again.stdout
    assert len(applied.records("config_unlocked")) == 1


def test_unlock_with_the_engine_down_unlocks_and_says_it_was_not_recorded(applied: Stack) -> None:
    assert applied.faramesh("apply", "--stop").returncode == 0
    assert applied.flagged(applied.stack / "governance.fms")  # --stop leaves the lock alone
    proc = applied.faramesh("unlock")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not applied.flagged(applied.stack / "governance.fms")
    assert "could not be recorded" in proc.stderr
    assert applied.records("config_unlocked") == []


def test_apply_records_config_locked_once_per_lock_window(applied: Stack) -> None:
    (first,) = applied.records("config_locked")
    assert str(applied.stack / "governance.fms") in first["paths"]
    assert first["identity"]["role"] == "operator"
    again = applied.faramesh("apply")  # converged: the flags are already set, nothing new to record
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(applied.records("config_locked")) == 1
    assert applied.faramesh("unlock").returncode == 0
    relock = applied.faramesh("apply")
    assert relock.returncode == 0, relock.stdout + relock.stderr
    assert "recorded config_locked" in relock.stdout
    locks = applied.records("config_locked")
    unlocks = applied.records("config_unlocked")
    assert len(locks) == 2 and len(unlocks) == 1
    assert locks[0]["seq"] < unlocks[0]["seq"] < locks[1]["seq"]
