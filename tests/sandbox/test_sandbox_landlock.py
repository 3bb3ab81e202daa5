"""Landlock: reads outside the rules fail, inside succeed, read-only stays read-only (forked children)."""

from __future__ import annotations

import errno
import os
import subprocess
from typing import Any

import pytest
from faramesh.sandbox import caps, landlock
from faramesh.sandbox.errors import LandlockError, LandlockUnavailable
from sandbox_helpers import forked, put, slurp

SYSTEM_EXEC = ["/usr", "/bin", "/lib", "/lib64", "/etc"]


def _try(fn: Any) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno or -1


def _layout(base: str) -> dict[str, str]:
    paths = {name: os.path.join(base, name) for name in ("ro", "rw", "outside")}
    for p in paths.values():
        os.mkdir(p)
        with open(os.path.join(p, "f"), "w") as f:
            f.write(f"content of {p}\n")
    return paths


def test_abi_version_is_reported() -> None:
    abi = landlock.abi_version()
    assert abi >= 1
    rights = landlock.handled_fs_rights(abi)
    assert rights & landlock.ACCESS_FS_READ_FILE
    assert bool(rights & landlock.ACCESS_FS_REFER) == (abi >= 2)
    assert bool(rights & landlock.ACCESS_FS_TRUNCATE) == (abi >= 3)
    assert bool(rights & landlock.ACCESS_FS_IOCTL_DEV) == (abi >= 5)
    assert landlock.handled_fs_rights(1) == (1 << 13) - 1


def test_restrict_enforces_rules(tmp_path: Any) -> None:
    paths = _layout(str(tmp_path))
    ro, rw, outside = paths["ro"], paths["rw"], paths["outside"]

    def child() -> dict[str, Any]:
        # Control, before restriction: everything is readable by this (root or not) child.
        control = _try(lambda: slurp(os.path.join(outside, "f")))
        caps.set_no_new_privs()  # unprivileged, Landlock needs it (the launch path sets it at S7 anyway)
        enforced = landlock.restrict(read_only=[ro], read_write=[rw], read_exec=SYSTEM_EXEC, missing_ok=True)
        out: dict[str, Any] = {"control": control, "enforced": enforced}
        out["read_outside"] = _try(lambda: slurp(os.path.join(outside, "f")))
        out["list_outside"] = _try(lambda: os.listdir(outside))
        out["read_ro"] = _try(lambda: slurp(os.path.join(ro, "f")))
        out["write_ro"] = _try(lambda: put(os.path.join(ro, "f"), "x", "a"))
        out["create_ro"] = _try(lambda: put(os.path.join(ro, "new"), ""))
        out["unlink_ro"] = _try(lambda: os.unlink(os.path.join(ro, "f")))
        out["truncate_ro"] = _try(lambda: os.truncate(os.path.join(ro, "f"), 0))
        out["write_rw"] = _try(lambda: put(os.path.join(rw, "new"), "x"))
        out["mkdir_rw"] = _try(lambda: os.mkdir(os.path.join(rw, "d")))
        # A hard link from the writable dir to a read-only file would be a second, writable name.
        out["link_ro_into_rw"] = _try(lambda: os.link(os.path.join(ro, "f"), os.path.join(rw, "alias")))
        out["symlink_then_read"] = _try(lambda: (os.symlink(os.path.join(outside, "f"), os.path.join(rw, "sym")),
                                                 slurp(os.path.join(rw, "sym"))))
        out["exec_python"] = subprocess.run(["/usr/bin/python3", "-c", "print(1)"], capture_output=True).returncode
        out["exec_python_reads_outside"] = subprocess.run(
            ["/usr/bin/python3", "-c", f"import sys\ntry:\n    open({os.path.join(outside, 'f')!r}).read()\n"
             "except PermissionError:\n    sys.exit(13)"], capture_output=True
        ).returncode
        # ABI 6 scoping: no signal to a process outside the domain (signal 0 only probes).
        out["signal_parent"] = _try(lambda: os.kill(os.getppid(), 0))
        return out

    res = forked(child)
    assert res["control"] == 0
    assert res["enforced"]["abi"] == landlock.abi_version()
    assert res["read_outside"] == errno.EACCES
    assert res["list_outside"] == errno.EACCES
    assert res["read_ro"] == 0
    assert res["write_ro"] == errno.EACCES
    assert res["create_ro"] == errno.EACCES
    assert res["unlink_ro"] == errno.EACCES
    assert res["truncate_ro"] == errno.EACCES
    assert res["write_rw"] == 0 and res["mkdir_rw"] == 0
    assert res["link_ro_into_rw"] in (errno.EXDEV, errno.EACCES)
    assert res["symlink_then_read"] == errno.EACCES
    assert res["exec_python"] == 0
    assert res["exec_python_reads_outside"] == 13  # PermissionError in the exec'd child, not a crash
    if landlock.abi_version() >= 6:
        assert res["enforced"]["scoped"] == landlock.SCOPE_SIGNAL | landlock.SCOPE_ABSTRACT_UNIX_SOCKET
        assert res["signal_parent"] == errno.EPERM
    # The files are untouched on the host.
    assert slurp(os.path.join(ro, "f")).startswith("content")


