"""launch(): the whole §5 sequence through the real lean entry (`python3 -I -S … agent_exec`), in subprocesses.

The launcher runs as root (R1–R3 then S1…, agent on a dedicated host uid) and, via setpriv, as an
unprivileged user (from S1, its own uid mapped to 1000). pytest itself is never confined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faramesh.sandbox import cgroups, seccomp
from faramesh.sandbox.errors import SpecError
from faramesh.sandbox.launch import build_spec, spec_from_json, spec_to_json
from faramesh.sandbox.spec import SandboxSpec

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
PYTHON = "/usr/bin/python3"
# -S leaves site-packages out: the caller puts the directory holding `faramesh` on sys.path itself.
BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from faramesh.launchers.agent_exec import run; run()")
FULL_BPF = seccomp.build_filter("full")
MINIMAL_BPF = seccomp.build_filter("minimal")
_uid_counter = [0]


def next_uid() -> int:
    _uid_counter[0] += 1
    return 65100 + _uid_counter[0] + (os.getpid() % 50) * 20


@pytest.fixture(scope="session")
def pkg_root() -> Iterator[str]:
    """A world-readable directory whose `faramesh/` mirrors the package layout (symlinks to the checkout)."""
    d = tempfile.mkdtemp(prefix="faramesh-pkg-", dir="/tmp")
    os.chmod(d, 0o755)
    pkg = os.path.join(d, "faramesh")
    os.mkdir(pkg, 0o755)
    os.symlink(REPO / "faramesh_pkg" / "__init__.py", os.path.join(pkg, "__init__.py"))
    os.symlink(REPO / "sandbox", os.path.join(pkg, "sandbox"))
    os.symlink(REPO / "launchers", os.path.join(pkg, "launchers"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Stack:
    base: str
    stack: str
    workspace: str
    uid: int
    spec: SandboxSpec


def make_stack(uid: int, profile: str = "full", **kw: object) -> Stack:
    base = tempfile.mkdtemp(prefix="faramesh-launch-", dir="/tmp")
    os.chmod(base, 0o755)
    st = os.path.join(base, "stack")
    os.mkdir(st, 0o755)
    with open(os.path.join(st, "governance.fms"), "w") as f:
        f.write("rules\n")
    ws = os.path.join(st, "workspace")
    os.mkdir(ws, 0o755)
    if IS_ROOT:
        os.chown(ws, uid, uid)
    bpf = {"full": FULL_BPF, "minimal": MINIMAL_BPF, "off": b""}[profile]
    spec = SandboxSpec(profile=profile, agent_id=f"t{uid}", host_uid=uid, host_gid=uid,  # type: ignore[arg-type]
                       workspace=ws, stack_dir=st, seccomp_bpf=bpf, **kw)  # type: ignore[arg-type]
    return Stack(base, st, ws, uid, spec)


def cleanup(s: Stack) -> None:
    shutil.rmtree(s.base, ignore_errors=True)
    if IS_ROOT:
        with contextlib.suppress(Exception):
            cgroups.remove_cgroup(s.spec.agent_id)


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = make_stack(next_uid() if IS_ROOT else os.getuid())
    yield s
    cleanup(s)


def launcher_cmd(pkg_root: str, s: Stack, argv: list[str], *, unprivileged_uid: int | None = None,
                 spec: SandboxSpec | None = None) -> list[str]:
    path = os.path.join(s.base, "spec.json")
    with open(path, "w") as f:
        f.write(spec_to_json(spec or s.spec))
    os.chmod(path, 0o644)
    prefix: list[str] = []
    if unprivileged_uid is not None and IS_ROOT:
        prefix = ["setpriv", f"--reuid={unprivileged_uid}", f"--regid={unprivileged_uid}", "--clear-groups", "--"]
    return [*prefix, PYTHON, "-I", "-S", "-c", BOOT, pkg_root, "--spec", path, "--", *argv]


def run(pkg_root: str, s: Stack, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 30,
        **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launcher_cmd(pkg_root, s, argv, **kw), capture_output=True, text=True,  # type: ignore[arg-type]
                          timeout=timeout, env=env if env is not None else {"PATH": "/usr/bin:/bin"},
                          stdin=subprocess.DEVNULL)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def pids_with(marker: str) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(p))
        except OSError:
            pass
    return found


# --- spec JSON -------------------------------------------------------------------------------------------

def test_spec_json_roundtrip(stack: Stack) -> None:
    spec = dataclasses.replace(stack.spec, read_only_paths=("/x/y",), rlimits=(("CORE", 0, 0), ("NOFILE", 64, 64)),
                               keep_fds=(5,), egress_port=8080)
    back = spec_from_json(spec_to_json(spec))
    assert back == spec and back.seccomp_bpf == FULL_BPF
    with pytest.raises(SpecError):
        spec_from_json(json.dumps({**json.loads(spec_to_json(spec)), "bogus": 1}))
    with pytest.raises(SpecError):
        spec_from_json(json.dumps({**json.loads(spec_to_json(spec)), "seccomp_bpf_b64": "!!"}))


def test_build_spec_compiles_the_filter(stack: Stack) -> None:
    spec = build_spec("minimal", "a1", 65001, 65001, stack.workspace, stack.stack)
    assert spec.seccomp_bpf == MINIMAL_BPF
    assert build_spec("off", "a1", 65001, 65001, stack.workspace, stack.stack).seccomp_bpf == b""


# --- the lean entry --------------------------------------------------------------------------------------

def test_launcher_imports_nothing_heavy(pkg_root: str, stack: Stack) -> None:
    cmd = launcher_cmd(pkg_root, stack, ["/bin/true"])
    cmd.insert(cmd.index(PYTHON) + 1, "-Ximporttime")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    modules = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "faramesh.sandbox.launch" in modules and "faramesh.sandbox.seccomp" in modules
    for heavy in ("lark", "typer", "yaml", "cryptography", "orjson", "pyseccomp", "seccomp", "click"):
        assert heavy not in modules, heavy
    assert not any(m.startswith("faramesh.engine") for m in modules)
    # Per-launch cost (issue 4 §5): beyond what the bare interpreter loads, only os, ctypes/struct and a
    # few C modules (_socket: SCM_RIGHTS for the violation listener) — no runpy/importlib.util (BOOT), re,
    # enum/signal, socket, typing, dataclasses, inspect, json, base64 or contextlib.
    bare = subprocess.run([PYTHON, "-I", "-S", "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                          timeout=30).stderr
    baseline = {line.split("|")[-1].strip() for line in bare.splitlines() if line.startswith("import time:")}
    extra = {m for m in modules - baseline if not m.startswith("faramesh")}
    assert extra <= {"__future__", "os", "stat", "_stat", "posixpath", "genericpath", "_collections_abc", "errno",
                     "ctypes", "_ctypes", "ctypes._endian", "types", "struct", "_struct", "_signal", "binascii",
                     "_json", "marshal", "_socket"}, sorted(extra)
    for banned in ("socket", "runpy", "importlib.util", "re", "enum", "signal", "typing", "dataclasses", "inspect",
                   "ast", "json", "base64", "contextlib", "functools", "collections"):
        assert banned not in modules, banned


def test_usage_errors_exit_64(pkg_root: str, stack: Stack) -> None:
    cmd = launcher_cmd(pkg_root, stack, ["/bin/true"])
    cmd.remove("--")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert p.returncode == 64 and "usage" in p.stderr


# --- exit status, report, environment ---------------------------------------------------------------------

def test_exit_status_and_report(pkg_root: str, stack: Stack) -> None:
    p = run(pkg_root, stack, ["/bin/sh", "-c", "exit 7"])
    assert p.returncode == 7, p.stderr
    report = p.stderr
    assert "profile full: running" in report
    for step in ("R1 rlimits CORE=0/0", "S1 namespaces", "S2 setgroups deny", "S5 new root", "S6 Landlock",
                 "S7 securebits", "S8 seccomp full", "S9 fds closed"):
        assert step in report, step
    assert "applied: S3 egress: none (no egress block: an empty network namespace)" in report
    assert "NOT applied: seccomp violation reports (launcher" in report
    if IS_ROOT:
        assert f"R3 host uid/gid {stack.uid}/{stack.uid}" in report
    p = run(pkg_root, stack, ["/bin/sh", "-c", "kill -KILL $$"])
    assert p.returncode == 128 + signal.SIGKILL


def test_missing_command_is_127(pkg_root: str, stack: Stack) -> None:
    p = run(pkg_root, stack, ["no-such-command-xyz"])
    assert p.returncode == 127
    assert "exec no-such-command-xyz" in p.stderr


def test_symlinked_workspace_refused_before_exec(pkg_root: str, stack: Stack) -> None:
    link = os.path.join(stack.base, "ws-link")
    os.symlink(stack.workspace, link)
    spec = dataclasses.replace(stack.spec, workspace=link)
    marker = os.path.join(stack.workspace, "ran")
    p = run(pkg_root, stack, ["/bin/sh", "-c", f"touch {marker}"], spec=spec)
    assert p.returncode == 4
    assert "SANDBOX_LAYOUT_INVALID" in p.stderr and "REFUSED before exec" in p.stderr
    assert not os.path.exists(marker)


@pytest.mark.skipif(not IS_ROOT, reason="ownership of another uid's workspace needs root to set up")
def test_foreign_workspace_owner_refused(pkg_root: str, stack: Stack) -> None:
    os.chown(stack.workspace, 0, 0)
    p = run(pkg_root, stack, ["/bin/true"])
    assert p.returncode == 4 and "SANDBOX_LAYOUT_INVALID" in p.stderr and "owned by uid 0" in p.stderr


def test_environment_is_the_allow_list(pkg_root: str, stack: Stack) -> None:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "GITHUB_TOKEN": "tok-123", "MY_SECRET_THING": "s-456",
           "RANDOM_VAR": "r"}
    p = run(pkg_root, stack, ["/usr/bin/env"], env=env)
    assert p.returncode == 0, p.stderr
    lines = set(p.stdout.splitlines())
    assert "LANG=C.UTF-8" in lines and "HOME=/home/agent" in lines
    assert f"FARAMESH_AGENT_ID={stack.spec.agent_id}" in lines
    assert "tok-123" not in p.stdout and "s-456" not in p.stdout and "RANDOM_VAR=r" not in lines


def _status_probe() -> list[str]:
    code = ("import os, json; st = dict(l.split(':', 1) for l in open('/proc/self/status'));"
            "ls = lambda: (os.listdir('/'), 0)[1];\n"
            "try:\n    r = ls()\nexcept OSError as e:\n    r = e.errno\n"
            "print(json.dumps({k: st[k].strip() for k in ('NoNewPrivs', 'Seccomp', 'CapEff', 'CapBnd', 'Uid')}"
            " | {'listroot': r, 'pid': os.getpid()}))")
    return [PYTHON, "-c", code]


def test_profile_minimal_has_no_landlock(pkg_root: str) -> None:
    s = make_stack(next_uid() if IS_ROOT else os.getuid(), "minimal")
    try:
        p = run(pkg_root, s, _status_probe())
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2" and int(st["CapBnd"], 16) == 0
        assert st["listroot"] == 0 and st["pid"] == 2  # no Landlock; still PID namespace
        assert "NOT applied: S6 Landlock (profile minimal)" in p.stderr
    finally:
        cleanup(s)


def test_profile_off_says_so_loudly(pkg_root: str) -> None:
    s = make_stack(next_uid() if IS_ROOT else os.getuid(), "off")
    try:
        env = {"PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": "aws-789"}
        p = run(pkg_root, s, [*_status_probe(), "x"], env=env)
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert st["Seccomp"] == "0"
        if IS_ROOT:
            assert st["Uid"].split()[0] == str(s.uid)
        assert "PROFILE OFF: NO OS CONFINEMENT" in p.stderr
        p = run(pkg_root, s, ["/usr/bin/env"], env=env)
        assert "aws-789" not in p.stdout
    finally:
        cleanup(s)


# --- process lifetime ------------------------------------------------------------------------------------

def _wait_for(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_sigterm_to_c2_ends_the_agent(pkg_root: str, stack: Stack) -> None:
    marker = f"faramesh-sigterm-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(launcher_cmd(pkg_root, stack, [PYTHON, "-c", "import time; time.sleep(60)", marker]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    try:
        # The launcher (C1), C2 (same argv) and the agent all carry the marker.
        assert _wait_for(lambda: len(pids_with(marker)) >= 3), "agent never started"
        c2s = children(proc.pid)
        assert len(c2s) == 1
        os.kill(c2s[0], signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert _wait_for(lambda: not pids_with(marker), 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_double_forked_setsid_descendant_dies_with_c2(pkg_root: str, stack: Stack) -> None:
    head, tail = "faramesh-orphan-", f"{os.getpid()}-{time.monotonic_ns()}"
    marker = head + tail  # spelled in two halves in the agent's code: only the sleep's argv holds it whole
    agent = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('{PYTHON}', ['{PYTHON}', '-c', 'import time; time.sleep(120)', '{head}' + '{tail}'])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        f"m = ('{head}' + '{tail}').encode()\n"
        "for _ in range(200):\n"
        "    seen = any(m in open(f'/proc/{p}/cmdline', 'rb').read()\n"
        "               for p in os.listdir('/proc') if p.isdigit() and p != str(os.getpid()))\n"
        "    if seen:\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "print('seen' if seen else 'not seen')\n"
    )
    p = run(pkg_root, stack, [PYTHON, "-c", agent])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "seen"
    assert _wait_for(lambda: not pids_with(marker), 5), "the double-forked sleep survived its sandbox"


def test_unprivileged_launcher(pkg_root: str) -> None:
    uid = next_uid() if IS_ROOT else os.getuid()
    s = make_stack(uid)
    try:
        p = run(pkg_root, s, _status_probe(), unprivileged_uid=uid)
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2" and int(st["CapEff"], 16) == 0
        assert st["listroot"] == errno.EACCES and st["Uid"].split()[0] == "1000"
        assert "R3 uid separation" in p.stderr and "NOT applied: R1 cgroup" in p.stderr
    finally:
        cleanup(s)


def test_python_of_this_test_is_not_confined() -> None:
    with open("/proc/self/status") as f:
        assert "Seccomp:\t0" in f.read()
    assert sys.flags.isolated == 0


PTY_AGENT = r"""
import ctypes, fcntl, json, os, termios
out = {"isatty": os.isatty(0), "rdev": os.fstat(0).st_rdev}
try:
    os.open("/dev/tty", os.O_RDWR)
    out["dev_tty"] = "OPENED"
