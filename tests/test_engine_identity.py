"""The engine of a root-applied stack runs as the `faramesh` service user (DESIGN.md §2), for real:
its uid and groups, the environment file for secret references, the sticky root:faramesh directories
that keep root's files out of the engine's reach, and agent socket dirs no other local user can enter."""

from __future__ import annotations

import ast
import grp
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faramesh.engine.paths import StackPaths, stack_paths
from test_apply import Applied, new_applied
from test_supervisor import _teardown, _wait

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="apply runs as root")

POLICY = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "5s"
  slack_webhook_url = env("%(var)s")
}

agent "bot" {
  command = "/bin/sleep 3600"
  default deny
  rules {
    permit search
  }
}
"""
SENTINEL = f"http://127.0.0.1:9/hooks/SENTINEL-{secrets.token_hex(8)}"


def _paths(a: Applied) -> StackPaths:
    return stack_paths(a.stack, env=a.env)


def _engine_pid(a: Applied) -> int:
    raw = (_paths(a).state_dir / "engine.lock").read_text().strip()
    return int(raw)


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _as_user(uid: int, gid: int, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-c", code], user=uid, group=gid, extra_groups=[], capture_output=True, text=True,
        timeout=30, cwd="/",
    )


@pytest.fixture(scope="module")
def applied() -> Iterator[Applied]:
    a = new_applied("faramesh-ident-")
    a.env["FARAMESH_CONFIG_DIR"] = str(a.base / "etc")
    a.env["FM_TEST_ENGINE_SECRET"] = SENTINEL
    a.env["FM_ROOT_ONLY_MARKER"] = "root-env-must-not-leak"
    (a.stack / "governance.fms").write_text(POLICY % {"var": "FM_TEST_ENGINE_SECRET"})
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield a
    finally:
        _teardown(a)


def test_the_engine_runs_as_the_faramesh_user_with_only_its_groups(applied: Applied) -> None:
    user = pwd.getpwnam("faramesh")
    operators = grp.getgrnam("faramesh-operators").gr_gid
    status = _status(_engine_pid(applied))
    assert status["Uid"].split() == [str(user.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(user.pw_gid)] * 4, status["Gid"]
    assert set(status["Groups"].split()) == {str(operators)}, status["Groups"]
    assert status["CapEff"] == "0000000000000000"
    check = applied.faramesh("apply", "--check-uid")
    assert f"engine    uid {user.pw_uid} (faramesh)" in check.stdout, check.stdout


def test_secret_references_come_from_the_root_only_environment_file(applied: Applied) -> None:
    env_file = _paths(applied).env_file(applied.env)
    st = env_file.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert SENTINEL in env_file.read_text()
    environ = Path(f"/proc/{_engine_pid(applied)}/environ").read_bytes().split(b"\0")
    assert f"FM_TEST_ENGINE_SECRET={SENTINEL}".encode() in environ
    assert not any(v.startswith(b"FM_ROOT_ONLY_MARKER=") for v in environ), "the engine inherited root's env"
    for path in [*applied.stack.rglob("*"), *_paths(applied).state_dir.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            assert SENTINEL.encode() not in path.read_bytes(), path
    # A later apply without the variable keeps the secret from the file (and changes nothing).
    env = {k: v for k, v in applied.env.items() if k != "FM_TEST_ENGINE_SECRET"}
    again = subprocess.run(
        [str(Path(sys.executable).parent / "faramesh"), "apply", "--dir", str(applied.stack)],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert SENTINEL in env_file.read_text()


def test_a_reference_set_nowhere_changes_nothing() -> None:
    a = new_applied("faramesh-ident-unset-")
    a.env["FARAMESH_CONFIG_DIR"] = str(a.base / "etc")
    a.env.pop("FM_TEST_NEVER_SET", None)
    (a.stack / "governance.fms").write_text(POLICY % {"var": "FM_TEST_NEVER_SET"})
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "$FM_TEST_NEVER_SET" in proc.stderr and "nothing changed" in proc.stderr
        assert not (a.stack / ".faramesh").exists()
        assert not _paths(a).operator_socket.exists()
    finally:
        _teardown(a)


def test_the_engine_cannot_touch_what_the_root_supervisor_acts_on(applied: Applied) -> None:
    user = pwd.getpwnam("faramesh")
    state, runtime = _paths(applied).state_dir, _paths(applied).runtime_dir
    code = f"""
import os, sys
results = {{}}
def attempt(name, fn):
    try:
        fn()
        results[name] = "ALLOWED"
    except OSError as e:
        results[name] = e.errno
attempt("rename agents", lambda: os.rename("{state}/agents", "{state}/agents.x"))
attempt("unlink policy", lambda: os.unlink("{state}/policy.json"))
attempt("write policy", lambda: open("{state}/policy.json", "a").close())
attempt("unlink supervisor.lock", lambda: os.unlink("{state}/supervisor.lock"))
attempt("replace supervisor.json", lambda: os.rename("{state}/engine.key", "{runtime}/supervisor.json"))
attempt("unlink supervisor.sock", lambda: os.unlink("{runtime}/supervisor.sock"))
attempt("list agents specs", lambda: os.listdir("{state}/agents"))
attempt("own file", lambda: open("{state}/engine-scratch", "w").close())
print(repr(results))
"""
    proc = _as_user(user.pw_uid, user.pw_gid, code)
    assert proc.returncode == 0, proc.stderr
    results = ast.literal_eval(proc.stdout)
    assert results.pop("own file") == "ALLOWED"  # the engine does create its own files there
    assert all(v in (1, 13) for v in results.values()), results  # EPERM / EACCES, each one
    (state / "engine-scratch").unlink()


def test_another_local_user_cannot_reach_an_agent_or_the_operator_socket(applied: Applied) -> None:
    paths = _paths(applied)
    code = f"""
import socket
out = []
for path in ("{paths.agent_socket('bot')}", "{paths.operator_socket}"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out.append("CONNECTED")
    except OSError as e:
        out.append(e.errno)
print(out)
"""
    proc = _as_user(65534, 65534, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[13, 13]", proc.stdout  # EACCES for both
    # Root (the operator) still reaches the operator socket.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(paths.operator_socket))
        s.sendall(b'{"type":"status"}\n')
        assert b"READY" in s.recv(65536)


def test_a_restarted_engine_runs_as_faramesh_too(applied: Applied) -> None:
    before = _engine_pid(applied)
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30

    def restarted() -> bool:
        try:
            pid = _engine_pid(applied)
        except (OSError, ValueError):
            return False
        return pid != before and Path(f"/proc/{pid}").exists() and applied.status().get("state") == "READY"

    _wait(restarted, timeout=max(1.0, deadline - time.monotonic()))
    assert _status(_engine_pid(applied))["Uid"].split()[0] == str(pwd.getpwnam("faramesh").pw_uid)
    assert json.loads(applied.faramesh("status", "--format", "json").stdout)["daemon"]["state"] == "READY"


def test_operator_socket_belongs_to_the_operators_group(applied: Applied) -> None:
    """DESIGN.md §2: members of faramesh-operators use operator.sock; nobody else may."""
    st = _paths(applied).operator_socket.stat()
    assert st.st_gid == grp.getgrnam("faramesh-operators").gr_gid and st.st_mode & 0o777 == 0o660
