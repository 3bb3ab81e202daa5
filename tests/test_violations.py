"""Seccomp violation reports for real, as root: an agent under the supervisor attempts reported calls
(mount, unshare, ptrace, io_uring_setup); each fails EPERM (the supervisor's answer), the attempts land
as aggregated `sandbox_violation` DPRs, and with the supervisor SIGKILLed the same calls still fail
(ENOSYS: the kernel never runs them without a listener)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faramesh.engine.paths import stack_paths
from test_apply import Applied, new_applied
from test_supervisor import _teardown, _wait

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the supervisor launches agents under their own uids")

# The agent: round 1 when it starts, round 2 when the test drops `go` into its workspace.
AGENT_PY = r"""
import ctypes, errno, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"mount": 165, "unshare": 272, "ptrace": 101, "io_uring_setup": 425}

def attempt(name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(NR[name], *args)
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())) if rc == -1 else "SUCCEEDED"

def round_(tag, mounts):
    out = {"mount": [attempt("mount", b"none", b"/tmp", b"tmpfs", 0, None) for _ in range(mounts)],
           "unshare": [attempt("unshare", 0x10000000) for _ in range(3)],
           "ptrace": [attempt("ptrace", 16, 1, 0, 0)],
           "io_uring_setup": [attempt("io_uring_setup", 8, None)]}
    with open(tag + ".tmp", "w") as fh:
        json.dump(out, fh)
    os.rename(tag + ".tmp", tag)

round_("round1", 200)
while not os.path.exists("go"):
    time.sleep(0.05)
round_("round2", 2)
time.sleep(3600)
"""

POLICY = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "5s"
}

agent "bot" {
  command = "/usr/bin/python3 '%(agent)s'"
  default deny
  rules {
    permit search
  }
}
"""


def _violations(a: Applied) -> list[dict[str, Any]]:
    from faramesh.engine.wal.store import SqliteReader

    wal = stack_paths(a.stack, env=a.env).wal_path(None)
    with SqliteReader(wal) as reader:
        bodies = [json.loads(r.body) for r in reader.records()]
    return [b for b in bodies if b.get("action_type") == "sandbox_violation"]


def _totals(records: list[dict[str, Any]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for record in records:
        for name, count in record["attempts"].items():
            totals[name] = totals.get(name, 0) + count
    return totals


@pytest.fixture(scope="module")
def violating() -> Iterator[Applied]:
    a = new_applied("faramesh-viol-")
    (a.stack / "agent.py").write_text(AGENT_PY)
    os.chmod(a.stack / "agent.py", 0o644)
    (a.stack / "governance.fms").write_text(POLICY % {"agent": a.stack / "agent.py"})
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The enforcement report `apply` prints says the violation filter is on.
        assert "reported calls answered EPERM by the supervisor" in proc.stdout, proc.stdout
        yield a
    finally:
        _teardown(a)


def test_reported_calls_fail_eperm_and_become_aggregated_dprs(violating: Applied) -> None:
    result = violating.stack / "workspace" / "round1"
    _wait(result.exists, timeout=30)
    attempts = json.loads(result.read_text())
    assert set(attempts["mount"]) == {"EPERM"}, attempts
    assert set(attempts["unshare"]) == {"EPERM"} and attempts["ptrace"] == ["EPERM"], attempts
    assert attempts["io_uring_setup"] == ["EPERM"], attempts
    _wait(lambda: _totals(_violations(violating)).get("mount", 0) >= 200, timeout=20)
    records = _violations(violating)
    assert _totals(records) == {"mount": 200, "unshare": 3, "ptrace": 1, "io_uring_setup": 1}
    # 205 attempts in well under a few seconds: aggregated, not one DPR per call.
    assert len(records) <= 5, len(records)
    for record in records:
        assert record["agent_id"] == "bot" and record["effect"] == "DENY" and record["code"] == "SANDBOX_VIOLATION"
        assert record["tier"] == "os" and record["identity"]["role"] == "operator"
        assert record["identity"]["peer_uid"] == 0
    verify = violating.faramesh("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_with_the_supervisor_killed_the_calls_still_fail(violating: Applied) -> None:
    _wait((violating.stack / "workspace" / "round1").exists, timeout=30)
    state = violating.supervisor_state()
    os.kill(int(state["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    time.sleep(0.3)
    (violating.stack / "workspace" / "go").write_text("")
    result = violating.stack / "workspace" / "round2"
    _wait(result.exists, timeout=30)
    attempts = json.loads(result.read_text())
    for name, outcomes in attempts.items():
        assert "SUCCEEDED" not in outcomes, (name, attempts)
        assert set(outcomes) <= {"ENOSYS", "EPERM"}, (name, attempts)
    assert set(attempts["mount"]) == {"ENOSYS"}, attempts  # no listener left: the kernel refuses it
