"""The one libc handle and the raw syscall numbers the sandbox needs.

The per-launch path imports only os, sys, ctypes and struct (DESIGN.md §1), so everything that Python's
`os` lacks (unshare, setns, mount, pivot_root, landlock_*, seccomp, capset, prctl) goes through here.
"""

from __future__ import annotations

import ctypes
import os

from faramesh.sandbox.errors import SandboxError, UnsupportedArchitecture

libc = ctypes.CDLL(None, use_errno=True)

_MACHINE = os.uname().machine

# Only the syscalls without a glibc wrapper we rely on, plus the ones tests poke with raw numbers.
_NR_BY_ARCH: dict[str, dict[str, int]] = {
    "x86_64": {
        "ioctl": 16,
        "socket": 41,
        "socketpair": 53,
        "clone": 56,
        "ptrace": 101,
        "personality": 135,
        "pivot_root": 155,
        "mount": 165,
        "umount2": 166,
        "unshare": 272,
        "setns": 308,
        "process_vm_readv": 310,
        "seccomp": 317,
        "bpf": 321,
        "userfaultfd": 323,
        "io_uring_setup": 425,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "clone3": 435,
        "mount_setattr": 442,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
    },
    "aarch64": {
        "ioctl": 29,
        "socket": 198,
        "socketpair": 199,
        "clone": 220,
        "ptrace": 117,
        "personality": 92,
        "pivot_root": 41,
        "mount": 40,
        "umount2": 39,
        "unshare": 97,
        "setns": 268,
        "process_vm_readv": 270,
        "seccomp": 277,
        "bpf": 280,
        "userfaultfd": 282,
        "io_uring_setup": 425,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "clone3": 435,
        "mount_setattr": 442,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
    },
}


def nr(name: str) -> int:
    """The native syscall number of `name` (raises UnsupportedArchitecture off x86_64/aarch64)."""
    table = _NR_BY_ARCH.get(_MACHINE)
    if table is None:
        raise UnsupportedArchitecture(f"no syscall table for {_MACHINE}")
    return table[name]


def raw_syscall(name: str, *args: int | ctypes.c_void_p | ctypes.c_char_p | None) -> int:
    """syscall(2) with every integer passed as a full 64-bit long (so high bits reach the kernel).

    Returns the raw result; on -1 the errno is in ctypes.get_errno().
    """
    conv: list[object] = []
    for a in args:
        if isinstance(a, int):
            conv.append(ctypes.c_long(a if a < (1 << 63) else a - (1 << 64)))
        else:
            conv.append(a)
    ctypes.set_errno(0)
    return int(libc.syscall(ctypes.c_long(nr(name)), *conv))


def check(rc: int, what: str, err: type[SandboxError]) -> int:
    """Raise `err` with the current errno when a libc/syscall call returned -1."""
    if rc == -1:
        raise err(what, errno=ctypes.get_errno())
    return rc


# prctl options used by several modules (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_GET_SECCOMP = 21


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with unsigned long arguments; returns the raw result (-1 + errno on failure)."""
    ctypes.set_errno(0)
    return int(
        libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        )
    )
