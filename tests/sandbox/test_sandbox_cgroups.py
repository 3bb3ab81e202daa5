"""cgroups/rlimits: limits apply in the child and contain it; the cgroup is joined when writable."""

from __future__ import annotations

import errno
import os
import pathlib
import resource
import uuid
from typing import Any

import pytest
from faramesh.sandbox import cgroups
from sandbox_helpers import IS_ROOT, forked, world_dir

__all__ = ["world_dir"]


def test_rlimits_and_oom_score() -> None:
    def child() -> dict[str, Any]:
        resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, resource.RLIM_INFINITY))
        applied = cgroups.apply_rlimits([("NOFILE", 64, 64), ("NPROC", 4096, 4096)])
        cgroups.set_oom_score_adj(1000)
        opened, err = 0, 0
        fds = []
        try:
            for _ in range(200):
                fds.append(os.open("/dev/null", os.O_RDONLY))
                opened += 1
        except OSError as e:
            err = e.errno or -1
        for fd in fds:
            os.close(fd)
        with open("/proc/self/oom_score_adj") as f:
            oom = int(f.read())
        return {"applied": applied, "core": resource.getrlimit(resource.RLIMIT_CORE), "opened": opened,
                "err": err, "oom": oom, "raise": _raise_nofile()}

    res = forked(child)
    assert res["core"] == [0, 0]
    assert res["applied"]["CORE"] == [0, 0] and res["applied"]["NOFILE"] == [64, 64]
    assert res["opened"] < 64 and res["err"] == errno.EMFILE
    assert res["oom"] == 1000
    if not IS_ROOT:
        assert res["raise"] == "clamped"


def _raise_nofile() -> str:
    """Unprivileged, a request above the hard limit is clamped, not an error."""
    got = cgroups.apply_rlimits([("NOFILE", 128, 128)])
    return "clamped" if got["NOFILE"] == (64, 64) else f"raised to {got['NOFILE']}"


def test_cgroup_version_detected() -> None:
    assert cgroups.cgroup_version() in ("v1", "v2", "hybrid", "none")


@pytest.mark.skipif(not IS_ROOT, reason="creating cgroups needs root or delegation; covered by the report test")
def test_join_cgroup_limits_pids() -> None:
    agent = f"pytest-{uuid.uuid4().hex[:8]}"
    parents = {os.path.dirname(p) for p in cgroups.cgroup_dirs(agent).values()}
    created = {p for p in parents if not os.path.exists(p)}

    def child() -> dict[str, Any]:
        report = cgroups.join_cgroup(agent, pids_max=8, memory_max=256 << 20, required=True)
        with open("/proc/self/cgroup") as f:
            membership = f.read()
        forks, err = [], 0
        try:
            for _ in range(20):
                pid = os.fork()
                if pid == 0:
                    os.read(os.open("/dev/zero", os.O_RDONLY), 1)
                    import time

                    time.sleep(5)
                    os._exit(0)
                forks.append(pid)
        except OSError as e:
            err = e.errno or -1
        for pid in forks:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        return {"report": report, "membership": membership, "forks": len(forks), "err": err}

    try:
        res = forked(child)
        assert set(res["report"].values()) == {"joined"}
        assert f"/faramesh/{agent}" in res["membership"]
        assert res["forks"] < 8 and res["err"] == errno.EAGAIN
    finally:
        cgroups.remove_cgroup(agent)
        for parent in created:  # leave the host's cgroup tree as we found it
            os.rmdir(parent)
    for path in cgroups.cgroup_dirs(agent).values():
        assert not os.path.exists(path)


def test_join_reports_unavailable_without_raising(world_dir: str) -> None:
    """A host without a writable hierarchy: the report says so (rlimits + PID namespace only)."""
    report = cgroups.join_cgroup("x", pids_max=1, root=os.path.join(world_dir, "no-cgroups"))
    assert report == {"none": "unavailable: no cgroup hierarchy"}
    assert not os.path.exists(os.path.join(world_dir, "no-cgroups"))
    fake = pathlib.Path(world_dir) / "v1"
    (fake / "pids").mkdir(parents=True)
    (fake / "pids" / "cgroup.procs").write_text("")
    os.chmod(fake / "pids", 0o555)

    def child() -> dict[str, Any]:
        if IS_ROOT:
            os.setresuid(65000, 65000, 65000)
        return {"report": cgroups.join_cgroup("x", pids_max=1, root=str(fake))}

    try:
        res = forked(child)
    finally:
        os.chmod(fake / "pids", 0o755)
    assert res["report"]["pids"].startswith("unavailable")
    assert res["report"]["memory"] == "unavailable: controller not mounted"
    assert not (fake / "pids" / "faramesh").exists()
