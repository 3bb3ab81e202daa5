"""mounts: in a forked, unprivileged child with its own namespaces, build the root, pivot, and look around.

Then the whole confinement in DESIGN.md §5 order (S5 mounts → S6 Landlock → S7 caps/no_new_privs →
S8 seccomp → S9 environment → exec) — proving the modules compose and everyday programs still run.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from faramesh.sandbox import caps, credentials, landlock, mounts, namespaces, seccomp
from faramesh.sandbox.errors import MountError
from faramesh.sandbox.spec import SandboxSpec
from sandbox_helpers import (
    AGENT_GID,
    AGENT_UID,
    IS_ROOT,
    chown_agent,
    enter_sandbox_namespaces,
    forked,
    in_pid1,
    put,
    slurp,
    touch_new,
    world_dir,
)

__all__ = ["world_dir"]  # the fixture, re-exported for pytest

SENTINEL = "FARAMESH-SENTINEL-7f3a"
FULL_BPF = seccomp.build_filter("full")


@dataclass
class Stack:
    base: str
    stack: str
    workspace: str
    sockets: str
    protected: str
    host_secret: str
    host_home: str
    submount: str
    spec: SandboxSpec


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


@pytest.fixture
def stack(world_dir: str) -> Stack:
    base = world_dir
    st = os.path.join(base, "stack")
    os.mkdir(st, 0o755)
    _write(os.path.join(st, "governance.fms"), "agent rules\n")
    os.mkdir(os.path.join(st, ".faramesh"), 0o755)  # world-readable on purpose: hiding must not rely on DAC
    _write(os.path.join(st, ".faramesh", "policy.json"), SENTINEL)
    os.mkdir(os.path.join(st, "sub"), 0o755)
    ws = os.path.join(st, "workspace")
    os.mkdir(ws, 0o755)
    chown_agent(ws)
    protected = os.path.join(ws, "protected.txt")
    _write(protected, "keep me\n")
    chown_agent(protected)  # owned by the agent: only the read-only bind stops writes
    sockets = os.path.join(base, "run", "agents", "h1")
    os.makedirs(sockets, 0o755)
    _write(os.path.join(sockets, "agent.sock"), "")
    host_secret = os.path.join(base, "host-secret.txt")
    _write(host_secret, SENTINEL)
    host_home = os.path.join(base, "home", "alice")
    for rel in (".aws/credentials", ".ssh/id_ed25519", ".netrc", ".docker/config.json"):
        p = os.path.join(host_home, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        _write(p, SENTINEL)
    for dirpath, _dirs, _files in os.walk(os.path.join(base, "home")):
        os.chmod(dirpath, 0o755)
    spec = SandboxSpec(
        profile="full",
        agent_id="test-agent",
        host_uid=AGENT_UID if IS_ROOT else 65000,
        host_gid=AGENT_GID if IS_ROOT else 65000,
        workspace=ws,
        stack_dir=st,
        read_only_paths=(protected,),
        hidden_paths=(os.path.join(st, ".faramesh"),),
        seccomp_bpf=FULL_BPF,
        socket_dir=sockets,
    )
    return Stack(base, st, ws, sockets, protected, host_secret, host_home, os.path.join(st, "sub"), spec)


def _errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno or -1


def _in_sandbox(s: Stack, inside: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """C1 (forked): as root, first put a tmpfs submount under the stack dir in a private mount namespace
    (to check read-only reaches submounts); then R3, S1–S3, fork C2 = PID 1, build_root, run `inside`."""

    def c1() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if IS_ROOT:
            namespaces.unshare(namespaces.CLONE_NEWNS)
            mounts.make_rprivate("/")
            mounts.mount("tmpfs", s.submount, "tmpfs", 0, "mode=777,size=1m")
            out["submount_made"] = True
        enter_sandbox_namespaces()

        def c2() -> dict[str, Any]:
            mounts.build_root(s.spec)
            namespaces.sethostname(s.spec.hostname)
            res = {"built": True, "cwd": os.getcwd()}
            res.update(inside())
            return res

        out.update(in_pid1(c2))
        return out

    return forked(c1, timeout=60).data


def _read8(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 8)
    finally:
        os.close(fd)


def _listing(path: str) -> list[str] | int:
    try:
        return os.listdir(path)
    except OSError as e:
        return e.errno or -1


def _look_around(s: Stack) -> dict[str, Any]:
    def read(p: str) -> Callable[[], object]:
        return lambda: slurp(p)

    def create(p: str) -> Callable[[], object]:
        return lambda: touch_new(p)

    out: dict[str, Any] = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "shadow": _errno_of(read("/etc/shadow")),
        "ssh_host_keys": _errno_of(lambda: os.listdir("/etc/ssh")),
        "passwd": slurp("/etc/passwd"),
        "hosts": _errno_of(read("/etc/hosts")),
        "ws_write": _errno_of(lambda: put(os.path.join(s.workspace, "out.txt"), "hi")),
        "ws_mkdir": _errno_of(lambda: os.mkdir(os.path.join(s.workspace, "d"))),
        "usr_create": _errno_of(create("/usr/bin/evil")),
        "usr_mkdir": _errno_of(lambda: os.mkdir("/usr/evil")),
        "root_create": _errno_of(create("/evil")),
        "etc_create": _errno_of(create("/etc/evil")),
        "stack_create": _errno_of(create(os.path.join(s.stack, "evil"))),
        "stack_read": _errno_of(read(os.path.join(s.stack, "governance.fms"))),
        "governance_append": _errno_of(lambda: put(os.path.join(s.stack, "governance.fms"), "x", "a")),
        "protected_append": _errno_of(lambda: put(s.protected, "x", "a")),
        "protected_read": _errno_of(read(s.protected)),
        "submount_create": _errno_of(create(os.path.join(s.submount, "x"))),
        "hidden_list": _listing(os.path.join(s.stack, ".faramesh")),
        "hidden_read": _errno_of(read(os.path.join(s.stack, ".faramesh", "policy.json"))),
        "host_secret": _errno_of(read(s.host_secret)),
        "host_home_aws": _errno_of(read(os.path.join(s.host_home, ".aws", "credentials"))),
        "root_home": _errno_of(lambda: os.listdir("/root")),
        "tmp_listing": sorted(os.listdir("/tmp")),
        "tmp_write": _errno_of(lambda: put("/tmp/scratch", "x")),
        "home_write": _errno_of(lambda: put(os.path.join(s.spec.home, "f"), "x")),
        "sockets": sorted(os.listdir(mounts.SOCKET_MOUNTPOINT)),
        "sockets_create": _errno_of(create(os.path.join(mounts.SOCKET_MOUNTPOINT, "evil"))),
        "dev": sorted(os.listdir("/dev")),
        "dev_null_write": _errno_of(lambda: put("/dev/null", "x")),
        "dev_urandom": len(_read8("/dev/urandom")),
        "dev_mem": _errno_of(lambda: os.close(os.open("/dev/mem", os.O_RDONLY))),
        "dev_kmsg": _errno_of(lambda: os.close(os.open("/dev/kmsg", os.O_RDONLY))),
        "proc_1_is_self": os.readlink("/proc/self") == "1",
        "proc_pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
        "proc_sys_write": _errno_of(lambda: put("/proc/sys/kernel/hostname", "x")),
        "hostname": slurp("/etc/hostname").strip(),
    }
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    out["mountinfo_mentions_host_secret"] = s.host_secret in mountinfo
    out["old_root_gone"] = not any(line.split()[4] == "/" and "ext4" in line.split(" - ")[1][:5]
                                   for line in mountinfo.splitlines())
    return out


def test_build_root_layout(stack: Stack) -> None:
    res = _in_sandbox(stack, lambda: _look_around(stack))
    if IS_ROOT:
        assert res["submount_made"] is True
    assert res["c2_exit"] == 0 and res["built"] is True
    assert res["cwd"] == stack.workspace
    assert res["pid"] == 1 and res["uid"] == 1000
    # /etc is an allow-list: no shadow, no ssh host keys, a synthesized passwd.
    assert res["shadow"] == errno.ENOENT
    assert res["ssh_host_keys"] == errno.ENOENT
    assert "agent:x:1000:1000" in res["passwd"] and "alice" not in res["passwd"]
    assert res["hosts"] == 0
    # Workspace read-write; everything system read-only (EROFS: the mount, not DAC, says no).
    assert res["ws_write"] == 0 and res["ws_mkdir"] == 0
    for key in ("usr_create", "usr_mkdir", "root_create", "etc_create", "stack_create", "protected_append",
                "sockets_create"):
        assert res[key] == errno.EROFS, key
    assert res["governance_append"] in (errno.EROFS, errno.EACCES)
    assert res["stack_read"] == 0 and res["protected_read"] == 0
    if IS_ROOT:  # the tmpfs submount made on the host side is read-only inside too (AT_RECURSIVE)
        assert res["submount_create"] == errno.EROFS
    # Hidden and host paths. (C2 still holds its namespace's capabilities here, so the mode-000 mask
    # lists as empty; the agent, without them, gets EACCES — see the launch-order test.)
    assert res["hidden_list"] in ([], errno.EACCES)
    assert res["hidden_read"] in (errno.ENOENT, errno.EACCES)
    assert res["host_secret"] == errno.ENOENT
    assert res["host_home_aws"] == errno.ENOENT
    assert res["root_home"] == errno.ENOENT
    assert res["mountinfo_mentions_host_secret"] is False
    assert res["old_root_gone"] is True
    # Private scratch space.
    assert res["tmp_write"] == 0 and res["home_write"] == 0
    # The sandbox's /tmp is its own: only the mountpoint parents of the stack's binds exist there.
    assert res["tmp_listing"] == [os.path.basename(stack.base)]
    assert res["sockets"] == ["agent.sock"]
    # A minimal /dev.
    assert set(res["dev"]) == {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd",
                               "stdin", "stdout", "stderr"}
    assert res["dev_null_write"] == 0 and res["dev_urandom"] == 8
    assert res["dev_mem"] == errno.ENOENT and res["dev_kmsg"] == errno.ENOENT
    # A fresh /proc for the new PID namespace.
    assert res["proc_1_is_self"] is True
    assert res["proc_pids"] == ["1"]
    assert res["proc_sys_write"] in (errno.EROFS, errno.EACCES)
    assert res["hostname"] == "faramesh"
    # On the host: the workspace write landed, owned by the agent's host uid; nothing else changed.
    out = os.path.join(stack.workspace, "out.txt")
    assert slurp(out) == "hi"
    assert os.stat(out).st_uid == AGENT_UID
    assert not os.path.exists(os.path.join(stack.stack, "evil"))
    assert slurp(os.path.join(stack.stack, ".faramesh", "policy.json")) == SENTINEL


def test_full_confinement_in_launch_order(stack: Stack) -> None:
    host_env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "AWS_SECRET_ACCESS_KEY": SENTINEL,
        "GITHUB_TOKEN": SENTINEL,
        "FARAMESH_API_KEY": SENTINEL,
        "HOME": stack.host_home,
    }

    def inside() -> dict[str, Any]:
        spec = stack.spec
        # S6: Landlock on the final tree.
        landlock.restrict(
            read_only=[spec.stack_dir, mounts.SOCKET_MOUNTPOINT, "/proc"],
            read_exec=["/usr", "/bin", "/lib", "/lib64", "/etc"],
            read_write=[spec.workspace, "/tmp", "/var/tmp", spec.home, "/dev"],
            missing_ok=True,
        )
        # S7: capabilities, no_new_privs, dumpable.
        caps.drop_all()
        caps.set_no_new_privs()
        caps.set_dumpable(False)
        # S8: seccomp.
        seccomp.load_filter(spec.seccomp_bpf)
        # S9: environment.
        env = credentials.agent_environment(host_env, home=spec.home, extra={"FARAMESH_AGENT_ID": spec.agent_id})
        probe = (
            "import json, os, ssl, sqlite3, urllib.request, ctypes\n"
            "st = {k: v.strip() for k, v in (l.split(':', 1) for l in open('/proc/self/status'))}\n"
            "with open('written-by-agent.txt', 'w') as f:\n"
            "    f.write('ok')\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "rc = libc.unshare(0x10000000)\n"
            "e = ctypes.get_errno()\n"
            "try:\n"
            "    open('/proc/1/environ').close(); env1 = 'readable'\n"
            "except OSError as x:\n"
            "    env1 = x.errno\n"
            f"stack_read = os.stat({os.path.join(spec.stack_dir, 'governance.fms')!r}).st_size\n"
            f"stack_open = os.open({os.path.join(spec.stack_dir, 'governance.fms')!r}, os.O_RDONLY)\n"
            "try:\n"
            f"    hidden = os.listdir({os.path.join(spec.stack_dir, '.faramesh')!r})\n"
            "except OSError as x:\n"
            "    hidden = x.errno\n"
            "print(json.dumps({'caps': [st[k] for k in ('CapInh','CapPrm','CapEff','CapBnd','CapAmb')],"
            " 'nnp': st['NoNewPrivs'], 'seccomp': st['Seccomp'], 'unshare': [rc, e], 'env': dict(os.environ),"
            " 'proc1_environ': env1, 'stack_read': stack_read, 'cwd': os.getcwd(), 'hidden': hidden}))\n"
        )
        proc = subprocess.run(["/usr/bin/python3", "-c", probe], env=env, capture_output=True, text=True, timeout=30)
        import json

        return {"rc": proc.returncode, "stderr": proc.stderr[-2000:],
                "probe": json.loads(proc.stdout) if proc.returncode == 0 else None}

    res = _in_sandbox(stack, inside)
    assert res["c2_exit"] == 0 and res["built"] is True
    assert res["rc"] == 0, res["stderr"]
    probe = res["probe"]
    assert probe["caps"] == ["0000000000000000"] * 5
    assert probe["nnp"] == "1" and probe["seccomp"] == "2"
    assert probe["unshare"] == [-1, errno.EPERM]
    assert probe["cwd"] == stack.workspace
    assert probe["stack_read"] > 0
    assert probe["hidden"] == errno.EACCES
    assert probe["proc1_environ"] == errno.EACCES or SENTINEL not in str(probe["proc1_environ"])
    env = probe["env"]
    assert SENTINEL not in repr(env)
    assert env["HOME"] == stack.spec.home and env["NO_PROXY"] == ""
    assert env["FARAMESH_AGENT_ID"] == "test-agent"
    assert slurp(os.path.join(stack.workspace, "written-by-agent.txt")) == "ok"


def test_symlinked_workspace_is_refused(stack: Stack) -> None:
    link = os.path.join(stack.base, "ws-link")
    os.symlink(stack.workspace, link)
    bad = dataclasses.replace(stack.spec, workspace=link)

    def c1() -> dict[str, Any]:
        enter_sandbox_namespaces()

        def c2() -> dict[str, Any]:
            try:
                mounts.build_root(bad)
            except MountError as e:
                return {"code": e.code, "errno": e.errno}
            return {"code": None}

        return in_pid1(c2)

    res = forked(c1).data
    assert res["code"] == "SANDBOX_MOUNT_FAILED" and res["errno"] in (errno.ELOOP, errno.ENOTDIR)


@pytest.mark.skipif(not IS_ROOT, reason="the fallback test binds as host root in a private mount namespace")
def test_remount_fallback_makes_submounts_read_only(world_dir: str) -> None:
    """The path for kernels without mount_setattr: one MS_REMOUNT|MS_BIND|MS_RDONLY per submount."""
    top = os.path.join(world_dir, "top")
    os.makedirs(os.path.join(top, "inner"))

    def child() -> dict[str, Any]:
        namespaces.unshare(namespaces.CLONE_NEWNS)
        mounts.make_rprivate("/")
        mounts.mount("tmpfs", top, "tmpfs", mounts.MS_NOSUID, "size=1m")
        os.mkdir(os.path.join(top, "inner"))
        mounts.mount("tmpfs", os.path.join(top, "inner"), "tmpfs", mounts.MS_NODEV, "size=1m")
        listed = mounts.submounts(top)
        mounts.remount_fallback(top, mounts.MOUNT_ATTR_RDONLY)
        return {
            "listed": listed,
            "top": _errno_of(lambda: put(os.path.join(top, "x"), "")),
            "inner": _errno_of(lambda: put(os.path.join(top, "inner", "x"), "")),
            "inner_nodev_kept": bool(os.statvfs(os.path.join(top, "inner")).f_flag & os.ST_NODEV),
        }

    res = forked(child).data
    assert res["listed"] == [top, os.path.join(top, "inner")]
    assert res["top"] == errno.EROFS and res["inner"] == errno.EROFS
    assert res["inner_nodev_kept"] is True


def test_workspace_is_the_stack_dir(stack: Stack) -> None:
    """DESIGN.md §2: the workspace may be the stack dir itself; governance.fms and .faramesh/ stay out of
    reach (read-only bind over the file, mask over the directory) while the rest is writable."""
    chown_agent(stack.stack)
    governance = os.path.join(stack.stack, "governance.fms")
    chown_agent(governance)  # even the owner cannot write it: the bind is read-only
    spec = dataclasses.replace(stack.spec, workspace=stack.stack, read_only_paths=(governance,))

    def c1() -> dict[str, Any]:
        enter_sandbox_namespaces()

        def c2() -> dict[str, Any]:
            mounts.build_root(spec)
            return {
                "new_file": _errno_of(lambda: put(os.path.join(spec.workspace, "notes.txt"), "x")),
                "governance_append": _errno_of(lambda: put(governance, "x", "a")),
                "governance_replace": _errno_of(lambda: os.rename(os.path.join(spec.workspace, "notes.txt"),
                                                                  governance)),
                "hidden": _listing(os.path.join(spec.workspace, ".faramesh")),
                "hidden_remove": _errno_of(lambda: os.rmdir(os.path.join(spec.workspace, ".faramesh"))),
            }

        return in_pid1(c2)

    res = forked(c1).data
    assert res["c2_exit"] == 0
    assert res["new_file"] == 0
    assert res["governance_append"] == errno.EROFS
    assert res["governance_replace"] in (errno.EBUSY, errno.EROFS)
    assert res["hidden"] == []
    assert res["hidden_remove"] in (errno.EBUSY, errno.EROFS)
    assert slurp(governance) == "agent rules\n"
    assert slurp(os.path.join(stack.stack, ".faramesh", "policy.json")) == SENTINEL
