"""namespaces: an unprivileged uid creates USER|NS|PID|NET|…, maps 1000 → itself, lo is up and alone."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest
from faramesh.sandbox import namespaces
from faramesh.sandbox.errors import NamespaceError
from sandbox_helpers import AGENT_GID, AGENT_UID, IS_ROOT, enter_sandbox_namespaces, forked, in_pid1


def test_unprivileged_child_builds_the_namespaces() -> None:
    host_name = os.uname().nodename
    host_ifaces = sorted(name for _i, name in socket.if_nameindex())

    def c1() -> dict[str, Any]:
        # Drop the uid *first* (R3): the user namespace is then owned by the agent's uid, and nothing in it
        # can ever map to, or act as, host root.
        uid, _gid = enter_sandbox_namespaces()
        out: dict[str, Any] = {"c1_host_uid": uid, "c1_uid_inside": os.getuid()}
        with open("/proc/self/uid_map") as f:
            out["uid_map"] = f.read().split()
        with open("/proc/self/gid_map") as f:
            out["gid_map"] = f.read().split()
        with open("/proc/self/setgroups") as f:
            out["setgroups"] = f.read().strip()

        def c2() -> dict[str, Any]:
            namespaces.sethostname("agent-box")
            return {
                "pid": os.getpid(),
                "uid": os.getuid(),
                "gid": os.getgid(),
                "groups": os.getgroups(),
                "ifaces": sorted(name for _i, name in socket.if_nameindex()),
                "lo_up": bool(namespaces.interface_flags("lo") & namespaces.IFF_UP),
                "hostname": os.uname().nodename,
                "setgroups_call": _setgroups_errno(),
                "loopback_echo": _loopback_echo(),
            }

        out.update(in_pid1(c2))
        return out

    res = forked(c1)
    assert res["c1_host_uid"] == AGENT_UID and res["c1_uid_inside"] == 1000
    assert res["uid_map"] == ["1000", str(AGENT_UID), "1"]
    assert res["gid_map"] == ["1000", str(AGENT_GID), "1"]
    assert res["setgroups"] == "deny"
    assert res["c2_exit"] == 0
    assert res["pid"] == 1
    assert res["uid"] == 1000 and res["gid"] == 1000
    assert res["ifaces"] == ["lo"]
    assert res["lo_up"] is True
    assert res["loopback_echo"] == "pong"
    assert res["hostname"] == "agent-box"
    assert res["setgroups_call"] == errno.EPERM
    # The host is unchanged.
    assert os.uname().nodename == host_name
    assert sorted(name for _i, name in socket.if_nameindex()) == host_ifaces


def _setgroups_errno() -> int:
    try:
        os.setgroups([1000])
        return 0
    except OSError as e:
        return e.errno or -1


def _loopback_echo() -> str:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname(), timeout=5)
    conn, _ = srv.accept()
    cli.sendall(b"pong")
    data = conn.recv(4).decode()
    for s in (cli, conn, srv):
        s.close()
    return data


def test_loopback_starts_down_without_bring_up() -> None:
    def c1() -> dict[str, Any]:
        if IS_ROOT:
            namespaces.switch_ids(AGENT_UID, AGENT_GID)
        namespaces.unshare(namespaces.CLONE_NEWUSER | namespaces.CLONE_NEWNET)
        down = bool(namespaces.interface_flags("lo") & namespaces.IFF_UP)
        namespaces.bring_up_loopback()
        return {"before": down, "after": bool(namespaces.interface_flags("lo") & namespaces.IFF_UP)}

    res = forked(c1)
    assert res["before"] is False and res["after"] is True


@pytest.mark.skipif(not IS_ROOT, reason="switching uids needs root")
def test_switch_ids_drops_everything() -> None:
    def child() -> dict[str, Any]:
        os.setgroups([0, 4, 27])
        namespaces.switch_ids(AGENT_UID, AGENT_GID)
        try:
            os.setresuid(0, 0, 0)
            back = 0
        except OSError as e:
            back = e.errno or -1
        return {"uids": os.getresuid(), "gids": os.getresgid(), "groups": os.getgroups(), "back": back}

    res = forked(child)
    assert res["uids"] == [AGENT_UID] * 3 and res["gids"] == [AGENT_GID] * 3
    assert res["groups"] == []
    assert res["back"] == errno.EPERM
    with pytest.raises(NamespaceError):
        namespaces.switch_ids(0, 0)


def test_errors_are_typed() -> None:
    def child() -> dict[str, Any]:
        try:
            namespaces.setns(-1, 0)
        except NamespaceError as e:
            return {"code": e.code, "errno": e.errno}
        return {}

    res = forked(child)
    assert res["code"] == "SANDBOX_NAMESPACE_FAILED" and res["errno"] == errno.EBADF
    with pytest.raises(NamespaceError):
        namespaces.sethostname("x" * 65)