except OSError as e:
    out["dev_tty"] = e.errno
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"x")
    out["tiocsti"] = "INJECTED"
except OSError as e:
    out["tiocsti"] = e.errno
out["echo"] = input()
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("unprivileged", [False, True])
def test_a_terminal_on_stdin_gets_a_new_pty_and_a_relay(pkg_root: str, stack: Stack, unprivileged: bool) -> None:
    """The agent never holds the operator's terminal: it sees a pty of its own (not the caller's), has no
    controlling terminal, cannot inject keystrokes, and what the operator types still reaches it."""
    if unprivileged and not IS_ROOT:
        pytest.skip("the unprivileged case runs from root via setpriv")
    master, slave = os.openpty()
    operator_tty = os.fstat(slave).st_rdev
    spec_uid = stack.uid
    s = stack
    if unprivileged:
        s = make_stack(65090)
        spec_uid = 65090
    try:
        cmd = launcher_cmd(pkg_root, s, ["/usr/bin/python3", "-c", PTY_AGENT],
                           unprivileged_uid=spec_uid if unprivileged else None)
        if unprivileged:
            os.chown(slave, spec_uid, -1)
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin"})
        os.close(slave)
        os.write(master, b"typed by the operator\n")
        buf = b""
        deadline = time.monotonic() + 30
        while b"RESULT " not in buf or not buf.rstrip().endswith(b"}"):
            assert time.monotonic() < deadline, buf.decode(errors="replace")
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        assert proc.wait(timeout=30) == 0, buf.decode(errors="replace")
    finally:
        os.close(master)
        if unprivileged:
            cleanup(s)
    line = next(ln for ln in buf.decode(errors="replace").splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["isatty"] is True
    assert result["rdev"] != operator_tty, (result, operator_tty)  # a pty of its own, not the caller's
    assert result["dev_tty"] in (errno.ENXIO, errno.ENOENT, errno.EACCES), result  # no controlling terminal
    assert result["tiocsti"] in (errno.EPERM, errno.EIO), result
    assert result["echo"] == "typed by the operator"
