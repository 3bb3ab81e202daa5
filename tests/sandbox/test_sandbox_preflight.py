"""preflight: the report's fields reflect this host, and a profile it cannot deliver is refused."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from faramesh.sandbox import cgroups, landlock, preflight
from faramesh.sandbox.errors import SandboxError
from sandbox_helpers import slurp


def _read(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except OSError:
        return None


@pytest.mark.parametrize("profile", ["full", "minimal", "off"])
def test_report_matches_the_host(profile: str) -> None:
    r = preflight.run_preflight(profile)
    assert r.profile == profile
    assert r.is_root == (os.geteuid() == 0)
    assert r.landlock_abi == landlock.abi_version() >= 1
    assert r.user_namespaces is True, r.user_namespaces_detail
    assert r.seccomp is True and "errno" in r.seccomp_detail
    assert r.fresh_proc is True, r.fresh_proc_detail
    assert r.cgroup_version == cgroups.cgroup_version()
    assert r.io_uring_disabled == _read("/proc/sys/kernel/io_uring_disabled")
    assert r.legacy_tiocsti == _read("/proc/sys/dev/tty/legacy_tiocsti")
    assert r.protected_symlinks == _read("/proc/sys/fs/protected_symlinks")
    assert r.mount_setattr is True
    if profile != "off":
        assert r.seccomp_filter_loads is True, r.seccomp_filter_detail
    assert r.can_deliver, r.problems
    assert preflight.can_deliver(profile) is True
    d = json.loads(json.dumps(r.to_dict()))
    assert d["can_deliver"] is True and d["landlock_abi"] == r.landlock_abi
    for key in ("user_namespaces", "seccomp", "cgroup_version", "cgroup_delegated", "io_uring_disabled",
                "legacy_tiocsti", "protected_symlinks", "fresh_proc", "problems", "warnings"):
        assert key in d
    # The probes ran in children: this process is still unconfined.
    status = slurp("/proc/self/status")
    assert "NoNewPrivs:\t0" in status and "Seccomp:\t0" in status


def test_judgement_refuses_what_the_host_lacks() -> None:
    good = preflight.run_preflight("full")
    no_landlock = dataclasses.replace(good, landlock_abi=0, problems=[], warnings=[])
    preflight._judge(no_landlock)
    assert not no_landlock.can_deliver and any("Landlock" in p for p in no_landlock.problems)
    minimal = dataclasses.replace(no_landlock, profile="minimal", problems=[], warnings=[])
    preflight._judge(minimal)
    assert minimal.can_deliver  # minimal needs no Landlock
    no_userns = dataclasses.replace(good, profile="minimal", user_namespaces=False, problems=[], warnings=[])
    preflight._judge(no_userns)
    assert not no_userns.can_deliver
    off = dataclasses.replace(no_userns, profile="off", problems=[], warnings=[])
    preflight._judge(off)
    assert off.can_deliver and off.warnings
    with pytest.raises(SandboxError):
        preflight.run_preflight("bogus")


def test_run_in_child_reports_failures() -> None:
    def boom() -> str:
        raise SandboxError("nope")

    assert preflight.run_in_child(lambda: "fine") == (True, "fine")
    ok, detail = preflight.run_in_child(boom)
    assert not ok and "SANDBOX_ERROR" in detail
