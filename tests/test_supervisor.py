"""The supervisor for real, as root: the launch zygote, pidfds, supervisor.sock, FATAL, a dead supervisor,
a uid squatter, `apply --check-uid`. Stacks are copied to temporary directories with temporary state,
runtime and log dirs; teardown stops everything and clears the immutable flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faramesh.engine.paths import stack_paths
from faramesh.supervisor.control import request
from test_apply import AGENT_PY, Applied, _clear_flags, _processes_mentioning

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the supervisor launches agents under their own uids")


def _new(prefix: str) -> Applied:
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


def _teardown(a: Applied) -> None:
    state = {}
    with contextlib.suppress(Exception):
        state = a.supervisor_state()
    with contextlib.suppress(Exception):
        a.faramesh("apply", "--stop")
    zygote = state.get("zygote_pid")
    if isinstance(zygote, int):
        with contextlib.suppress(ProcessLookupError):
            os.kill(zygote, signal.SIGKILL)
    with contextlib.suppress(Exception):
        a.faramesh("unlock")
    _clear_flags(a.stack)
    for pid, _ in _processes_mentioning(str(a.base)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(a.base, ignore_errors=True)


def _files(a: Applied) -> tuple[Path, Path]:
    paths = stack_paths(a.stack, env=a.env)
    return paths.runtime_dir / "supervisor.sock", paths.state_dir / "supervisor.lock"


def _proc(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _wait(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _agent(a: Applied) -> dict[str, object]:
    return a.supervisor_state()["agents"]["bot"]  # type: ignore[index,no-any-return]


@pytest.fixture(scope="module")
def running() -> Iterator[Applied]:
    if not IS_ROOT:
        pytest.skip("root only")
    a = _new("faramesh-sup-")
    (a.stack / "agent.py").write_text(AGENT_PY)
    os.chmod(a.stack / "agent.py", 0o644)
    a.write_policy()
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield a
    finally:
        _teardown(a)


def test_launches_go_through_the_zygote(running: Applied) -> None:
    state = running.supervisor_state()
    sup_pid, zygote = int(state["pid"]), int(state["zygote_pid"])  # type: ignore[call-overload]
    c1 = int(_agent(running)["pid"])  # type: ignore[call-overload]
    assert _agent(running)["via"] == "zygote"
    assert int(_proc(c1)["PPid"]) == zygote  # C1 is the zygote's child …
    assert int(_proc(zygote)["PPid"]) == sup_pid  # … and the zygote the supervisor's
    assert Path(f"/proc/{zygote}/environ").read_bytes() == b""  # exec'd with an empty environment
    cmd = Path(f"/proc/{zygote}/cmdline").read_bytes().split(b"\0")
    assert cmd[:3] == [b"/usr/bin/python3", b"-I", b"-S"]
    # The supervisor never starts a thread (it forks nothing itself: one poll loop).
    assert _proc(sup_pid)["Threads"] == "1"
    # The zygote was started before anything else the supervisor made (control socket, agents).
    sock, _ = _files(running)
    zygote_start = int(Path(f"/proc/{zygote}/stat").read_text().rsplit(")", 1)[1].split()[19])
    c1_start = int(Path(f"/proc/{c1}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert zygote_start <= c1_start and sock.exists()


def test_control_socket_list_is_root_only_0600(running: Applied) -> None:
    sock, _ = _files(running)
    st = sock.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    reply = request(sock, {"verb": "list"})
    assert reply is not None, "no answer"
    (agent,) = reply["agents"]
    assert agent["id"] == "bot" and agent["state"] == "RUNNING" and agent["uid"] >= 61000
    bad = request(sock, {"verb": "nope"})
    assert bad is not None and bad["error"]["code"] == "UNKNOWN_VERB"


def test_check_uid_as_root(running: Applied) -> None:
    proc = running.faramesh("apply", "--check-uid")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "uid separation: possible" in proc.stdout and 'agent     "bot": uid 6' in proc.stdout


def test_status_shows_the_supervisor_agents_and_config(running: Applied) -> None:
    proc = running.faramesh("status", "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["supervisor"]["alive"] and data["supervisor"]["agents"][0]["state"] == "RUNNING"
    assert data["config"]["locked"] is True and data["config"]["summary"].startswith("locked (version ")
    text = running.faramesh("status")
    assert "supervisor running" in text.stdout and "config    locked (version" in text.stdout


def test_a_uid_squatter_blocks_the_launch(running: Applied) -> None:
    uid = int(_agent(running)["uid"])  # type: ignore[call-overload]
    c1 = int(_agent(running)["pid"])  # type: ignore[call-overload]
    squatter = subprocess.Popen(["/bin/sleep", "300"], user=uid, group=uid, stdin=subprocess.DEVNULL)
    try:
        os.kill(c1, signal.SIGKILL)  # the agent "crashes"; its restart must be refused
        _wait(lambda: _agent(running).get("reason") is not None)
        assert f"pid {squatter.pid}" in str(_agent(running)["reason"])
        assert _agent(running)["state"] == "BACKOFF" and _agent(running)["pid"] is None
        proc = running.faramesh("status")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "already used outside a sandbox" in proc.stdout
        check = running.faramesh("apply", "--check-uid")
        assert check.returncode == 4 and "NOT possible" in check.stdout
    finally:
        squatter.kill()
        squatter.wait()
    _wait(lambda: _agent(running)["state"] == "RUNNING", timeout=30)
    assert running.faramesh("status").returncode == 0


def test_stop_verb_is_a_graceful_stop(running: Applied) -> None:
    sock, lock = _files(running)
    c1 = int(_agent(running)["pid"])  # type: ignore[call-overload]
    reply = request(sock, {"verb": "stop"})
    assert reply == {"ok": True}
    from faramesh.supervisor.layout import lock_holder

    _wait(lambda: lock_holder(lock) is None)
    assert not os.path.exists(f"/proc/{c1}") or _proc(c1)["State"].startswith("Z")
    assert not sock.exists()
    proc = running.faramesh("status")  # the engine runs on, the supervisor does not: degraded
    assert proc.returncode == 3 and "supervisor DEAD" in proc.stdout, proc.stdout + proc.stderr


CRASHING = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "5s"
}

agent "bot" {
  command = "/bin/false"
  default deny
}
"""


def test_a_crash_loop_is_fatal_and_a_killed_supervisor_is_degraded() -> None:
    a = _new("faramesh-crash-")
    a.write_policy(raw=CRASHING)
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 4, proc.stdout + proc.stderr  # it died right after its start
        _wait(lambda: _agent(a)["state"] == "FATAL", timeout=40)
        status = a.faramesh("status")
        assert status.returncode == 3 and "FATAL" in status.stdout, status.stdout + status.stderr
        data = json.loads(a.faramesh("status", "--format", "json").stdout)
        assert data["supervisor"]["agents"][0]["state"] == "FATAL"
        sup = int(a.supervisor_state()["pid"])  # type: ignore[call-overload]
        os.kill(sup, signal.SIGKILL)
        _, lock = _files(a)
        from faramesh.supervisor.layout import lock_holder

        _wait(lambda: lock_holder(lock) is None)
        status = a.faramesh("status", "--format", "json")
        assert status.returncode == 3, status.stdout + status.stderr
        assert json.loads(status.stdout)["supervisor"]["alive"] is False
    finally:
        _teardown(a)
