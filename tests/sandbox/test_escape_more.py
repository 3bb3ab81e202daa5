"""Escape tests, second subset of issue 4 §4 (items 1, 4, 6-10, 12-20): probe_escape_more.py runs as the agent
under profile `full` through the real launcher (as root with a dedicated host uid, and unprivileged via
setpriv), in both layouts (workspace nested in the stack dir, and workspace == stack dir).

The probe refuses to attempt anything unless it is confined; a probe that did not report `confined` fails
the test. Every host-side object (credential sentinels, sockets, listeners, sentinel processes, the tmpfs
submount) is made by the test in temp dirs or its own private mount namespace and removed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_sandbox_launch import IS_ROOT, PYTHON, Stack, cleanup, launcher_cmd, make_stack, next_uid

__all__ = ["pkg_root"]
from test_sandbox_launch import pkg_root

PROBE = Path(__file__).with_name("probe_escape_more.py")
SENTINEL = "FARAMESH-ESCAPE-MORE-SENTINEL-7d1e"
CRED_FILES = (".config/gcloud/credentials.db", ".config/gcloud/application_default_credentials.json",
              ".config/gcloud/access_tokens.db", ".kube/config", ".git-credentials")
DENIED = (errno.EPERM,)
ABSENT = (errno.ENOENT, errno.EACCES)
RO = (errno.EROFS, errno.EACCES, errno.ENOENT)


def _host_ext_addr() -> str | None:
    """The host's own non-loopback IPv4 address (from `ip -4 -o addr`; no packet is sent anywhere)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


