"""Immutable config (DESIGN.md §5): FS_IMMUTABLE_FL on the applied files, and trusted.faramesh.* xattrs.

An immutable inode cannot be written, truncated, renamed, unlinked or linked to, nor can its xattrs
change, by anyone — root included — until CAP_LINUX_IMMUTABLE clears the flag. The xattrs live in the
`trusted.` namespace, which only CAP_SYS_ADMIN can read or write, so `status` can trust them to say which
policy version was applied and whether the config is locked.

Every open is O_NOFOLLOW: root never follows a symlink it did not create (DESIGN.md §2), or a planted
link would make us lock (or unlock) a file of the attacker's choosing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import ImmutableError, ImmutableUnsupported

# linux/fs.h: _IOR('f', 1, long) / _IOW('f', 2, long); the kernel reads and writes an int regardless.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010

XATTR_PREFIX = "trusted.faramesh."
# What a filesystem without the flag (or without trusted xattrs) answers.
_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


def _open(path: str) -> int:
    try:
        # O_NONBLOCK: never hang on a FIFO; O_NOFOLLOW: a symlink is ELOOP, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ImmutableError(f"open {path}", errno=e.errno) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        os.close(fd)
        raise ImmutableError(f"{path} is neither a regular file nor a directory")
    return fd


def get_flags(path: str) -> int:
    fd = _open(path)
    try:
        flags = ctypes.c_int(0)
        if _libc.libc.ioctl(fd, ctypes.c_ulong(FS_IOC_GETFLAGS), ctypes.byref(flags)) == -1:
            e = ctypes.get_errno()
            cls = ImmutableUnsupported if e in _UNSUPPORTED else ImmutableError
            raise cls(f"FS_IOC_GETFLAGS {path}", errno=e)
        return flags.value & 0xFFFFFFFF
    finally:
        os.close(fd)


def _set(path: str, on: bool) -> None:
    fd = _open(path)
    try:
        flags = ctypes.c_int(0)
        if _libc.libc.ioctl(fd, ctypes.c_ulong(FS_IOC_GETFLAGS), ctypes.byref(flags)) == -1:
            e = ctypes.get_errno()
            cls = ImmutableUnsupported if e in _UNSUPPORTED else ImmutableError
            raise cls(f"FS_IOC_GETFLAGS {path}", errno=e)
        new = (flags.value | FS_IMMUTABLE_FL) if on else (flags.value & ~FS_IMMUTABLE_FL)
        if new == flags.value:
            return
        value = ctypes.c_int(new)
        if _libc.libc.ioctl(fd, ctypes.c_ulong(FS_IOC_SETFLAGS), ctypes.byref(value)) == -1:
            e = ctypes.get_errno()
            cls = ImmutableUnsupported if e in _UNSUPPORTED else ImmutableError
            raise cls(f"FS_IOC_SETFLAGS {path} ({'+i' if on else '-i'})", errno=e)
    finally:
        os.close(fd)
    if is_set(path) != on:
        raise ImmutableUnsupported(f"{path}: the filesystem silently ignored the immutable flag")


def set_immutable(path: str) -> None:
    """chattr +i (needs CAP_LINUX_IMMUTABLE; EPERM → ImmutableError, no flag support → ImmutableUnsupported)."""
    _set(path, True)


def clear_immutable(path: str) -> None:
    """chattr -i."""
    _set(path, False)


def is_set(path: str) -> bool:
    return bool(get_flags(path) & FS_IMMUTABLE_FL)


def set_xattr(path: str, key: str, value: str) -> None:
    """trusted.faramesh.<key> = value. Fails with EPERM on an immutable file: clear the flag first."""
    fd = _open(path)
    try:
        os.setxattr(fd, XATTR_PREFIX + key, value.encode())
    except OSError as e:
        cls = ImmutableUnsupported if e.errno in _UNSUPPORTED else ImmutableError
        raise cls(f"setxattr {path} {XATTR_PREFIX}{key}", errno=e.errno) from None
    finally:
        os.close(fd)


def get_xattr(path: str, key: str) -> str | None:
    fd = _open(path)
    try:
        return os.getxattr(fd, XATTR_PREFIX + key).decode()
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        cls = ImmutableUnsupported if e.errno in _UNSUPPORTED else ImmutableError
        raise cls(f"getxattr {path} {XATTR_PREFIX}{key}", errno=e.errno) from None
    finally:
        os.close(fd)


def lock(path: str, version: str, when: str) -> None:
    """Record the applied version, then set the flag — in that order, because xattrs of an immutable
    inode cannot change. Re-locking an already locked file clears the flag for the update first."""
    if is_set(path):
        clear_immutable(path)
    set_xattr(path, "version", version)
    set_xattr(path, "lock", f"locked {when}")
    set_immutable(path)


def unlock(path: str, when: str) -> None:
    """Clear the flag, then record `unlocked <when>` (status shows "config: unlocked since …")."""
    clear_immutable(path)
    set_xattr(path, "lock", f"unlocked {when}")


def state(path: str) -> dict[str, str | bool | None]:
    """What `status` shows: the flag and the two xattrs."""
    return {"immutable": is_set(path), "version": get_xattr(path, "version"), "lock": get_xattr(path, "lock")}


# --- BSD / macOS: chflags(2) ----------------------------------------------------------------------------
# macOS has no FS_IOC_SETFLAGS (and no trusted.* xattrs); the same lock comes from the BSD file flags.
# `uchg` (UF_IMMUTABLE) may be cleared by the owner or root; `schg` (SF_IMMUTABLE), which only root can set,
# only by root and only at securelevel <= 0, so root sets both. os.chflags exists only where chflags(2)
# does: on Linux these functions raise ImmutableUnsupported and the ioctl functions above are the path.
# Never following a symlink is kept: lchflags, and a symlink (or anything but a file or directory) refused.

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class _FlagStat(Protocol):
        @property
        def st_mode(self) -> int: ...

    FlagSetter = Callable[[str, int], None]
    FlagStat = Callable[[str], _FlagStat]

BSD_IMMUTABLE_FLAGS = stat.UF_IMMUTABLE | stat.SF_IMMUTABLE


def bsd_immutable_flags(is_root: bool) -> int:
    """The flags a lock sets: uchg always, schg as well when we are root."""
    return stat.UF_IMMUTABLE | (stat.SF_IMMUTABLE if is_root else 0)


def _lchflags() -> FlagSetter:
    chflags = getattr(os, "chflags", None)
    if chflags is None:
        raise ImmutableUnsupported("chflags(2) does not exist on this platform (Linux: set_immutable, the ioctl)")

    def setter(path: str, flags: int) -> None:
        chflags(path, flags, follow_symlinks=False)

    return setter


def get_flags_bsd(path: str, *, lstat: FlagStat | None = None) -> int:
    """st_flags of `path` itself (never a symlink's target)."""
    try:
        st = (lstat or os.lstat)(path)
    except OSError as e:
        raise ImmutableError(f"lstat {path}", errno=e.errno) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ImmutableError(f"{path} is neither a regular file nor a directory")
    flags = getattr(st, "st_flags", None)
    if not isinstance(flags, int):
        raise ImmutableUnsupported(f"{path}: this platform reports no BSD file flags (st_flags)")
    return flags


def _set_bsd(path: str, on: bool, is_root: bool | None, chflags: FlagSetter | None, lstat: FlagStat | None) -> None:
    setter = chflags if chflags is not None else _lchflags()
    wanted = bsd_immutable_flags(os.geteuid() == 0 if is_root is None else is_root)
    current = get_flags_bsd(path, lstat=lstat)
    new = (current | wanted) if on else (current & ~BSD_IMMUTABLE_FLAGS)
    if new == current:
        return
    try:
        setter(path, new)
    except OSError as e:
        cls = ImmutableUnsupported if e.errno in _UNSUPPORTED else ImmutableError
        what = ("uchg,schg" if wanted & stat.SF_IMMUTABLE else "uchg") if on else "nouchg,noschg"
        raise cls(f"chflags {what} {path}", errno=e.errno) from None
    after = get_flags_bsd(path, lstat=lstat)
    held = (after & wanted) == wanted if on else not after & BSD_IMMUTABLE_FLAGS
    if not held:
        raise ImmutableUnsupported(f"{path}: the filesystem silently ignored the immutable flags")


def set_immutable_bsd(path: str, *, is_root: bool | None = None, chflags: FlagSetter | None = None,
                      lstat: FlagStat | None = None) -> None:
    """chflags uchg (and schg as root); other flags are kept. EPERM → ImmutableError, no flag support →
    ImmutableUnsupported. `is_root` defaults to the effective uid; `chflags`/`lstat` replace the system
    calls (tests on a platform without chflags(2))."""
    _set_bsd(path, True, is_root, chflags, lstat)


def clear_immutable_bsd(path: str, *, is_root: bool | None = None, chflags: FlagSetter | None = None,
                        lstat: FlagStat | None = None) -> None:
    """chflags nouchg,noschg (schg needs root at securelevel <= 0: otherwise EPERM → ImmutableError)."""
    _set_bsd(path, False, is_root, chflags, lstat)


def is_set_bsd(path: str, *, lstat: FlagStat | None = None) -> bool:
    return bool(get_flags_bsd(path, lstat=lstat) & BSD_IMMUTABLE_FLAGS)