def test_file_rules_and_unprivileged_restrict(tmp_path: Any) -> None:
    """A rule on a single file gets file rights only (no EINVAL); without CAP_SYS_ADMIN, Landlock needs
    no_new_privs — with it, an unprivileged process can confine itself."""
    target = tmp_path / "single"
    target.write_text("one file")
    other = tmp_path / "other"
    other.write_text("not this one")

    def child() -> dict[str, Any]:
        if os.geteuid() == 0:
            os.setresgid(65000, 65000, 65000)
            os.setresuid(65000, 65000, 65000)
        out: dict[str, Any] = {"uid": os.geteuid()}
        try:
            landlock.restrict(read_only=["/usr"], read_write=[])
            out["without_nnp"] = "restricted"
        except LandlockError as e:
            out["without_nnp"] = e.errno
        caps.set_no_new_privs()
        landlock.restrict(read_only=["/proc/self", "/usr", "/lib", "/lib64", "/etc"], read_write=[],
                          missing_ok=True)
        out["restricted"] = True
        return out

    res = forked(child)
    assert res["uid"] != 0
    assert res["without_nnp"] == errno.EPERM
    assert res["restricted"] is True

    def file_rule() -> dict[str, Any]:
        caps.set_no_new_privs()
        landlock.restrict(read_only=[str(target)], read_write=[])
        return {"single": _try(lambda: slurp(target)), "other": _try(lambda: slurp(other))}

    res = forked(file_rule)
    assert res["single"] == 0
    assert res["other"] == errno.EACCES


def test_tcp_port_rules(tmp_path: Any) -> None:
    if landlock.abi_version() < 4:
        pytest.skip("TCP rules need Landlock ABI 4")  # not reached on the CI kernel (ABI >= 4)
    import socket

    def child() -> dict[str, Any]:
        caps.set_no_new_privs()
        landlock.restrict(read_only=[], read_write=[], tcp_bind=[], tcp_connect=[])
        s = socket.socket()
        out = {"bind": _try(lambda: s.bind(("127.0.0.1", 0)))}
        s.close()
        return out

    res = forked(child)
    assert res["bind"] == errno.EACCES


def test_missing_path_and_no_landlock_are_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    def child() -> dict[str, Any]:
        caps.set_no_new_privs()
        try:
            landlock.restrict(read_only=[str(tmp_path / "absent")], read_write=[])
        except LandlockError as e:
            return {"code": e.code, "errno": e.errno}
        return {"code": None}

    res = forked(child)
    assert res["code"] == "SANDBOX_LANDLOCK_FAILED" and res["errno"] == errno.ENOENT

    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    with pytest.raises(LandlockUnavailable) as e:
        landlock.restrict(read_only=[], read_write=[])
    assert e.value.code == "SANDBOX_LANDLOCK_UNAVAILABLE"


def test_children_inherit_the_domain(tmp_path: Any) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")

    def child() -> dict[str, Any]:
        caps.set_no_new_privs()
        landlock.restrict(read_only=[], read_write=[], read_exec=SYSTEM_EXEC, missing_ok=True)
        pid = os.fork()
        if pid == 0:
            try:
                slurp(secret)
                os._exit(0)
            except PermissionError:
                os._exit(13)
        _, status = os.waitpid(pid, 0)
        return {"grandchild": os.waitstatus_to_exitcode(status)}

    res = forked(child)
    assert res["grandchild"] == 13
