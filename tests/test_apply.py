"""`faramesh apply` / `apply --stop` / `unlock` / `logs` for real, as root, through the console script.

A one-agent stack is copied to a temporary directory (never applied inside the checkout: an immutable
file there would break the next clone); state, runtime and log dirs are temporary too. The agent talks
to the engine through its socket (/run/faramesh/agent.sock inside the sandbox), writes the reply into its
workspace and sleeps. Teardown always stops everything and clears the immutable flags.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faramesh.engine.paths import stack_paths
from faramesh.supervisor.layout import UID_BASE, plan_agents
from faramesh.supervisor.supervisor import CRASH_LOOP_EXITS, Backoff

IS_ROOT = os.geteuid() == 0
CONSOLE_SCRIPT = Path(sys.executable).with_name("faramesh")

AGENT_PY = """\
import os, socket, time
reply = b""
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.environ["FARAMESH_SOCKET"])
    s.sendall(b'{"type":"govern","v":1,"call_id":"c1","agent_id":"bot","session_id":"s","tool_id":"search","args":{}}\\n')
    while not reply.endswith(b"\\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
except OSError as e:
    reply = repr(e).encode()
with open("marker", "wb") as f:
    f.write(reply)
print("agent up", flush=True)
time.sleep(3600)
"""

POLICY = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "5s"
  immutable_config = true
}

agent "bot" {
  command = "/usr/bin/python3 '%(agent)s'"
  default deny
  rules {
    permit search
%(extra)s  }
}
"""


@dataclass
class Applied:
    base: Path
    stack: Path
    env: dict[str, str]

    def faramesh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args, "--dir", str(self.stack)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def write_policy(self, extra: str = "", raw: str | None = None) -> None:
        text = raw if raw is not None else POLICY % {"agent": self.stack / "agent.py", "extra": extra}
        (self.stack / "governance.fms").write_text(text)

    def status(self) -> dict[str, object]:
        proc = self.faramesh("status", "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)["daemon"]  # type: ignore[no-any-return]

    def supervisor_state(self) -> dict[str, object]:
        paths = stack_paths(self.stack, env=self.env)
        return json.loads((paths.runtime_dir / "supervisor.json").read_text())  # type: ignore[no-any-return]


def new_applied(prefix: str) -> Applied:
    """A fresh stack directory under /tmp (never the checkout) with its own state, runtime and log dirs."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    stack = base / "stack"
    stack.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_")}
    env.update(
        FARAMESH_STATE_DIR=str(base / "state"),
        FARAMESH_RUNTIME_DIR=str(base / "run"),
        FARAMESH_LOG_DIR=str(base / "log"),
    )
    return Applied(base, stack, env)


def _clear_flags(root: Path) -> None:
    from faramesh.sandbox.immutable import clear_immutable

    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(Exception):
                    clear_immutable(path)
    with contextlib.suppress(Exception):
        clear_immutable(str(root))


def _processes_mentioning(marker: str) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append((int(entry), cmdline))
    return found


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.fixture(scope="module")
def applied() -> Iterator[Applied]:
    if not IS_ROOT:
        pytest.skip("apply launches agents under their own uids: root only")
    a = new_applied("faramesh-apply-")
    base, stack = a.base, a.stack
    (stack / "agent.py").write_text(AGENT_PY)
    os.chmod(stack / "agent.py", 0o644)
    a.write_policy()
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield a
    finally:
        with contextlib.suppress(Exception):
            a.faramesh("apply", "--stop")
        with contextlib.suppress(Exception):
            a.faramesh("unlock")
        _clear_flags(stack)
        for pid, _ in _processes_mentioning(str(stack)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def _agent_pid(a: Applied) -> int:
    found = [
        pid
        for pid, cmd in _processes_mentioning(str(a.stack / "agent.py"))
        if "agent_exec" not in cmd and "python3 -I -S" not in cmd
    ]
    assert len(found) == 1, _processes_mentioning(str(a.stack))
    return found[0]


def test_apply_starts_the_engine_and_the_sandboxed_agent(applied: Applied) -> None:
    daemon = applied.status()
    assert daemon["state"] == "READY"
    applied_bytes = (applied.stack / ".faramesh" / "policy.json").read_bytes()
    assert daemon["policy_version"] == hashlib.sha256(applied_bytes).hexdigest()
    pid = _agent_pid(applied)
    st = _proc_status(pid)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    uids = st["Uid"].split()
    assert uids[0] != "0" and len(set(uids)) == 1 and int(uids[0]) >= UID_BASE, st["Uid"]
    assert st["CapEff"] == "0000000000000000" and st["Groups"] == ""
    # The agent reached the engine through the socket mounted at /run/faramesh and got a decision.
    deadline = time.monotonic() + 10
    marker = applied.stack / "workspace" / "marker"
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(marker.read_bytes())["effect"] == "PERMIT"
    assert marker.stat().st_uid == int(uids[0])
    # The artifacts: shim on the system Python, never a virtualenv path; the state-dir copy matches.
    shim = (applied.stack / ".faramesh" / "bin" / "agent").read_text()
    assert shim.startswith("#!/bin/sh") and "/usr/bin/python3 -I -S" in shim and ".venv" not in shim
    paths = stack_paths(applied.stack, env=applied.env)
    assert paths.policy_copy.read_bytes() == (applied.stack / ".faramesh" / "policy.json").read_bytes()
    assert "FARAMESH_SOCKET=/run/faramesh/agent.sock" in (applied.stack / ".faramesh/runtime/agent.env").read_text()
    logs = applied.faramesh("logs", "--agent", "bot")
    assert logs.returncode == 0 and "agent up" in logs.stdout


def test_immutable_config_locks_and_unlock_clears(applied: Applied) -> None:
    lsattr = subprocess.run(
        ["lsattr", "-d", str(applied.stack / "governance.fms"), str(applied.stack / ".faramesh")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(line.split()[0].count("i") == 1 for line in lsattr.stdout.splitlines()), lsattr.stdout
    proc = applied.faramesh("unlock")
    assert proc.returncode == 0, proc.stderr
    lsattr = subprocess.run(["lsattr", str(applied.stack / "governance.fms")], capture_output=True, text=True)
    assert "i" not in lsattr.stdout.split()[0], lsattr.stdout


def test_apply_again_is_a_no_op(applied: Applied) -> None:
    before = _agent_pid(applied)
    proc = applied.faramesh("apply")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout or "locked" in proc.stdout  # re-locks after the unlock above
    proc = applied.faramesh("apply")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stdout + proc.stderr
    assert _agent_pid(applied) == before


def test_changed_rule_is_hot_swapped_without_restarting_the_agent(applied: Applied) -> None:
    before_pid = _agent_pid(applied)
    before = applied.status()["policy_version"]
    assert applied.faramesh("unlock").returncode == 0
    applied.write_policy(extra="    permit ticket/read\n")
    proc = applied.faramesh("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hot-swapped" in proc.stdout
    after = applied.status()["policy_version"]
    compiled = applied.faramesh("compile")
    assert after != before and f"policy version {after}" in compiled.stderr
    assert _agent_pid(applied) == before_pid
    assert applied.supervisor_state()["agents"]["bot"]["restarts"] == 0  # type: ignore[index]
    lsattr = subprocess.run(["lsattr", str(applied.stack / "governance.fms")], capture_output=True, text=True)
    assert "i" in lsattr.stdout.split()[0]  # locked again


def test_a_policy_that_fails_to_compile_changes_nothing(applied: Applied) -> None:
    before = applied.status()["policy_version"]
    applied_copy = (applied.stack / ".faramesh" / "policy.json").read_bytes()
    assert applied.faramesh("unlock").returncode == 0
    good = (applied.stack / "governance.fms").read_text()
    applied.write_policy(raw=good.replace("permit search", "permit search if"))
    proc = applied.faramesh("apply")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert applied.status()["policy_version"] == before
    assert (applied.stack / ".faramesh" / "policy.json").read_bytes() == applied_copy
    applied.write_policy(raw=good)


def test_stop_leaves_nothing_running_and_is_idempotent(applied: Applied) -> None:
    agent_pid = _agent_pid(applied)
    proc = applied.faramesh("apply", "--stop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _processes_mentioning(str(applied.stack)) == []
    assert not os.path.exists(f"/proc/{agent_pid}/status") or _proc_status(agent_pid)["State"].startswith("Z")
    paths = stack_paths(applied.stack, env=applied.env)
    assert not paths.operator_socket.exists() and not (paths.runtime_dir / "supervisor.pid").exists()
    assert applied.faramesh("status").returncode == 4
    again = applied.faramesh("apply", "--stop")
    assert again.returncode == 0 and "nothing was running" in again.stdout


# --- no root needed ------------------------------------------------------------------------------------


def test_commands_are_split_with_shell_rules_and_agents_get_distinct_uids(tmp_path: Path) -> None:
    from faramesh.engine.policy.stack import compile_stack

    (tmp_path / "governance.fms").write_text(
        'agent "a" {\n  command = "/bin/echo \'two words\' x\\\\ y"\n  default deny\n}\n'
        'agent "b" {\n  default deny\n}\n'
    )
    policy = compile_stack(tmp_path).policy
    plans = plan_agents(tmp_path, policy, stack_paths(tmp_path, env={"FARAMESH_STATE_DIR": str(tmp_path)}))
    by_id = {p.agent_id: p for p in plans}
    assert by_id["a"].argv == ("/bin/echo", "two words", "x y")
    assert by_id["b"].argv == ()
    assert by_id["a"].uid != by_id["b"].uid and min(by_id["a"].uid, by_id["b"].uid) >= UID_BASE
    assert 65534 not in (by_id["a"].uid, by_id["b"].uid)
    assert by_id["a"].workspace != by_id["b"].workspace  # never a shared workspace


def test_backoff_doubles_to_a_minute_and_a_crash_loop_is_fatal() -> None:
    b = Backoff()
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    now = 1000.0
    verdicts = [b.record_exit(now + i, ran_for=0.5) for i in range(CRASH_LOOP_EXITS)]
    assert verdicts == [False] * (CRASH_LOOP_EXITS - 1) + [True]
    spaced = Backoff()
    assert not any(spaced.record_exit(now + 61 * i, ran_for=0.5) for i in range(10))


def test_an_agent_that_dies_at_once_fails_the_apply_with_its_log(tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("apply launches agents under their own uids: root only")
    a = new_applied("faramesh-apply-")
    base, stack = a.base, a.stack
    a.write_policy(
        raw=POLICY.replace("immutable_config = true", "immutable_config = false")
        % {"agent": "/nonexistent/agent.py", "extra": ""}
    )
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert 'agent "bot" died right after its start' in proc.stderr
        assert "/nonexistent/agent.py" in proc.stderr  # the agent's own last log lines
    finally:
        stopped = a.faramesh("apply", "--stop")
        _clear_flags(stack)
        shutil.rmtree(base, ignore_errors=True)
    assert stopped.returncode == 0
    assert _processes_mentioning(str(stack)) == []
