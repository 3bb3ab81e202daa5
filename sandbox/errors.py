"""Typed errors of the sandbox layer.

Every error carries a stable `code` (what callers, reports and tests match on) and, when a syscall
failed, its `errno`. Messages are for humans and may change; codes do not.
"""

from __future__ import annotations

import os


class SandboxError(Exception):
    """Base class: a sandbox mechanism could not be applied (the launch must fail closed)."""

    code = "SANDBOX_ERROR"

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        if errno is not None:
            message = f"{message}: [{errno}] {os.strerror(errno)}"
        super().__init__(message)
        self.errno = errno


class SpecError(SandboxError):
    """A SandboxSpec is inconsistent (a bug in the caller, found before any privileged step)."""

    code = "SANDBOX_SPEC_INVALID"


class UnsupportedArchitecture(SandboxError):
    """This CPU architecture has no syscall table here."""

    code = "SANDBOX_ARCH_UNSUPPORTED"


class SeccompError(SandboxError):
    """Building or loading the seccomp filter failed."""

    code = "SANDBOX_SECCOMP_FAILED"


class NoNewPrivsNotSet(SeccompError):
    """load_filter() was called before PR_SET_NO_NEW_PRIVS (the caller skipped S7)."""

    code = "SANDBOX_NO_NEW_PRIVS_NOT_SET"


class LandlockUnavailable(SandboxError):
    """The kernel has no usable Landlock (not built, disabled at boot, or ABI too old)."""

    code = "SANDBOX_LANDLOCK_UNAVAILABLE"


class LandlockError(SandboxError):
    """Landlock is there but a ruleset call failed."""

    code = "SANDBOX_LANDLOCK_FAILED"


class CapsError(SandboxError):
    """Dropping capabilities / setting securebits or prctl flags failed."""

    code = "SANDBOX_CAPS_FAILED"


class NamespaceError(SandboxError):
    """unshare/setns/id maps/loopback/hostname failed."""

    code = "SANDBOX_NAMESPACE_FAILED"


class MountError(SandboxError):
    """Building the sandbox root failed."""

    code = "SANDBOX_MOUNT_FAILED"


class CgroupError(SandboxError):
    """Setting rlimits, oom_score_adj or joining a cgroup failed."""

    code = "SANDBOX_CGROUP_FAILED"


class EnvDenied(SandboxError):
    """A variable the caller insisted on (`extra`) matches a deny glob: refuse rather than leak it."""

    code = "SANDBOX_ENV_DENIED"


class ImmutableUnsupported(SandboxError):
    """The filesystem cannot hold FS_IMMUTABLE_FL (or trusted.* xattrs)."""

    code = "SANDBOX_IMMUTABLE_UNSUPPORTED"


class ImmutableError(SandboxError):
    """Setting/clearing the immutable flag or the trusted.faramesh.* xattrs failed otherwise."""

    code = "SANDBOX_IMMUTABLE_FAILED"
