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
