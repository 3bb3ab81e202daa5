"""Capabilities and process flags (S7): the agent ends with every capability set empty, for good.

Order in drop_all() matters because the privileged steps need CAP_SETPCAP, which the last step removes:
securebits (locked) → ambient cleared → bounding set dropped → capset(all zero).
"""

from __future__ import annotations

import ctypes
import errno
import os

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import CapsError

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
# NOROOT: uid 0 and setuid-root executables no longer confer capabilities. NO_SETUID_FIXUP: uid changes do
# not recompute capability sets. KEEP_CAPS stays off (locked off). NO_CAP_AMBIENT_RAISE: nothing can be
# put back into the ambient set. Every bit is locked, so not even a process with CAP_SETPCAP can undo it.
SECUREBITS_LOCKED = (
    SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def cap_last_cap() -> int:
    """The highest capability number the kernel knows (/proc/sys/kernel/cap_last_cap, else probed)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except OSError:
        pass
    cap = 0
    while _libc.prctl(_libc.PR_CAPBSET_READ, cap + 1) >= 0:  # EINVAL past the last one
        cap += 1
    return cap


def set_securebits(bits: int = SECUREBITS_LOCKED) -> None:
    """PR_SET_SECUREBITS (needs CAP_SETPCAP: call before the bounding set and capset drop it)."""
    _libc.check(_libc.prctl(_libc.PR_SET_SECUREBITS, bits), "PR_SET_SECUREBITS", CapsError)


def clear_ambient() -> None:
    _libc.check(_libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL), "PR_CAP_AMBIENT_CLEAR_ALL",
                CapsError)


def drop_bounding_set() -> None:
    """Drop every capability up to cap_last_cap from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(cap_last_cap() + 1):
        if _libc.prctl(_libc.PR_CAPBSET_DROP, cap) == -1 and ctypes.get_errno() != errno.EINVAL:
            raise CapsError(f"PR_CAPBSET_DROP({cap})", errno=ctypes.get_errno())


def capset_zero() -> None:
    """capset(2) v3 with effective, permitted and inheritable all empty (both 32-bit halves)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    ctypes.set_errno(0)
    rc = _libc.libc.capset(ctypes.byref(header), data)
    _libc.check(rc, "capset(0)", CapsError)


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _libc.check(_libc.libc.capget(ctypes.byref(header), data), "capget", CapsError)
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def drop_all() -> None:
    """Lock securebits, clear ambient, drop the bounding set, zero the rest — in that order (see module doc)."""
    set_securebits()
    clear_ambient()
    drop_bounding_set()
    capset_zero()
    if capget() != (0, 0, 0):
        raise CapsError("capabilities remain after capset(0)")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant privileges again (setuid bits, file caps)."""
    _libc.check(_libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS", CapsError)
    if _libc.prctl(_libc.PR_GET_NO_NEW_PRIVS) != 1:
        raise CapsError("PR_SET_NO_NEW_PRIVS did not stick")


def set_dumpable(dumpable: bool) -> None:
    """PR_SET_DUMPABLE: 0 makes /proc/<pid> root-owned and forbids ptrace by same-uid processes."""
    _libc.check(_libc.prctl(_libc.PR_SET_DUMPABLE, 1 if dumpable else 0), "PR_SET_DUMPABLE", CapsError)


def set_pdeathsig(sig: int, expected_parent: int | None = None) -> None:
    """Deliver `sig` when the parent dies. If the parent died before the prctl, no signal would ever
    come, so with `expected_parent` we check getppid() afterwards and fail instead."""
    _libc.check(_libc.prctl(_libc.PR_SET_PDEATHSIG, sig), "PR_SET_PDEATHSIG", CapsError)
    if expected_parent is not None and os.getppid() != expected_parent:
        raise CapsError(f"parent {expected_parent} died before PR_SET_PDEATHSIG")


def current_caps(status_path: str = "/proc/self/status") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb (as ints), NoNewPrivs and Seccomp from /proc/self/status."""
    out: dict[str, int] = {}
    with open(status_path, encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                out[key] = int(value.strip(), 16)
            elif key in ("NoNewPrivs", "Seccomp", "Seccomp_filters"):
                out[key] = int(value.strip())
    return out
