"""Preflight: can this host deliver a profile? (`faramesh preflight [--profile P] [--format json]`)

Every kernel experiment runs in a forked child that reports through a pipe and exits; the calling
process is never confined or changed. As root the children first drop to `nobody` (they only probe),
because the launch path creates its namespaces as the agent's uid, never as root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from faramesh.sandbox import _libc, cgroups, landlock, mounts, namespaces
from faramesh.sandbox.errors import SandboxError

PROBE_UID = 65534
PROBE_TIMEOUT = 10.0


@dataclass
class Report:
    profile: str
    is_root: bool
    landlock_abi: int
    user_namespaces: bool
    user_namespaces_detail: str
    seccomp: bool
    seccomp_detail: str
    seccomp_filter_loads: bool
    seccomp_filter_detail: str
    cgroup_version: str
    cgroup_delegated: bool
    io_uring_disabled: int | None
    legacy_tiocsti: int | None
    protected_symlinks: int | None
    fresh_proc: bool
    fresh_proc_detail: str
    mount_setattr: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def can_deliver(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["can_deliver"] = self.can_deliver
        return d


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run_in_child(fn: Callable[[], str], timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Run `fn` in a forked child; (True, its result) if it returned, (False, why) otherwise.

    The child never returns into the caller's code: it writes one line to the pipe and os._exit()s.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(r)
            msg = "ok " + fn()
            status = 0
        except SandboxError as e:
            msg = f"err {e.code}: {e}"
        except BaseException as e:
            msg = f"err {type(e).__name__}: {e}"
        try:
            os.write(w, msg.replace("\n", " ").encode()[:4000])
        finally:
            os._exit(status)
    os.close(w)
    deadline = time.monotonic() + timeout
    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                chunks.append(b"err timeout")
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            data = os.read(r, 4096)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    if out.startswith("ok "):
        return True, out[3:]
    return False, out[4:] if out.startswith("err ") else (out or "child died without a report")


def _drop_if_root() -> tuple[int, int]:
    if os.geteuid() == 0:
        namespaces.switch_ids(PROBE_UID, PROBE_UID)
    return os.geteuid(), os.getegid()


def _probe_userns() -> str:
    uid, gid = _drop_if_root()
    namespaces.unshare(namespaces.CLONE_NEWUSER)
    namespaces.write_id_maps(1000, uid, 1000, gid)
    return f"unprivileged user namespace created (uid {uid} mapped to 1000)"


def _probe_fresh_proc() -> str:
    uid, gid = _drop_if_root()
    namespaces.unshare(namespaces.CLONE_NEWUSER | namespaces.CLONE_NEWNS | namespaces.CLONE_NEWPID)
    namespaces.write_id_maps(1000, uid, 1000, gid)

    def in_pid_ns() -> str:
        if os.getpid() != 1:
            return "not pid 1"
        mounts.make_rprivate("/")
        mounts.mount("tmpfs", "/tmp", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "size=1m")
        os.mkdir("/tmp/proc")
        mounts.mount("proc", "/tmp/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
        with open("/tmp/proc/1/status", encoding="ascii") as f:
            ok = any(line.startswith("Pid:\t1") for line in f)
        return "fresh /proc mounted in a new pid+mount namespace" if ok else "proc shows the wrong pid namespace"

    ok, detail = run_in_child(in_pid_ns)
    if not ok:
        raise SandboxError(detail)
    return detail


def _probe_seccomp_filter(profile: str) -> str:
    from faramesh.sandbox import caps, seccomp

    bpf = seccomp.build_filter(profile)

    def load_and_try() -> str:
        caps.set_no_new_privs()
        seccomp.load_filter(bpf)
        if _libc.raw_syscall("unshare", namespaces.CLONE_NEWUSER) != -1 or ctypes.get_errno() != errno.EPERM:
            return "FAIL: unshare was not denied"
        return f"{profile} filter ({len(bpf) // 8} instructions) loads and denies unshare"

    ok, detail = run_in_child(load_and_try)
    if not ok or detail.startswith("FAIL"):
        raise SandboxError(detail)
    return detail


def _cgroup_delegated(version: str) -> bool:
    root = cgroups.CGROUP_ROOT
    if version == "v2":
        if os.access(root, os.W_OK):
            return True
        own = _own_v2_cgroup()
        return own is not None and os.access(f"{root}{own}", os.W_OK)
    if version in ("v1", "hybrid"):
        return all(os.access(f"{root}/{c}", os.W_OK) for c in ("pids", "memory"))
    return False


def _own_v2_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _mount_setattr_available() -> bool:
    # An invalid call: EBADF/EINVAL if the syscall exists, ENOSYS if not. Changes nothing.
    rc = _libc.raw_syscall("mount_setattr", -1, None, 0, None, 0)
    return not (rc == -1 and ctypes.get_errno() == errno.ENOSYS)


def run_preflight(profile: str = "full") -> Report:
    if profile not in ("full", "minimal", "off"):
        raise SandboxError(f"unknown profile {profile!r}")
    abi = landlock.abi_version()
    userns_ok, userns_detail = run_in_child(_probe_userns)
    seccomp_mode = _libc.prctl(_libc.PR_GET_SECCOMP)
    actions = ""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail", encoding="ascii") as f:
            actions = f.read().strip()
    except OSError:
        pass
    seccomp_ok = seccomp_mode != -1 and all(a in actions.split() for a in ("errno", "kill_process", "allow"))
    if profile in ("full", "minimal") and seccomp_ok:
        filter_ok, filter_detail = run_in_child(lambda: _probe_seccomp_filter(profile))
    else:
        filter_ok, filter_detail = seccomp_ok, "not needed" if profile == "off" else "seccomp unavailable"
    proc_ok, proc_detail = run_in_child(_probe_fresh_proc)
    version = cgroups.cgroup_version()
    report = Report(
        profile=profile,
        is_root=os.geteuid() == 0,
        landlock_abi=abi,
        user_namespaces=userns_ok,
        user_namespaces_detail=userns_detail,
        seccomp=seccomp_ok,
        seccomp_detail=f"actions: {actions}" if actions else "no seccomp filter support",
        seccomp_filter_loads=filter_ok,
        seccomp_filter_detail=filter_detail,
        cgroup_version=version,
        cgroup_delegated=_cgroup_delegated(version),
        io_uring_disabled=_read_int("/proc/sys/kernel/io_uring_disabled"),
        legacy_tiocsti=_read_int("/proc/sys/dev/tty/legacy_tiocsti"),
        protected_symlinks=_read_int("/proc/sys/fs/protected_symlinks"),
        fresh_proc=proc_ok,
        fresh_proc_detail=proc_detail,
        mount_setattr=_mount_setattr_available(),
    )
    _judge(report)
    return report


def _judge(r: Report) -> None:
    """Fill problems (the profile cannot run) and warnings (it runs, with less defence in depth)."""
    if r.profile == "off":
        r.warnings.append("profile off: credential stripping only, no OS confinement")
        return
    if not r.user_namespaces:
        r.problems.append(f"user namespaces unavailable: {r.user_namespaces_detail}")
    if not r.seccomp:
        r.problems.append("seccomp filters unavailable")
    elif not r.seccomp_filter_loads:
        r.problems.append(f"seccomp filter does not load: {r.seccomp_filter_detail}")
    if not r.fresh_proc:
        r.problems.append(f"cannot mount a fresh /proc in a new pid namespace: {r.fresh_proc_detail}")
    if r.profile == "full":
        if r.landlock_abi < 1:
            r.problems.append("Landlock unavailable (profile full needs it)")
        elif r.landlock_abi < 6:
            r.warnings.append(f"Landlock ABI {r.landlock_abi}: no signal/abstract-socket scoping (ABI 6)")
    if not r.mount_setattr:
        r.warnings.append("mount_setattr unavailable: read-only binds fall back to per-mount remounts")
    if not r.cgroup_delegated:
        r.warnings.append(f"cgroups ({r.cgroup_version}) not writable: rlimits and the PID namespace only")
    if r.io_uring_disabled == 0:
        r.warnings.append("io_uring is enabled on the host (kernel.io_uring_disabled=0); seccomp denies it")
    if r.legacy_tiocsti == 1:
        r.warnings.append("dev.tty.legacy_tiocsti=1; seccomp denies TIOCSTI")
    if r.protected_symlinks == 0:
        r.warnings.append("fs.protected_symlinks=0: symlink attacks in sticky directories are possible")


def can_deliver(profile: str) -> bool:
    return run_preflight(profile).can_deliver
