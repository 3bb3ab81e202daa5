"""Escape tests, first subset of issue 4 §4: probe_escape.py runs as the agent under profile `full` through
the real launcher (as root with a dedicated host uid, and unprivileged via setpriv).

The probe refuses to attempt anything unless it is confined; a probe that did not report `confined` fails
the test. Credential sentinels live in temp "homes" passed to the probe as the invoking user's and root's
home; real credential files are never touched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sandbox_launch import IS_ROOT, PYTHON, Stack, cleanup, launcher_cmd, make_stack, next_uid, pids_with

__all__ = ["pkg_root"]
from test_sandbox_launch import pkg_root

PROBE = Path(__file__).with_name("probe_escape.py")
SENTINEL = "FARAMESH-ESCAPE-SENTINEL-51c9"
SECRET_NAME = "FARAMESH_TEST_SECRET_TOKEN"


def _plant_home(base: str, name: str) -> str:
    home = os.path.join(base, "homes", name)
    for rel in (".ssh/id_ed25519", ".ssh/id_rsa", ".aws/credentials", ".netrc", ".docker/config.json"):
        p = os.path.join(home, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(SENTINEL)
        os.chmod(p, 0o644)  # readable by anyone on the host: only the sandbox can hide them
    for d, _dirs, _files in os.walk(os.path.join(base, "homes")):
        os.chmod(d, 0o755)
    return home


class _Listener:
    """A TCP listener on the host's 127.0.0.1 that records whether anything connected."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    lst = _Listener()
    yield lst
    lst.close()


def _argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")]


def _host_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def _run_probe(pkg_root: str, s: Stack, listener: _Listener, *, unprivileged: bool) -> tuple[dict, dict]:
    for probe in (PROBE, PROBE.with_name("probe_common.py")):  # the stack is visible read-only inside
        shutil.copy(probe, os.path.join(s.stack, probe.name))
        os.chmod(os.path.join(s.stack, probe.name), 0o644)
    cfg = {
        "host_pidns": os.readlink("/proc/self/ns/pid"),
        "sentinel": SENTINEL,
        "secret_name": SECRET_NAME,
        "user_home": _plant_home(s.base, "alice"),
        "root_home": _plant_home(s.base, "root"),
        "governance": os.path.join(s.stack, "governance.fms"),
        "workspace": s.workspace,
        "port": listener.port,
    }
    marker = f"faramesh-probe-{os.getpid()}-{time.monotonic_ns()}"
    env = {"PATH": "/usr/bin:/bin", SECRET_NAME: SENTINEL, "AWS_SECRET_ACCESS_KEY": SENTINEL,
           "HOME": cfg["user_home"]}
    argv = [PYTHON, os.path.join(s.stack, "probe_escape.py"), json.dumps(cfg), marker]
    cmd = launcher_cmd(pkg_root, s, argv, unprivileged_uid=s.uid if unprivileged else None)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    host: dict = {}
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, f"probe printed nothing; launcher stderr: {proc.stderr.read() if proc.stderr else ''}"
        res = json.loads(line)
        if res.get("confined"):
            pids = [p for p in pids_with(marker)
                    if _argv(p)[:1] == [PYTHON] and _argv(p)[1].endswith("probe_escape.py")]
            assert len(pids) == 1  # the launcher (C1) and C2 carry the marker too: their argv is the launcher's
            host = _host_status(pids[0])
        proc.stdin.close()
        rc = proc.wait(timeout=20)
        host["launcher_rc"] = rc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return res, host


def _check(res: dict, host: dict, s: Stack, listener: _Listener, *, root_path: bool) -> None:
    assert res["confined"] is True, f"probe not confined, nothing was tested: {res}"
    assert all(res["checks"].values()), res["checks"]
    a = res["attempts"]
    for key, value in a.items():
        if key.startswith("read "):
            assert value in (errno.ENOENT, errno.EACCES), (key, value)
    assert a["env has secret"] is False and a["self environ has secret"] is False
    assert a["proc1 environ"] in (errno.EACCES, "no sentinel")
    assert a["proc1 mem"] in (errno.EACCES, errno.EPERM)
    assert a["ptrace attach parent"] == errno.EPERM
    assert a["unshare user"] == errno.EPERM
    assert a["mount tmpfs"] == errno.EPERM
    assert a["clone3"] == errno.ENOSYS
    assert a["socket netlink|1<<32"] in (errno.EAFNOSUPPORT, errno.EPERM)
    assert a["io_uring_setup"] == errno.EPERM
    for key in ("write /etc", "write /usr/bin", "write governance.fms"):
        assert a[key] in (errno.EROFS, errno.EACCES), (key, a[key])
    assert a["write workspace"] == 0
    assert os.path.exists(os.path.join(s.workspace, "probe-was-here"))
    assert a["python stdlib imports"] == 0
    assert a["tcp host listener"] in (errno.ECONNREFUSED, errno.ENETUNREACH)
    time.sleep(0.3)
    assert listener.connections == 0
    # Host side: the agent's own host ids, no supplementary groups.
    uids = host["Uid"].split()
    gids = host["Gid"].split()
    assert set(uids) == {str(s.uid)} and set(gids) == {str(s.uid)}
    assert host["Groups"] == ""
    if root_path:
        assert s.uid != 0
    assert host["launcher_rc"] == 0
    # Nothing was written on the host outside the workspace.
    assert not os.path.exists("/etc/faramesh-escape") and not os.path.exists("/usr/bin/faramesh-escape")
    with open(os.path.join(s.stack, "governance.fms")) as f:
        assert f.read() == "rules\n"


@pytest.mark.skipif(not IS_ROOT, reason="the root path needs root")
def test_escape_probe_root_path(pkg_root: str, listener: _Listener) -> None:
    s = make_stack(next_uid())
    try:
        res, host = _run_probe(pkg_root, s, listener, unprivileged=False)
        _check(res, host, s, listener, root_path=True)
    finally:
        cleanup(s)


def test_escape_probe_unprivileged(pkg_root: str, listener: _Listener) -> None:
    s = make_stack(next_uid() if IS_ROOT else os.getuid())
    try:
        res, host = _run_probe(pkg_root, s, listener, unprivileged=True)
        _check(res, host, s, listener, root_path=False)
    finally:
        cleanup(s)


def test_probe_refuses_outside_a_sandbox(tmp_path: Path) -> None:
    """The safety interlock itself: run unconfined, the probe attempts nothing and exits 3."""
    cfg = {"host_pidns": os.readlink("/proc/self/ns/pid")}
    p = subprocess.run([PYTHON, str(PROBE), json.dumps(cfg), "m"], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert p.returncode == 3
    out = json.loads(p.stdout)
    assert out["confined"] is False and "attempts" not in out
    assert out["checks"]["seccomp"] is False and out["checks"]["own_pidns"] is False


def test_probe_source_is_stdlib_only() -> None:
    for probe in (PROBE, PROBE.with_name("probe_common.py")):
        text = probe.read_text()
        assert "faramesh" not in text.split('"""', 2)[2].split("def ")[0]
    _ = tempfile  # (temp dirs come from make_stack)
