"""Namespaces (R3, S1–S3): drop to the agent's ids, unshare, map ids, bring up loopback, set the hostname.

Python 3.11's `os` has neither unshare nor setns, so they go through ctypes. Nothing here forks: the
caller forks C2 after S3, because a new PID namespace only applies to the children of the unsharer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import NamespaceError

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# S1 of DESIGN.md §5: everything but time in one call, so no window exists with some namespaces only.
SANDBOX_NAMESPACES = (
    CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
)


def switch_ids(uid: int, gid: int) -> None:
    """R3: setgroups([]), setresgid, setresuid — as root, *before* any user namespace exists.

    A user namespace created while still uid 0 is owned by host root, and a mapping of anything to host 0
    is host root for file access; creating it as the agent's uid makes the agent's uid the owner, and that
    uid (never shared with a process outside a sandbox) is all the new namespace can ever act as on the
    host. Groups first: after setresuid the process could no longer change them. gid before uid for the
    same reason.
    """
    if uid == 0 or gid == 0:
        raise NamespaceError("refusing to 'switch' to uid/gid 0")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise NamespaceError(f"switching to {uid}:{gid}", errno=e.errno) from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise NamespaceError("ids did not switch completely")


def unshare(flags: int) -> None:
    """unshare(2). CLONE_NEWUSER fails with EINVAL in a multi-threaded process: no thread may exist."""
    ctypes.set_errno(0)
    _libc.check(_libc.libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})", NamespaceError)


def setns(fd: int, nstype: int = 0) -> None:
    _libc.check(_libc.libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", NamespaceError)


def _write_proc(path: str, data: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NamespaceError(f"open {path}", errno=e.errno) from None
    try:
        os.write(fd, data.encode())
    except OSError as e:
        raise NamespaceError(f"write {path} ({data.strip()!r})", errno=e.errno) from None
    finally:
        os.close(fd)


def write_id_maps(inside_uid: int, host_uid: int, inside_gid: int, host_gid: int) -> None:
    """S2: map one uid and one gid of the new user namespace (of this process) to the host's.

    Order and why:
    1. PR_SET_DUMPABLE 1 (temporarily). setresuid() away from root (R3) made the process non-dumpable,
       which makes /proc/self/* owned by host root, and host root is not mapped in our namespace, so our
       capabilities there do not override it: every write below would be EACCES. The previous value is
       restored at the end (S7 sets it to 0 for good).
    2. /proc/self/setgroups = "deny", before gid_map: the kernel lets an unprivileged writer map gids only
       then (otherwise "root" inside could setgroups() away a supplementary group that a file uses to
       *deny* access), and once gid_map is written setgroups can no longer be switched to deny.
    3. uid_map, then gid_map: each a single line mapping our own host id, the only mapping an
       unprivileged writer may make (no newuidmap helper, no range).
    """
    was_dumpable = _libc.prctl(_libc.PR_GET_DUMPABLE)
    if was_dumpable != 1:
        _libc.check(_libc.prctl(_libc.PR_SET_DUMPABLE, 1), "PR_SET_DUMPABLE", NamespaceError)
    try:
        _write_proc("/proc/self/setgroups", "deny")
        _write_proc("/proc/self/uid_map", f"{inside_uid} {host_uid} 1\n")
        _write_proc("/proc/self/gid_map", f"{inside_gid} {host_gid} 1\n")
    finally:
        if was_dumpable != 1:
            _libc.prctl(_libc.PR_SET_DUMPABLE, 0)


# linux/sockios.h, linux/if.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_AF_INET = 2
_SOCK_DGRAM = 2
_SOCK_CLOEXEC = 0o2000000
_IFREQ = "16sH22x"  # struct ifreq: ifr_name[16] + the ifr_flags member of the 24-byte union


def bring_up_loopback(name: str = "lo") -> None:
    """S3: set IFF_UP on `lo` of the current network namespace (SIOCSIFFLAGS; no `ip` binary).

    Needs CAP_NET_ADMIN over the namespace, which the creator of the user namespace holds until S7.
    """
    sock = _libc.libc.socket(_AF_INET, _SOCK_DGRAM | _SOCK_CLOEXEC, 0)
    _libc.check(sock, "socket(AF_INET) for SIOCSIFFLAGS", NamespaceError)
    try:
        buf = ctypes.create_string_buffer(struct.pack(_IFREQ, name.encode(), 0), struct.calcsize(_IFREQ))
        _libc.check(_libc.libc.ioctl(sock, ctypes.c_ulong(SIOCGIFFLAGS), buf), f"SIOCGIFFLAGS {name}", NamespaceError)
        flags = struct.unpack(_IFREQ, buf.raw)[1]
        buf = ctypes.create_string_buffer(struct.pack(_IFREQ, name.encode(), flags | IFF_UP), struct.calcsize(_IFREQ))
        _libc.check(_libc.libc.ioctl(sock, ctypes.c_ulong(SIOCSIFFLAGS), buf), f"SIOCSIFFLAGS {name}", NamespaceError)
    finally:
        os.close(sock)


def interface_flags(name: str = "lo") -> int:
    """The IFF_* flags of an interface in the current network namespace (ENODEV → NamespaceError)."""
    sock = _libc.libc.socket(_AF_INET, _SOCK_DGRAM | _SOCK_CLOEXEC, 0)
    _libc.check(sock, "socket(AF_INET)", NamespaceError)
    try:
        buf = ctypes.create_string_buffer(struct.pack(_IFREQ, name.encode(), 0), struct.calcsize(_IFREQ))
        _libc.check(_libc.libc.ioctl(sock, ctypes.c_ulong(SIOCGIFFLAGS), buf), f"SIOCGIFFLAGS {name}", NamespaceError)
        return int(struct.unpack(_IFREQ, buf.raw)[1])
    finally:
        os.close(sock)


def sethostname(name: str) -> None:
    """S5 (after the UTS namespace exists): the agent sees its own hostname, not the host's."""
    raw = name.encode()
    if not raw or len(raw) > 64:
        raise NamespaceError(f"hostname {name!r} must be 1..64 bytes", errno=errno.EINVAL)
    _libc.check(_libc.libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", NamespaceError)
