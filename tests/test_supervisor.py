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
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faramesh.engine.paths import stack_paths
from faramesh.supervisor.control import request
from test_apply import AGENT_PY, Applied, _clear_flags, _processes_mentioning, new_applied

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the supervisor launches agents under their own uids")


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
    from faramesh.sandbox import cgroups
    from faramesh.supervisor.layout import stack_cgroup

    for name in cgroups.list_cgroups(stack_cgroup(stack_paths(a.stack, env=a.env).stack_id)):
        with contextlib.suppress(Exception):
            cgroups.kill_cgroup(name, timeout=2.0)
            cgroups.remove_cgroup(name)
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
    a = new_applied("faramesh-sup-")
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


def _descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *_descendants(int(child))]
    return out


def test_agent_output_goes_through_a_pipe_the_supervisor_relays(running: Applied) -> None:
    """The agent holds no descriptor on its log (or the log dir): stdout and stderr are a pipe whose read
    end only the supervisor has, and what the agent prints lands in its log."""
    state = running.supervisor_state()
    sup_pid, c1 = int(state["pid"]), int(_agent(running)["pid"])  # type: ignore[call-overload]
    agent_pids = [p for p in _descendants(c1) if b"agent.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert agent_pids, "the agent process was not found under its C1"
    log = Path(str(_agent(running)["log"]))
    _wait(lambda: "agent up" in log.read_text(errors="replace"))
    for pid in agent_pids:
        fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert fds[1].startswith("pipe:") and fds[2] == fds[1], fds
        assert not any(str(log.parent) in target for target in fds.values()), fds
    pipe = Path(f"/proc/{agent_pids[0]}/fd/1").stat().st_ino
    sup_fds = [Path(f"/proc/{sup_pid}/fd/{n}") for n in os.listdir(f"/proc/{sup_pid}/fd")]
    readers = [f for f in sup_fds if os.readlink(f).startswith("pipe:") and f.stat().st_ino == pipe]
    assert readers, "the supervisor does not hold the agent's output pipe"


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
    a = new_applied("faramesh-crash-")
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


# --- stack-qualified cgroups and `apply --stop` leaving nothing (issue 4 §1, §4 items 14 and 21) --------

# `kill -9 -1` (and a SIGKILL to its sandbox init) from inside first, then a double-forked `setsid`
# sleep; SIGINT/SIGTERM ignored, so only the SIGKILL after the grace period ends it.
STUBBORN_PY = """\
import errno, os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
results = {}
for name, target in (("all", -1), ("init", 1)):
    try:
        os.kill(target, signal.SIGKILL)
        results[name] = "sent"
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e.errno))
time.sleep(0.2)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "3600"])
    os._exit(0)
os.wait()
with open("marker.tmp", "w") as f:
    f.write(repr(results))
os.rename("marker.tmp", "marker")
print("agent up", flush=True)
while True:
    time.sleep(1)
"""


def _stubborn(prefix: str) -> Applied:
    a = new_applied(prefix)
    (a.stack / "agent.py").write_text(STUBBORN_PY)
    os.chmod(a.stack / "agent.py", 0o644)
    a.write_policy()
    proc = a.faramesh("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _wait(lambda: (a.stack / "workspace" / "marker").exists())
    return a


def _uid_processes(uid: int) -> list[int]:
    """Host scan: every live process with `uid` among its ids, in any PID namespace."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            st = _proc(int(entry))
            if str(uid) in st["Uid"].split() and not st["State"].startswith(("Z", "X")):
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    from faramesh.supervisor.layout import is_zombie_or_gone

    return is_zombie_or_gone(pid)


def _stack_cgroup_dirs(a: Applied) -> list[str]:
    from faramesh.sandbox import cgroups
    from faramesh.supervisor.layout import stack_cgroup

    seg = stack_cgroup(stack_paths(a.stack, env=a.env).stack_id)
    return [p for p in cgroups.cgroup_dirs(seg).values() if os.path.exists(p)]


def _tagged(a: Applied) -> list[int]:
    from faramesh.launchers.apply import _tagged_processes
    from faramesh.supervisor.layout import SupervisorFiles, process_tag

    paths = stack_paths(a.stack, env=a.env)
    return [
        pid
        for pid in _tagged_processes(process_tag(paths.stack_id), f"{SupervisorFiles(paths).agents_dir}/")
        if not _gone(pid)
    ]


def test_two_stacks_with_the_same_agent_id_have_their_own_cgroups() -> None:
    from faramesh.sandbox import cgroups
    from faramesh.supervisor.layout import _stack_slot

    def slot(s: Applied) -> int:
        return _stack_slot(stack_paths(s.stack, env=s.env).stack_id)

    a, b = new_applied("faramesh-cga-"), new_applied("faramesh-cgb-")
    while slot(b) == slot(a):  # 1 in 256: the two stacks' agents would get the same uid (refused)
        shutil.rmtree(b.base)
        b = new_applied("faramesh-cgb-")
    try:
        for s in (a, b):
            (s.stack / "agent.py").write_text(AGENT_PY)
            os.chmod(s.stack / "agent.py", 0o644)
            s.write_policy()
            proc = s.faramesh("apply")
            assert proc.returncode == 0, proc.stdout + proc.stderr
        ca, cb = (int(_agent(s)["pid"]) for s in (a, b))  # type: ignore[call-overload]
        names = []
        for c1 in (ca, cb):
            (name,) = {
                line.split(":", 2)[2]
                for line in Path(f"/proc/{c1}/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] == "pids" or line.startswith("0::")
            } - {"/"}
            assert name.startswith("/faramesh/") and name.endswith("/bot"), name
            names.append(name.removeprefix("/faramesh/"))
        assert names[0] != names[1]
        assert all(c1 in cgroups.cgroup_pids(n) for c1, n in zip((ca, cb), names, strict=True))
        stop = a.faramesh("apply", "--stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert _gone(ca) and _stack_cgroup_dirs(a) == []
        # The other stack's agent runs on, in its cgroup, which is still there.
        assert not _gone(cb) and _agent(b)["state"] == "RUNNING" and _agent(b)["pid"] == cb
        assert cb in cgroups.cgroup_pids(names[1]) and _stack_cgroup_dirs(b) != []
        assert b.faramesh("status").returncode == 0
        stop = b.faramesh("apply", "--stop")
        assert stop.returncode == 0 and _gone(cb) and _stack_cgroup_dirs(b) == []
    finally:
        _teardown(a)
        _teardown(b)


def test_kill_all_inside_spares_the_host_and_stop_ends_the_whole_tree_within_the_grace() -> None:
    from faramesh.supervisor.supervisor import STOP_GRACE

    a = _stubborn("faramesh-stub-")
    try:
        # Item 14 (host side): `kill -9 -1` and a SIGKILL to PID 1 inside hurt nothing outside the sandbox.
        state = a.supervisor_state()
        sup, zygote = int(state["pid"]), int(state["zygote_pid"])  # type: ignore[call-overload]
        engine = int(a.status()["pid"])  # type: ignore[call-overload]
        import ast

        results = ast.literal_eval((a.stack / "workspace" / "marker").read_text())
        # Made for real: sent, or ESRCH (nothing in its PID namespace it may signal but itself and init).
        assert results["all"] in ("sent", "ESRCH") and results["init"] in ("sent", "EPERM"), results
        assert not any(_gone(p) for p in (sup, zygote, engine))
        assert a.faramesh("status").returncode == 0
        agent = _agent(a)
        assert agent["state"] == "RUNNING" and agent["restarts"] == 0
        uid = int(agent["uid"])  # type: ignore[call-overload]
        tree = _uid_processes(uid)
        assert len(tree) >= 2, tree  # the agent and its setsid'd sleep (another session)
        # Item 21: SIGINT/SIGTERM ignored → SIGKILL after the grace period; nothing of the tree survives.
        t0 = time.monotonic()
        stop = subprocess.Popen(
            [str(Path(sys.executable).with_name("faramesh")), "apply", "--stop", "--dir", str(a.stack)],
            env=a.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while _uid_processes(uid) and time.monotonic() - t0 < STOP_GRACE + 10:
            time.sleep(0.02)
        took = time.monotonic() - t0
        out, err = stop.communicate(timeout=60)
        assert stop.returncode == 0, out + err
        assert _uid_processes(uid) == [] and all(_gone(p) for p in tree)
        assert took < STOP_GRACE + 1.5, f"the agent's tree took {took:.2f}s to end"
        assert all(_gone(p) for p in (sup, zygote, engine))
        assert _stack_cgroup_dirs(a) == [] and _tagged(a) == []
        assert _processes_mentioning(str(a.base)) == []
    finally:
        _teardown(a)


@pytest.mark.parametrize("killed", ["supervisor", "supervisor+zygote"])
def test_stop_after_a_killed_supervisor_leaves_nothing(killed: str) -> None:
    a = _stubborn("faramesh-orphan-")
    try:
        state = a.supervisor_state()
        sup, zygote = int(state["pid"]), int(state["zygote_pid"])  # type: ignore[call-overload]
        c1 = int(_agent(a)["pid"])  # type: ignore[call-overload]
        engine = int(a.status()["pid"])  # type: ignore[call-overload]
        uid = int(_agent(a)["uid"])  # type: ignore[call-overload]
        os.kill(sup, signal.SIGKILL)
        if killed == "supervisor+zygote":
            os.kill(zygote, signal.SIGKILL)
        _, lock = _files(a)
        from faramesh.supervisor.layout import lock_holder

        _wait(lambda: lock_holder(lock) is None)
        time.sleep(0.3)
        assert not _gone(c1) and _uid_processes(uid)  # orphaned, still running
        stop = a.faramesh("apply", "--stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "left by a dead supervisor" in stop.stdout, stop.stdout
        assert all(_gone(p) for p in (sup, zygote, c1, engine))
        assert _uid_processes(uid) == [] and _tagged(a) == [] and _stack_cgroup_dirs(a) == []
        assert _processes_mentioning(str(a.base)) == []
        again = a.faramesh("apply", "--stop")
        assert again.returncode == 0 and "nothing was running" in again.stdout, again.stdout
    finally:
        _teardown(a)
