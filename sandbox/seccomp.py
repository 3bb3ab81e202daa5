"""seccomp: build the filter at `apply` (pyseccomp), load the exported BPF per launch (ctypes only).

The filter is a deny list over a default of ALLOW (DESIGN.md §5): an allow list kills every program that
uses a syscall nobody thought of (the public implementation's filter killed every dynamically linked
binary). Denied calls return EPERM so programs see an ordinary failure; `clone3` returns ENOSYS so glibc
falls back to `clone`, whose flags a classic filter can inspect (clone3 passes them in memory, which
seccomp cannot read). A syscall from a non-native ABI (i386 `int 0x80`, x32) kills the process: its
numbers mean different calls and would walk past every rule. SECCOMP_RET_LOG is never used: it *executes*
the call.

Arguments the kernel reads as 32-bit `int`/`unsigned int` (socket family, ioctl request, personality,
clone flags) are compared through a 0xffffffff mask, one rule per value, so a caller who sets bit 32
cannot slip past a 64-bit equality test while the kernel truncates the value back to the denied one.

`load_filter` is on the per-launch path: it imports nothing but ctypes/os/struct (no pyseccomp).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import NoNewPrivsNotSet, SeccompError

TYPE_CHECKING = False  # the per-launch path does not import typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

# linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
BPF_MAXINSNS = 4096

# Address families a sandboxed agent may create (linux/socket.h); all others 0..63 are denied.
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
_ALLOWED_FAMILIES = frozenset({AF_UNIX, AF_INET, AF_INET6})
# AF_MAX is 46 on 6.x; deny up to 63 so a family a newer kernel adds is denied too. Values >= AF_MAX
# that the kernel does not know fail with EAFNOSUPPORT there.
_FAMILY_LIMIT = 64

# CLONE_NEW* flags (linux/sched.h). CLONE_NEWTIME (0x80) is absent: in clone(2) that bit is part of the
# exit signal (CSIGNAL); a time namespace can only come from unshare/clone3, both denied.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_CLONE_NS_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET)

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# Syscalls newer than the libseccomp we may build with: (name, number in the unified table).
_NEW_SYSCALLS = {"open_tree_attr": 467}

MOUNT_FAMILY = (
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "mount_setattr",
)
NAMESPACE_CALLS = ("unshare", "setns")
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")
# Denied unconditionally in `full` only.
FULL_ONLY = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
)
# The "telling" calls the violation filter reports (DESIGN.md §5).
NOTIFY_CALLS = ("ptrace", *MOUNT_FAMILY, *NAMESPACE_CALLS, "bpf", "kexec_load", "kexec_file_load",
                "init_module", "finit_module", "delete_module", *IO_URING)


def notify_calls_for(profile: str) -> tuple[str, ...]:
    """The NOTIFY_CALLS the profile denies outright: only those may be reported (and answered EPERM) by
    the supervisor — a call the profile allows must never start waiting on the supervisor."""
    denied = {*MOUNT_FAMILY, *NAMESPACE_CALLS, *IO_URING}
    if profile == "full":
        denied |= set(FULL_ONLY)
    return tuple(name for name in NOTIFY_CALLS if name in denied)


def build_filter(profile: str, *, notify_calls: bool = False) -> bytes:
    """Compile the profile's filter to classic BPF bytes (runs at `apply`; needs pyseccomp+libseccomp).

    `notify_calls=True` leaves NOTIFY_CALLS out of the EPERM list so the violation filter
    (violation_notify_filter) sees them: the kernel runs every filter and the most severe action wins,
    and ERRNO outranks USER_NOTIF, so a call both filters match would never be reported.
    """
    if profile not in ("full", "minimal"):
        raise SeccompError(f"no seccomp filter for profile {profile!r}")
    import pyseccomp as sc  # build-time only: the per-launch path never imports it

    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    # Non-native ABIs (i386 int 0x80, x32 numbers on x86_64) kill the whole process, not one thread.
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    # libseccomp must not set no_new_privs itself: we only export, and load_filter checks it is set.
    f.set_attr(sc.Attr.CTL_NNP, 0)

    reported = notify_calls_for(profile) if notify_calls else ()

    def deny(name: str, *args: object) -> None:
        if name in reported and not args:
            return
        f.add_rule(eperm, _resolve(sc, name), *args)

    def masked(arg: int, mask: int, value: int) -> object:
        return sc.Arg(arg, sc.MASKED_EQ, mask, value)

    # clone3 carries its flags in a struct seccomp cannot read: ENOSYS makes glibc retry with clone().
    f.add_rule(sc.ERRNO(errno.ENOSYS), _resolve(sc, "clone3"))
    for flag in _CLONE_NS_FLAGS:
        deny("clone", masked(0, flag, flag))
    for name in (*NAMESPACE_CALLS, *MOUNT_FAMILY, *IO_URING):
        deny(name)
    for family in range(_FAMILY_LIMIT):
        if family not in _ALLOWED_FAMILIES:
            deny("socket", masked(0, 0xFFFFFFFF, family))
            deny("socketpair", masked(0, 0xFFFFFFFF, family))
    if profile == "full":
        for name in FULL_ONLY:
            deny(name)
        for request in (TIOCSTI, TIOCLINUX):
            deny("ioctl", masked(1, 0xFFFFFFFF, request))
        # personality(2) takes an unsigned int; allow only 0 (PER_LINUX) and 0xffffffff (query).
        # libseccomp allows one comparison per argument per rule, so "neither 0 nor all-ones" is spelled
        # as 62 masked rules: bit 31 set with some lower bit clear, or bit 31 clear with some lower bit set.
        for bit in range(31):
            deny("personality", masked(0, 0x80000000 | (1 << bit), 0x80000000))
            deny("personality", masked(0, 0x80000000 | (1 << bit), 1 << bit))
    return _export(f)


def violation_notify_filter(profile: str) -> bytes:
    """A second filter returning SECCOMP_RET_USER_NOTIF for notify_calls_for(profile) (pair it with
    build_filter(profile, notify_calls=True)).

    Loaded with load_filter(..., new_listener=True), it yields a listener fd for the supervisor, which
    records a violation and answers EPERM (see respond_eperm). With no listener left (the supervisor is
    gone) the kernel fails the call with ENOSYS: it never executes it.
    """
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    f.set_attr(sc.Attr.CTL_NNP, 0)
    for name in notify_calls_for(profile):
        f.add_rule(sc.NOTIFY, _resolve(sc, name))
    return _export(f)


def syscall_name(number: int) -> str:
    """The native syscall's name for a report (supervisor side: pyseccomp is fine there)."""
    import pyseccomp as sc

    try:
        name = sc.resolve_syscall(0, number)
    except (ValueError, TypeError):
        return f"syscall_{number}"
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    return text or f"syscall_{number}"