def _plant_home(base: str, name: str) -> str:
    home = os.path.join(base, "homes", name)
    for rel in CRED_FILES:
        p = os.path.join(home, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(SENTINEL)
        os.chmod(p, 0o644)  # readable by anyone on the host: only the sandbox can hide them
    for d, _dirs, _files in os.walk(os.path.join(base, "homes")):
        os.chmod(d, 0o755)
    return home


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _nothing_waiting(sock: socket.socket) -> bool:
    """True when a listener got no connection / a datagram socket got no datagram."""
    sock.setblocking(False)
    try:
        if sock.type == socket.SOCK_DGRAM:
            sock.recvfrom(64)
        else:
            conn, _ = sock.accept()
            conn.close()
    except BlockingIOError:
        return True
    return False


@dataclass
class HostSide:
    """Everything the test sets up on the host for one probe run (and tears down)."""

    sockets: list[socket.socket] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def listen_unix(self, path: str, *, abstract: bool = False) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(4)
        if not abstract:
            os.chmod(path, 0o666)
            self.paths.append(path)
        self.sockets.append(s)
        return s

    def listen_inet(self, addr: str, kind: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        s.bind((addr, 0))
        if kind == socket.SOCK_STREAM:
            s.listen(4)
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for p in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def host() -> Iterator[HostSide]:
    h = HostSide()
    yield h
    h.close()


def _layout(s: Stack, *, stack_is_workspace: bool) -> tuple[Stack, dict]:
    """The stack as `apply` leaves it: .faramesh/policy.json, a git repo with hooks, a host secret outside."""
    st = s.stack
    policy = os.path.join(st, ".faramesh", "policy.json")
    _write(policy, SENTINEL)
    os.chmod(os.path.dirname(policy), 0o755)  # world-readable on the host: only the sandbox can hide it
    _write(os.path.join(st, ".git", "config"), "[core]\n")
    _write(os.path.join(st, ".git", "hooks", "post-checkout"), "#!/bin/sh\n", 0o755)
    secret = os.path.join(s.base, "host-secret.txt")
    _write(secret, SENTINEL)
    if stack_is_workspace:
        # The agent owns the stack dir, governance.fms and the repo: only the sandbox's mounts protect them.
        if IS_ROOT:
            for d, _dirs, files in os.walk(st):
                if os.path.basename(d) == ".faramesh" or d.startswith(os.path.join(st, ".faramesh")):
                    continue
                os.chown(d, s.uid, s.uid)
                for f in files:
                    os.chown(os.path.join(d, f), s.uid, s.uid)
        spec = dataclasses.replace(s.spec, workspace=st)
        s = Stack(s.base, st, st, s.uid, spec)
    else:
        os.mkdir(os.path.join(st, "ro-sub"), 0o755)
    return s, {"policy": policy, "host_secret": secret}


def _run_main(pkg_root: str, s: Stack, host: HostSide, *, unprivileged: bool, stack_is_workspace: bool) -> tuple[
        dict, dict]:
    s, extra = _layout(s, stack_is_workspace=stack_is_workspace)
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"
    # The engine socket dir, bound read-only at /run/faramesh.
    sockdir = os.path.join(s.base, "agent-sock")
    os.mkdir(sockdir, 0o755)
    engine = host.listen_unix(os.path.join(sockdir, "agent.sock"))
    s = dataclasses.replace(s, spec=dataclasses.replace(s.spec, socket_dir=sockdir))
    # 0666 host sockets the agent must not reach: /tmp, /run, the agent uid's runtime dir, an abstract one.
    runtime_dir = f"/run/user/{s.uid}"
    if IS_ROOT and os.path.isdir("/run/user") and not os.path.exists(runtime_dir):
        os.mkdir(runtime_dir, 0o700)
        os.chown(runtime_dir, s.uid, s.uid)
        host.dirs.append(runtime_dir)
    host_socks = [f"/tmp/faramesh-escape-{tag}.sock"]
    if os.access("/run", os.W_OK):
        host_socks.append(f"/run/faramesh-escape-{tag}.sock")
    if os.access(runtime_dir, os.W_OK):
        host_socks.append(f"{runtime_dir}/faramesh-escape-{tag}.sock")
    unix_listeners = [host.listen_unix(p) for p in host_socks]
    ssh_sock = os.path.join(s.base, "ssh-agent.sock")
    unix_listeners.append(host.listen_unix(ssh_sock))
    host_socks.append(ssh_sock)
    abstract = f"faramesh-escape-{tag}"
    unix_listeners.append(host.listen_unix("\0" + abstract, abstract=True))
    # Network listeners: UDP on the host's loopback, TCP+UDP on its own non-loopback address.
    udp_lo = host.listen_inet("127.0.0.1", socket.SOCK_DGRAM)
    ext = _host_ext_addr()
    inet = [udp_lo]
    cfg_net: dict = {"udp_port": udp_lo.getsockname()[1]}
    if ext:
        tcp_ext = host.listen_inet(ext, socket.SOCK_STREAM)
        udp_ext = host.listen_inet(ext, socket.SOCK_DGRAM)
        inet += [tcp_ext, udp_ext]
        cfg_net |= {"ext_addr": ext, "ext_tcp_port": tcp_ext.getsockname()[1],
                    "ext_udp_port": udp_ext.getsockname()[1]}
    # A sentinel process of the agent's own host uid, outside the sandbox (kill -9 -1 must not reach it).
    prefix = ["setpriv", f"--reuid={s.uid}", f"--regid={s.uid}", "--clear-groups", "--"] if IS_ROOT else []
    sentinel = subprocess.Popen([*prefix, "sleep", "60"], stdin=subprocess.DEVNULL)
    host.procs.append(sentinel)
    # Root-owned files in the workspace: a plain 0644 one, a setuid copy of id, a file-capability copy of cat.
    cfg_root: dict = {}
    if IS_ROOT:
        root_file = os.path.join(s.workspace, "root-file")
        _write(root_file, "root\n")
        suid = os.path.join(s.workspace, "suid-id")
        shutil.copy("/usr/bin/id", suid)
        os.chown(suid, 0, 0)
        os.chmod(suid, 0o4755)
        cfg_root = {"root_file": root_file, "suid_copy": suid}
        if shutil.which("setcap"):
            fcap = os.path.join(s.workspace, "fcap-cat")
            shutil.copy("/bin/cat", fcap)
            os.chmod(fcap, 0o755)
            subprocess.run(["setcap", "cap_dac_override,cap_setuid+ep", fcap], check=True, capture_output=True)
            cfg_root["fcap_copy"] = fcap
    submount = None if stack_is_workspace or not IS_ROOT else os.path.join(s.stack, "ro-sub")
    probe_dir = os.path.join(s.stack, "probe")
    os.makedirs(probe_dir, exist_ok=True)
    for probe in (PROBE, PROBE.with_name("probe_common.py")):
        shutil.copy(probe, os.path.join(probe_dir, probe.name))
        os.chmod(os.path.join(probe_dir, probe.name), 0o644)
    cfg = {
        "mode": "main",
        "host_pidns": os.readlink("/proc/self/ns/pid"),
        "sentinel": SENTINEL,
        "user_home": _plant_home(s.base, "alice"),
        "root_home": _plant_home(s.base, "root"),
        "stack": s.stack,
        "governance": os.path.join(s.stack, "governance.fms"),
        "workspace": s.workspace,
        "host_sockets": host_socks,
        "abstract_name": abstract,
        "engine_socket": "/run/faramesh/agent.sock",
        "sentinel_pid": sentinel.pid,
        "ro_submount": submount,
        **extra, **cfg_net, **cfg_root,
    }
    marker = f"faramesh-probe-more-{tag}"
    env = {"PATH": "/usr/bin:/bin", "HOME": cfg["user_home"], "SSH_AUTH_SOCK": ssh_sock,
           "KUBECONFIG": os.path.join(cfg["user_home"], ".kube/config")}
    argv = [PYTHON, os.path.join(probe_dir, "probe_escape_more.py"), json.dumps(cfg), marker]
    cmd = launcher_cmd(pkg_root, s, argv, unprivileged_uid=s.uid if unprivileged else None)
    if submount:
        # A host tmpfs (mode 0777) under the read-only stack bind, made in a private mount namespace of the
        # launcher only: the host's own mount table is never touched.
        cmd = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
               'mount -t tmpfs -o size=1m,mode=0777 faramesh-test "$0" && exec "$@"', submount, *cmd]
    # The launcher gets a pty of ours as controlling terminal: the agent must neither own it nor inject into it.
    master, slave = os.openpty()

    def ctty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        p = subprocess.run(cmd, stdin=slave, capture_output=True, text=True, env=env, timeout=60,
                           start_new_session=True, preexec_fn=ctty)
        os.set_blocking(master, False)
        try:
            injected = os.read(master, 4096)
        except (BlockingIOError, OSError):
            injected = b""
    finally:
        os.close(slave)
        os.close(master)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"probe printed nothing; rc {p.returncode}; launcher stderr: {p.stderr}"
    res = json.loads(lines[-1])
    time.sleep(0.2)
    hostres = {
        "launcher_rc": p.returncode,
        "stderr": p.stderr,
        "injected": injected,
        "sentinel alive": sentinel.poll() is None,
        "engine got": _accept_one(engine),
        "unix listeners idle": [_nothing_waiting(x) for x in unix_listeners],
        "inet listeners idle": [_nothing_waiting(x) for x in inet],
        "ext": ext,
        "stack": s,
        "submount": submount,
        **extra,
    }
    return res, hostres


def _accept_one(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    try:
        conn, _ = sock.accept()
    except OSError:
        return b""
    with conn:
        conn.settimeout(2)
        try:
            return conn.recv(100)
        except OSError:
            return b""


def _check_main(res: dict, h: dict, *, root_path: bool, stack_is_workspace: bool) -> None:
    assert res["confined"] is True, f"probe not confined, nothing was tested: {res}"
    assert all(res["checks"].values()), res["checks"]
    a = res["attempts"]
    s: Stack = h["stack"]
    # (1) credential files of the user's and root's homes (planted in temp homes) and the real /root.
    for key, value in a.items():
        if key.startswith(("read ", "list ")) and "via" not in key and "policy" not in key:
            assert value in ABSENT, (key, value)
    # (4) process_vm_readv/writev, even on ourselves (always allowed by the kernel): the filter refuses.
    for key in ("process_vm_readv self", "process_vm_readv pid 1", "process_vm_readv parent",
                "process_vm_writev self"):
        assert a[key] == errno.EPERM, (key, a[key])
    # (6) links from the workspace to protected files.
    for name in ("policy.json", "host file", "shadow"):
        assert a[f"symlink {name}"] == 0  # making a symlink is fine; reading through it is not
        assert a[f"read via symlink {name}"] in ABSENT, (name, a[f"read via symlink {name}"])
        assert a[f"hardlink {name}"] in (errno.ENOENT, errno.EACCES, errno.EXDEV, errno.EPERM), name
    assert a["hardlink governance.fms"] in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS)
    # (7) the mount family, old and new API.
    for key in ("umount2 /usr", "umount2 stack", "mount --bind / ws", "mount remount rw /usr", "pivot_root",
                "fsopen tmpfs", "fspick /usr", "fsconfig bad fd", "fsmount bad fd", "open_tree clone /usr",
                "move_mount", "mount_setattr clear ro /usr"):
        assert a[key] == errno.EPERM, (key, a[key])
    if h["submount"]:
        assert a["submount is a mount"] is True
        assert a["write ro submount"] == errno.EROFS
    # (8) clone with namespace flags; the unshare binary.
    for key in ("clone newuser", "clone newns", "clone newpid", "clone newnet", "clone newuser|1<<32"):
        assert a[key] == errno.EPERM, (key, a[key])
    for key in ("unshare -Ur true", "unshare -m true", "unshare -n true"):
        assert a[key][0] != 0 and a[key][1] is True, (key, a[key])
    # (9) setuid / file-capability copies run with the agent's ids and no capability; no sudo.
    assert a["euid after"] == 1000
    if IS_ROOT:  # the copies are made root-owned by the test
        assert a["suid_copy mode"] == 0o4755
        assert a["suid_copy rc"] == 0 and a["suid_copy out"].startswith("uid=1000"), a["suid_copy out"]
        assert "euid=" not in a["suid_copy out"]
        if "fcap_copy rc" in a:
            assert a["fcap_copy rc"] == 0
            out = dict(line.split(":", 1) for line in a["fcap_copy out"])
            assert int(out["CapEff"], 16) == 0 and int(out["CapPrm"], 16) == 0
            assert out["Uid"].split() == ["1000"] * 4
    assert a["sudo"] in (errno.ENOENT, errno.EACCES) or (a["sudo"][0] == "rc" and a["sudo"][1] != 0), a["sudo"]
    # (10) a root-owned 0644 file in the workspace.
    if IS_ROOT:
        assert a["root file append"] == errno.EACCES
        assert a["root file truncate"] == errno.EACCES
        assert a["root file chmod"] == errno.EPERM and a["root file chown"] == errno.EPERM
        with open(os.path.join(s.workspace, "root-file")) as f:
            assert f.read() == "root\n"
    # (12) kernel-facing calls.
    for key in ("bpf map_create NULL", "perf_event_open NULL", "userfaultfd bad flags", "keyctl get session keyring",
                "add_key bogus type", "request_key bogus type", "kexec_load EINVAL args", "kexec_file_load bad fds",
                "init_module junk", "finit_module bad fd", "delete_module missing", "open_by_handle_at NULL",
                "personality READ_IMPLIES_EXEC", "personality READ_IMPLIES_EXEC|1<<32",
                "personality ADDR_NO_RANDOMIZE"):
        assert a[key] == errno.EPERM, (key, a[key])
    assert a["personality query"] == 0
    # (13) TIOCSTI/TIOCLINUX (also with high bits), and no controlling tty of the caller.
    assert a["open /dev/tty"] == errno.ENXIO
    assert a["stdin isatty"] is True  # fd 0 *is* the caller's pty: the filter is what stops injection
    for key in ("TIOCSTI stdin", "TIOCSTI|1<<32 stdin", "TIOCLINUX stdin", "TIOCSTI own pty",
                "TIOCSTI|1<<32 own pty"):
        assert a[key] == errno.EPERM, (key, a[key])
    assert b"x" not in h["injected"]
    # (14) kill -9 -1 and a host pid from inside: the sentinel outside (same host uid) survives.
    assert a["kill sentinel host pid"] == errno.ESRCH
    assert a["kill -9 1"] == 0  # sent, and ignored: the sandbox's init ignores SIGKILL from inside
    assert a["kill -9 -1"] == 0 and a["own child killed"] is True
    assert h["sentinel alive"] is True
    assert h["launcher_rc"] == 0, h["stderr"]
    # (15) direct network.
    assert a["udp sendto host 127.0.0.1"] in (0, errno.ECONNREFUSED)  # delivered to the sandbox's own lo
    if h["ext"]:
        assert a["tcp connect host ext addr"] == errno.ENETUNREACH
        assert a["udp sendto host ext addr"] == errno.ENETUNREACH
    assert all(h["inet listeners idle"]), h["inet listeners idle"]
    # (16) socket families, also with bit 32 set.
    for key, value in a.items():
        if key.startswith(("socket ", "socketpair ")):
            assert value in (errno.EAFNOSUPPORT, errno.EPERM), (key, value)
    # (17) host unix sockets absent (and the abstract one unreachable); the engine socket reachable.
    for path in res_paths(a):
        assert a[path] in (errno.ENOENT, errno.EACCES), (path, a[path])
    assert a["connect abstract host socket"] == errno.ECONNREFUSED
    assert a["SSH_AUTH_SOCK in env"] is False
    assert all(h["unix listeners idle"]), h["unix listeners idle"]
    assert a["connect engine socket"] == 0
    assert h["engine got"] == b"hello from the sandbox\n"
    # (18) devices.
    for key, value in a.items():
        if key.startswith("open /dev/") and key != "open /dev/tty":
            assert value in (errno.ENOENT, errno.EPERM, errno.EACCES), (key, value)
    assert a["mknod /tmp/mem"] == errno.EPERM and a["mknod ws/sda"] == errno.EPERM
    # (20) writes outside the workspace and /tmp.
    for key in ("write /etc", "write /etc/passwd", "write /usr/bin", "write /usr/bin/python3",
                "write governance.fms", "write .faramesh/", "write .faramesh/policy.json", "write .git/hooks/",
                "write .git/hooks/existing", "write .git/config"):
        assert a[key] in RO, (key, a[key])
    for name in ("governance.fms", ".git/hooks/post-checkout", ".git/config"):
        assert a[f"rename over {name}"] in (errno.EBUSY, errno.EROFS, errno.EACCES, errno.EXDEV), name
        assert a[f"unlink {name}"] in (errno.EBUSY, errno.EROFS, errno.EACCES), name
    for key in ("rename .git/hooks away", "rename .git away", "rename .faramesh away"):
        assert a[key] in (errno.EBUSY, errno.EROFS, errno.EACCES, errno.EXDEV), (key, a[key])
    assert a["list .faramesh"] in (errno.EACCES, errno.ENOENT)
    assert a["read policy.json"] in ABSENT
    assert a["write workspace"] == 0 and a["write /tmp"] == 0
    assert a["python stdlib imports"] == 0
    # Host side: nothing changed outside the workspace.
    with open(os.path.join(s.stack, "governance.fms")) as f:
        assert f.read() == "rules\n"
    with open(h["policy"]) as f:
        assert f.read() == SENTINEL
    assert sorted(os.listdir(os.path.join(s.stack, ".faramesh"))) == ["policy.json"]
    assert sorted(os.listdir(os.path.join(s.stack, ".git", "hooks"))) == ["post-checkout"]
    with open(os.path.join(s.stack, ".git", "config")) as f:
        assert f.read() == "[core]\n"
    assert not os.path.exists("/etc/faramesh-escape") and not os.path.exists("/usr/bin/faramesh-escape")
    assert os.path.exists(os.path.join(s.workspace, "probe-more-was-here"))
    if stack_is_workspace:  # the stack's config files are mount points over the writable workspace
        for key in ("rename over governance.fms", "unlink governance.fms", "rename .git away",
                    "rename .faramesh away"):
            assert a[key] == errno.EBUSY, (key, a[key])
        assert a["write governance.fms"] == errno.EROFS and a["write .git/hooks/existing"] == errno.EROFS
    _ = root_path


def res_paths(a: dict) -> list[str]:
    return [k for k in a if k.startswith("connect /")]


MODES = [pytest.param(False, id="root-path", marks=pytest.mark.skipif(not IS_ROOT, reason="needs root")),
         pytest.param(True, id="unprivileged")]


@pytest.mark.parametrize("stack_is_workspace", [False, True], ids=["nested-workspace", "stack-is-workspace"])
@pytest.mark.parametrize("unprivileged", MODES)
def test_escape_more(pkg_root: str, host: HostSide, unprivileged: bool, stack_is_workspace: bool) -> None:
    s = make_stack(next_uid() if IS_ROOT else os.getuid())
    try:
        res, h = _run_main(pkg_root, s, host, unprivileged=unprivileged, stack_is_workspace=stack_is_workspace)
        _check_main(res, h, root_path=not unprivileged, stack_is_workspace=stack_is_workspace)
    finally:
        cleanup(s)


# --- (19) resource exhaustion ----------------------------------------------------------------------------

def _host_fork_ms() -> float:
    t0 = time.monotonic()
    subprocess.run(["/bin/true"], check=True)
    return (time.monotonic() - t0) * 1000


@pytest.mark.parametrize("unprivileged", MODES)
def test_resource_exhaustion_is_contained(pkg_root: str, unprivileged: bool) -> None:
    if not IS_ROOT:
        pytest.skip("RLIMIT_NPROC counts every process of the invoking uid: needs a dedicated uid (root)")
    uid = next_uid()
    limits = (("CORE", 0, 0), ("NPROC", 64, 64), ("AS", 1 << 30, 1 << 30), ("NOFILE", 256, 256))
    kw: dict = {"rlimits": limits}
    if not unprivileged:
        kw |= {"cgroup_pids_max": 40, "cgroup_memory_max": 256 << 20}
    s = make_stack(uid, **kw)
    try:
        probe = os.path.join(s.stack, "probe_escape_more.py")
        for source in (PROBE, PROBE.with_name("probe_common.py")):
            shutil.copy(source, os.path.join(s.stack, source.name))
            os.chmod(os.path.join(s.stack, source.name), 0o644)
        cfg = {"mode": "limits", "host_pidns": os.readlink("/proc/self/ns/pid")}
        cmd = launcher_cmd(pkg_root, s, [PYTHON, probe, json.dumps(cfg), "m"],
                           unprivileged_uid=uid if unprivileged else None)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/bin:/bin"}, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            res = json.loads(line)
            assert res["confined"] is True, res
            # The bomb's children are alive now: the host still forks and execs quickly.
            times = [_host_fork_ms() for _ in range(3)]
            proc.stdin.close()
            rc = proc.wait(timeout=30)
            report = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        a = res["attempts"]
        assert rc == 0, report
        assert max(times) < 1000, times
        assert a["fork bomb"] == errno.EAGAIN and 0 < a["forked"] < 64, a
        assert a["open 100k"] == errno.EMFILE and a["files opened"] < 256
        assert a["raise NOFILE hard"] == 1
        hog = a["memory hog"]
        assert hog["exit"] == 42 or hog["signal"] == signal.SIGKILL, hog  # MemoryError (AS) or the memcg OOM
        if not unprivileged and "R1 cgroup pids: joined" in report:
            assert a["forked"] < 40
    finally:
        cleanup(s)


def test_probe_more_refuses_outside_a_sandbox(tmp_path: Path) -> None:
    """The safety interlock: run unconfined, the probe attempts nothing and exits 3."""
    cfg = {"host_pidns": os.readlink("/proc/self/ns/pid"), "mode": "main"}
    p = subprocess.run([PYTHON, str(PROBE), json.dumps(cfg), "m"], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert p.returncode == 3
    out = json.loads(p.stdout)
    assert out["confined"] is False and "attempts" not in out


def test_probe_more_is_stdlib_only() -> None:
    head = PROBE.read_text().split('"""', 2)[2].split("def ")[0]
    assert "faramesh" not in head.replace("probe_escape_more", "")
