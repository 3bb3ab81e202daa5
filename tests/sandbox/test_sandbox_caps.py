"""caps: after drop_all + no_new_privs every capability set is empty and securebits are locked."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from typing import Any

import pytest
from faramesh.sandbox import _libc, caps, namespaces
from faramesh.sandbox.errors import CapsError
from sandbox_helpers import IS_ROOT, become_agent, forked, slurp

SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _confined_report() -> dict[str, Any]:
    caps.drop_all()
    caps.set_no_new_privs()
    caps.set_dumpable(False)
    out: dict[str, Any] = dict(caps.current_caps())
    out["securebits"] = _libc.prctl(_libc.PR_GET_SECUREBITS)
    out["dumpable"] = _libc.prctl(_libc.PR_GET_DUMPABLE)
    # Locked securebits cannot be undone, even by trying to clear them.
    out["unlock_securebits"] = 0 if _libc.prctl(_libc.PR_SET_SECUREBITS, 0) == 0 else _errno()
    # A child process (fresh exec) sees the same: nothing comes back through execve.
    out["exec_status"] = subprocess.run(["/bin/grep", "-E", "^(Cap|NoNewPrivs)", "/proc/self/status"],
                                        capture_output=True, text=True).stdout
    return out


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _assert_zeroed(res: dict[str, Any]) -> None:
    for key in SETS:
        assert res[key] == 0, (key, hex(res[key]))
    assert res["NoNewPrivs"] == 1
    assert res["securebits"] == caps.SECUREBITS_LOCKED
    assert res["unlock_securebits"] == errno.EPERM
    assert res["dumpable"] == 0
    lines = dict(line.split(":\t") for line in res["exec_status"].splitlines())
    assert all(int(lines[k], 16) == 0 for k in SETS), lines
    assert lines["NoNewPrivs"].strip() == "1"


@pytest.mark.skipif(not IS_ROOT, reason="host-root variant; the user-namespace variant below runs unprivileged")
def test_drop_all_as_host_root(tmp_path: Any) -> None:
    private = tmp_path / "someone-elses"
    private.write_text("secret")
    os.chown(private, 65001, 65001)
    private.chmod(0o600)

    def child() -> dict[str, Any]:
        before = caps.current_caps()
        control = len(slurp(private))  # CAP_DAC_OVERRIDE reads another user's 0600 file
        out = _confined_report()
        out["control"] = control
        out["before_eff"] = before["CapEff"]
        # uid 0 without capabilities: no CAP_CHOWN, no CAP_DAC_OVERRIDE.
        out["chown"] = 0
        try:
            os.chown("/proc/self/status", 1, 1)
        except OSError as e:
            out["chown"] = e.errno
        try:
            slurp(private)
            out["shadow"] = 0
        except OSError as e:
            out["shadow"] = e.errno
        return out

    res = forked(child)
    assert res["before_eff"] != 0  # the child started with root's capabilities
    _assert_zeroed(res)
    assert res["chown"] == errno.EPERM
    assert res["control"] == 6
    assert res["shadow"] == errno.EACCES


def test_drop_all_inside_a_user_namespace() -> None:
    """The launch path's state at S7: C2 holds every capability of its own user namespace."""

    def child() -> dict[str, Any]:
        uid, gid = become_agent()
        namespaces.unshare(namespaces.CLONE_NEWUSER)
        namespaces.write_id_maps(1000, uid, 1000, gid)
        before = caps.current_caps()
        out = _confined_report()
        out["before_eff"] = before["CapEff"]
        out["uid"] = os.getuid()
        return out

    res = forked(child)
    assert res["before_eff"] != 0 and res["uid"] == 1000
    _assert_zeroed(res)


def test_pdeathsig_and_dead_parent_check() -> None:
    def child() -> dict[str, Any]:
        caps.set_pdeathsig(signal.SIGKILL, expected_parent=os.getppid())
        import ctypes

        sig = ctypes.c_int(0)
        _libc.libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        try:
            caps.set_pdeathsig(signal.SIGKILL, expected_parent=os.getppid() + 1_000_000)
            late = None
        except CapsError as e:
            late = e.code
        return {"late": late, "sig": sig.value}

    res = forked(child)
    assert res["sig"] == signal.SIGKILL
    assert res["late"] == "SANDBOX_CAPS_FAILED"


def test_current_caps_parses_status(tmp_path: Any) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t0\n"
                      "CapBnd:\t1\nCapAmb:\t0\nNoNewPrivs:\t1\nSeccomp:\t2\n")
    got = caps.current_caps(str(status))
    assert got == {"CapInh": 0, "CapPrm": 0x1FFFFFFFFFF, "CapEff": 0, "CapBnd": 1, "CapAmb": 0, "NoNewPrivs": 1,
                   "Seccomp": 2}
    assert caps.cap_last_cap() >= 40
