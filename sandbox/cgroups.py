"""Resource limits (R1): rlimits, oom_score_adj, and the agent's cgroup when the host lets us make one.

R1 runs in C1 while still root, before the uid switch: raising a hard limit and creating a cgroup need
privilege, and joining the cgroup first means every later fork (C2, C3, the agent's own children) is
accounted there. Without a writable hierarchy (unprivileged, no delegation) the report says so and the
rlimits plus the PID namespace are what contain the agent.
"""

from __future__ import annotations

import ctypes
import errno
import os

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import CgroupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

CGROUP_ROOT = "/sys/fs/cgroup"
RLIMIT = {"CPU": 0, "FSIZE": 1, "DATA": 2, "STACK": 3, "CORE": 4, "NPROC": 6, "NOFILE": 7, "MEMLOCK": 8, "AS": 9}
RLIM_INFINITY = (1 << 64) - 1


class _Rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]


def get_rlimit(name: str) -> tuple[int, int]:
    lim = _Rlimit()
    _libc.check(_libc.libc.prlimit(0, RLIMIT[name], None, ctypes.byref(lim)), f"prlimit({name})", CgroupError)
    return int(lim.cur), int(lim.max)


def apply_rlimits(rlimits: Iterable[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """Set each (name, soft, hard); -1 is unlimited. RLIMIT_CORE=0 is always applied, first (no core
    file may ever hold the agent's or a helper's memory). Without CAP_SYS_RESOURCE a hard limit cannot
    rise: the request is clamped to the current hard limit. Returns what is now in force."""
    applied: dict[str, tuple[int, int]] = {}
    for name, soft, hard in (("CORE", 0, 0), *rlimits):
        want_soft = RLIM_INFINITY if soft == -1 else soft
        want_hard = RLIM_INFINITY if hard == -1 else hard
        lim = _Rlimit(want_soft, want_hard)
        if _libc.libc.prlimit(0, RLIMIT[name], ctypes.byref(lim), None) == -1:
            if ctypes.get_errno() != errno.EPERM:
                raise CgroupError(f"prlimit({name})", errno=ctypes.get_errno())
            _cur, cur_hard = get_rlimit(name)
            lim = _Rlimit(min(want_soft, cur_hard), min(want_hard, cur_hard))
            _libc.check(_libc.libc.prlimit(0, RLIMIT[name], ctypes.byref(lim), None), f"prlimit({name})", CgroupError)
        applied[name] = get_rlimit(name)
    return applied


def set_oom_score_adj(value: int = 1000) -> None:
    """The agent is the first thing the OOM killer takes (raising it needs no privilege)."""
    # os.open/os.write: open() in text mode would import the ascii codec and build a TextIOWrapper
    # (≈1 ms per launch for a 4-byte write).
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode("ascii"))
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError("writing /proc/self/oom_score_adj", errno=e.errno) from None


def cgroup_version(root: str = CGROUP_ROOT) -> str:
    """"v2" (unified only), "hybrid" (v1 controllers plus a unified mount), "v1", or "none"."""
    if os.path.exists(f"{root}/cgroup.controllers"):
        return "v2"
    v1 = any(os.path.exists(f"{root}/{c}/cgroup.procs") for c in ("pids", "memory", "cpu"))
    if v1:
        return "hybrid" if os.path.exists(f"{root}/unified/cgroup.procs") else "v1"
    return "none"


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def cgroup_dirs(name: str, root: str = CGROUP_ROOT) -> dict[str, str]:
    """Where the cgroup `faramesh/<name>` lives per controller (v1) or once (v2, key "unified"). `name` is
    the spec's cgroup name: the agent id, or `<stack>/<agent>` when the supervisor qualifies it."""
    if cgroup_version(root) == "v2":
        return {"unified": f"{root}/faramesh/{name}"}
    return {c: f"{root}/{c}/faramesh/{name}" for c in ("pids", "memory")}


def join_cgroup(name: str, pids_max: int | None = None, memory_max: int | None = None, *, pid: int = 0,
                required: bool = False, root: str = CGROUP_ROOT) -> dict[str, str]:
    """Create faramesh/<name> under each controller, set the limits, move `pid` (0 = self) in.

    Returns {controller: "joined" | "unavailable: <why>"}; with `required` an unavailable controller
    raises CgroupError instead (the root path, where the host promised delegation).
    """
    pid = pid or os.getpid()
    report: dict[str, str] = {}
    version = cgroup_version(root)
    if version == "none":
        if required:
            raise CgroupError(f"no cgroup hierarchy at {root}")
        return {"none": "unavailable: no cgroup hierarchy"}
    for ctrl, path in cgroup_dirs(name, root).items():
        hierarchy = root if version == "v2" else f"{root}/{ctrl}"
        if not os.path.exists(f"{hierarchy}/cgroup.procs"):
            if required:
                raise CgroupError(f"controller {ctrl} is not mounted at {hierarchy}")
            report[ctrl] = "unavailable: controller not mounted"
            continue
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
            if version == "v2":
                # Controllers must be enabled top-down in each ancestor's subtree_control.
                parent = os.path.dirname(path)
                ancestors = [parent]
                while parent != root and len(parent) > len(root):
                    parent = os.path.dirname(parent)
                    ancestors.append(parent)
                for anc in reversed(ancestors):
                    _write(f"{anc}/cgroup.subtree_control", "+pids +memory")
                if pids_max is not None:
                    _write(f"{path}/pids.max", str(pids_max))
                if memory_max is not None:
                    _write(f"{path}/memory.max", str(memory_max))
            elif ctrl == "pids" and pids_max is not None:
                _write(f"{path}/pids.max", str(pids_max))
            elif ctrl == "memory" and memory_max is not None:
                _write(f"{path}/memory.limit_in_bytes", str(memory_max))
            _write(f"{path}/cgroup.procs", str(pid))
            report[ctrl] = "joined"
        except OSError as e:
            if required:
                raise CgroupError(f"cgroup {path}", errno=e.errno) from None
            report[ctrl] = f"unavailable: {e.strerror}"
    return report


def cgroup_pids(name: str, root: str = CGROUP_ROOT) -> set[int]:
    """Every process in the cgroup faramesh/<name> (and below), by any controller: `cgroup.procs` is the
    reliable list (a process cannot leave its cgroup without privilege, whatever it forks or setsids)."""
    found: set[int] = set()
    for path in cgroup_dirs(name, root).values():
        for dirpath, _dirs, _files in os.walk(path):
            try:
                with open(f"{dirpath}/cgroup.procs", "rb") as fh:
                    found.update(int(p) for p in fh.read().split())
            except OSError:
                continue
    return found


def kill_cgroup(name: str, root: str = CGROUP_ROOT, timeout: float = 5.0) -> bool:
    """SIGKILL every process in faramesh/<name> until it is empty (v2 `cgroup.kill` when the kernel has
    it; otherwise a kill loop, which also catches what was forked meanwhile). True once empty."""
    import signal
    import time

    for path in cgroup_dirs(name, root).values():
        if os.path.exists(f"{path}/cgroup.kill"):
            try:  # noqa: SIM105 (no contextlib on the launch path)
                _write(f"{path}/cgroup.kill", "1")
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    while True:
        pids = cgroup_pids(name, root)
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:  # noqa: SIM105
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def list_cgroups(prefix: str, root: str = CGROUP_ROOT) -> list[str]:
    """The names `<prefix>/<leaf>` that exist under faramesh/<prefix> in any controller (a stack's)."""
    names: set[str] = set()
    for path in cgroup_dirs(prefix, root).values():
        try:
            entries = os.listdir(path)
        except OSError:
            continue
        names.update(f"{prefix}/{e}" for e in entries if os.path.isdir(f"{path}/{e}"))
    return sorted(names)


def remove_cgroup(name: str, root: str = CGROUP_ROOT) -> None:
    """rmdir the cgroup faramesh/<name> once empty (EBUSY while a process is still in one), then its
    now-empty parents up to (not including) faramesh/ itself."""
    for path in cgroup_dirs(name, root).values():
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(f"removing {path}", errno=e.errno) from None
        top = path[: len(path) - len(name)].rstrip("/")
        parent = os.path.dirname(path)
        while len(parent) > len(top):
            try:
                os.rmdir(parent)
            except OSError:
                break  # another agent of the stack still has its cgroup there (or it is gone)
            parent = os.path.dirname(parent)
