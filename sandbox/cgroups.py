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


def cgroup_dirs(agent_id: str, root: str = CGROUP_ROOT) -> dict[str, str]:
    """Where the agent's cgroup lives per controller (v1) or once (v2, key "unified")."""
    if cgroup_version(root) == "v2":
        return {"unified": f"{root}/faramesh/{agent_id}"}
    return {c: f"{root}/{c}/faramesh/{agent_id}" for c in ("pids", "memory")}


def join_cgroup(agent_id: str, pids_max: int | None = None, memory_max: int | None = None, *, pid: int = 0,
                required: bool = False, root: str = CGROUP_ROOT) -> dict[str, str]:
    """Create faramesh/<agent_id> under each controller, set the limits, move `pid` (0 = self) in.

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
    for ctrl, path in cgroup_dirs(agent_id, root).items():
        hierarchy = root if version == "v2" else f"{root}/{ctrl}"
        if not os.path.exists(f"{hierarchy}/cgroup.procs"):
            if required:
                raise CgroupError(f"controller {ctrl} is not mounted at {hierarchy}")
            report[ctrl] = "unavailable: controller not mounted"
            continue
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
            if version == "v2":
                # Controllers must be enabled top-down in each parent's subtree_control.
                for parent in (root, os.path.dirname(path)):
                    _write(f"{parent}/cgroup.subtree_control", "+pids +memory")
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


def remove_cgroup(agent_id: str, root: str = CGROUP_ROOT) -> None:
    """rmdir the agent's cgroups once empty (EBUSY while a process is still in one)."""
    for path in cgroup_dirs(agent_id, root).values():
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(f"removing {path}", errno=e.errno) from None
