"""Landlock (S6): file-system, TCP-port and scope rules the kernel enforces on this process and its children.

Raw syscalls through ctypes (landlock_create_ruleset 444, landlock_add_rule 445, landlock_restrict_self
446 — the same numbers on x86_64 and aarch64). The ABI the running kernel speaks decides which access
rights can be *handled*; asking for a right the ABI lacks is EINVAL, so the handled set is masked to the
ABI, and the attribute struct is passed at the size that ABI knows. Rules go on paths opened O_PATH
*after* the final mount tree exists (a rule binds to the inode reached at open time, not to a name).

Landlock that is absent is refused with LandlockUnavailable, never skipped: a profile that needs it must
not run without it (preflight reports the ABI beforehand).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import LandlockError, LandlockUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2

# linux/landlock.h, file-system rights (ABI 1 unless noted).
ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5
ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_ABI1 = (1 << 13) - 1
# Rights that make sense on a non-directory: anything else on a file rule is EINVAL.
_FS_FILE_RIGHTS = (
    ACCESS_FS_EXECUTE | ACCESS_FS_WRITE_FILE | ACCESS_FS_READ_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV
)
READ = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
READ_EXEC = READ | ACCESS_FS_EXECUTE
READ_WRITE = (1 << 16) - 1  # every right; masked to the ABI below


def abi_version() -> int:
    """The Landlock ABI of the running kernel, or 0 when Landlock is not built or not enabled."""
    ctypes.set_errno(0)
    rc = _libc.raw_syscall("landlock_create_ruleset", None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if rc < 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise LandlockError("landlock_create_ruleset(VERSION)", errno=e)
    return rc


def handled_fs_rights(abi: int) -> int:
    """The file-system rights an ABI can handle (REFER from 2, TRUNCATE from 3, IOCTL_DEV from 5)."""
    rights = _FS_ABI1
    if abi >= 2:
        rights |= ACCESS_FS_REFER
    if abi >= 3:
        rights |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        rights |= ACCESS_FS_IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    # The kernel declares this struct __attribute__((packed)): 12 bytes, not 16. Passing an unpacked
    # struct puts parent_fd at the wrong offset (one of the public implementation's bad arguments).
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def restrict(
    read_only: Iterable[str],
    read_write: Iterable[str],
    read_exec: Iterable[str] = (),
    *,
    tcp_connect: Iterable[int] | None = None,
    tcp_bind: Iterable[int] | None = None,
    scope: bool = True,
    missing_ok: bool = False,
) -> dict[str, int]:
    """Confine this process (and every later child) to the given paths; returns what was enforced.

    Paths not listed get no access at all. `tcp_connect`/`tcp_bind` (ABI 4+) handle TCP and allow only
    the listed ports; None leaves TCP unhandled (the network namespace already isolates). `scope` (ABI 6+)
    forbids connecting to abstract unix sockets and signalling processes outside this domain.
    """
    abi = abi_version()
    if abi < 1:
        raise LandlockUnavailable("the kernel has no Landlock (CONFIG_SECURITY_LANDLOCK / lsm= boot option)")
    fs = handled_fs_rights(abi)
    net = 0
    if abi >= 4 and (tcp_connect is not None or tcp_bind is not None):
        net = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope and abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    # The struct grew with the ABI (8 bytes to ABI 3, 16 from ABI 4, 24 from ABI 6); pass the size the
    # kernel knows so an older kernel does not reject trailing fields with E2BIG.
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _libc.raw_syscall("landlock_create_ruleset", ctypes.c_void_p(ctypes.addressof(attr)), size, 0)
    _libc.check(ruleset, "landlock_create_ruleset", LandlockError)
    try:
        for paths, wanted in ((read_only, READ), (read_exec, READ_EXEC), (read_write, READ_WRITE)):
            for path in paths:
                _add_path_rule(ruleset, path, wanted & fs, missing_ok)
        if net:
            for ports, right in ((tcp_connect or (), ACCESS_NET_CONNECT_TCP), (tcp_bind or (), ACCESS_NET_BIND_TCP)):
                for port in ports:
                    rule = _NetPortAttr(right, port)
                    rc = _libc.raw_syscall("landlock_add_rule", ruleset, LANDLOCK_RULE_NET_PORT,
                                           ctypes.c_void_p(ctypes.addressof(rule)), 0)
                    _libc.check(rc, f"landlock_add_rule(port {port})", LandlockError)
        # Needs no_new_privs or CAP_SYS_ADMIN in the current user namespace; inside the sandbox's own
        # user namespace (S6) C2 still holds the latter, and S7 sets the former right after.
        rc = _libc.raw_syscall("landlock_restrict_self", ruleset, 0)
        _libc.check(rc, "landlock_restrict_self", LandlockError)
    finally:
        os.close(ruleset)
    return {"abi": abi, "handled_fs": fs, "handled_net": net, "scoped": scoped}


def _add_path_rule(ruleset: int, path: str, access: int, missing_ok: bool) -> None:
    try:
        # O_PATH: a handle to the inode without read permission on it; CLOEXEC: never leak to the agent.
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return
        raise LandlockError(f"rule path {path}", errno=errno.ENOENT) from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FS_FILE_RIGHTS
        attr = _PathBeneathAttr(access, fd)
        rc = _libc.raw_syscall("landlock_add_rule", ruleset, LANDLOCK_RULE_PATH_BENEATH,
                               ctypes.c_void_p(ctypes.addressof(attr)), 0)
        _libc.check(rc, f"landlock_add_rule({path})", LandlockError)
    finally:
        os.close(fd)