def _resolve(sc: Any, name: str) -> int:
    number = int(sc.resolve_syscall(0, name))
    if number < 0:
        number = _NEW_SYSCALLS.get(name, -1)
    if number < 0:
        raise SeccompError(f"libseccomp does not know syscall {name!r}")
    return number


def _export(f: Any) -> bytes:
    class _Fd:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

    fd = os.memfd_create("faramesh-seccomp", os.MFD_CLOEXEC)
    try:
        f.export_bpf(_Fd(fd))
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_filter(bpf: bytes, *, new_listener: bool = False) -> int | None:
    """Install `bpf` on the calling thread (S8). Returns the listener fd when `new_listener`.

    PR_SET_NO_NEW_PRIVS must already be set (S7): a filter loaded without it could be combined with a
    setuid exec to confuse a privileged program, so the kernel demands it of unprivileged callers, and
    we demand it of everyone so the root path cannot skip S7 by accident.
    """
    if len(bpf) == 0 or len(bpf) % 8 or len(bpf) // 8 > BPF_MAXINSNS:
        raise SeccompError(f"BPF program of {len(bpf)} bytes is not 1..{BPF_MAXINSNS} instructions")
    if _libc.prctl(_libc.PR_GET_NO_NEW_PRIVS) != 1:
        raise NoNewPrivsNotSet("PR_SET_NO_NEW_PRIVS is not set: call caps.set_no_new_privs() first")
    # A filter binds only the calling thread (TSYNC aside); a second thread would stay unfiltered. The
    # launch sequence has none (DESIGN.md §5) — check rather than trust.
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = 1
    if threads != 1:
        raise SeccompError(f"refusing to load a filter in a process with {threads} threads")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if new_listener else 0
    rc = _libc.raw_syscall("seccomp", SECCOMP_SET_MODE_FILTER, flags, ctypes.c_void_p(ctypes.addressof(prog)))
    _libc.check(rc, "seccomp(SECCOMP_SET_MODE_FILTER)", SeccompError)
    return rc if new_listener else None


def instructions(bpf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Decode classic BPF: (code, jt, jf, k) per instruction (for audits and tests)."""
    for off in range(0, len(bpf), 8):
        code, jt, jf, k = struct.unpack_from("=HBBI", bpf, off)
        yield code, jt, jf, k


def return_actions(bpf: bytes) -> set[int]:
    """The action words of every `ret #k` in the program (BPF_RET|BPF_K == 0x06)."""
    return {k for code, _jt, _jf, k in instructions(bpf) if code == 0x06}


# --- user notification responder (supervisor side, stdlib + ctypes) -----------------------------------

class _SeccompData(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_int),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


class SeccompNotif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", _SeccompData)]


class _SeccompNotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


def _iowr(nr: int, size: int) -> int:
    # _IOWR('!', nr, size): dir=3 (read|write) << 30 | size << 16 | '!' << 8 | nr
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


SECCOMP_IOCTL_NOTIF_RECV = _iowr(0, ctypes.sizeof(SeccompNotif))
SECCOMP_IOCTL_NOTIF_SEND = _iowr(1, ctypes.sizeof(_SeccompNotifResp))


def receive_violation(listener_fd: int) -> SeccompNotif | None:
    """The pending notified syscall on `listener_fd` (call when poll says POLLIN).

    None when there was none after all (the caller died between poll and here, or a signal cut the
    wait short): the kernel blocks in NOTIF_RECV whatever O_NONBLOCK says, so a caller that must not
    hang arms an interval timer around this call (the supervisor does)."""
    notif = SeccompNotif()
    rc = _libc.libc.ioctl(listener_fd, ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_RECV), ctypes.byref(notif))
    if rc == -1 and ctypes.get_errno() in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
        return None
    _libc.check(rc, "SECCOMP_IOCTL_NOTIF_RECV", SeccompError)
    return notif


def respond_eperm(listener_fd: int, notif: SeccompNotif) -> None:
    """Fail the notified call with EPERM (never SECCOMP_USER_NOTIF_FLAG_CONTINUE: it would execute it)."""
    resp = _SeccompNotifResp(id=notif.id, val=0, error=-errno.EPERM, flags=0)
    rc = _libc.libc.ioctl(listener_fd, ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_SEND), ctypes.byref(resp))
    if rc == -1 and ctypes.get_errno() != errno.ENOENT:  # ENOENT: the caller died meanwhile
        raise SeccompError("SECCOMP_IOCTL_NOTIF_SEND", errno=ctypes.get_errno())
