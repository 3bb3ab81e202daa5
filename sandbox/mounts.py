"""The sandbox's file-system view (S3, S5): a new root on a tmpfs, built from an allow-list, then pivot_root.

Runs in C2, which is PID 1 of the new PID namespace and owns a new mount namespace (both owned by the
agent's user namespace). Nothing here can reach the host's mount table: S3 made every mount a slave and
build_root() makes them private before touching anything.

What the agent sees (everything else of the host is simply absent):
- system dirs (/usr, /bin, /sbin, /lib*) read-only, recursively (submounts too), nosuid, nodev;
  on merged-/usr hosts /bin, /lib… are symlinks and are recreated as symlinks;
- /etc: a tmpfs holding only ETC_ALLOW (loader, TLS roots, name service, time zone) bound read-only, and
  synthesized passwd/group/hostname. Binding the host /etc whole would show whatever an administrator
  left world-readable there (database passwords in service configs, /etc/environment proxies, cloud-init
  metadata, …) — an allow-list shows what programs need and nothing else, and /etc/shadow, ssh host
  keys and /etc/ssl/private simply do not exist;
- the stack dir read-only, the workspace read-write (also when nested in the stack dir), extra
  read-only paths bound over themselves after that (so a file inside the workspace can be re-protected),
  and hidden paths (`.faramesh/`, state dirs) masked by an empty, mode-000, read-only mount;
- fresh tmpfs at /tmp, /var/tmp, /run, /home and $HOME (no host home, no host sockets);
- the agent's socket directory read-only at /run/faramesh;
- /dev: null zero full random urandom tty bound from the host, a new devpts instance, /dev/shm tmpfs;
- a fresh /proc for the new PID namespace, with /proc/sys, sysrq-trigger, irq and bus read-only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from faramesh.sandbox import _libc
from faramesh.sandbox.errors import MountError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from faramesh.sandbox.spec import SandboxSpec

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_FDCWD = -100
AT_RECURSIVE = 0x8000

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_ALLOW = (
    "alternatives", "bash.bashrc", "ca-certificates.conf", "debian_version", "gai.conf", "host.conf", "hosts",
    "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias", "localtime", "magic", "mime.types",
    "nsswitch.conf", "os-release", "profile", "protocols", "python3", "python3.11", "python3.12", "python3.13",
    "resolv.conf", "services", "ssl/certs", "ssl/openssl.cnf", "timezone",
)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus")
SOCKET_MOUNTPOINT = "/run/faramesh"
# A floor under the spec (DESIGN.md §2): whatever `read_only_paths`/`hidden_paths` say, the stack's config
# is never writable and `.faramesh/` never visible. The read-only ones matter when the workspace is the
# stack dir (or holds it): `.git` whole, because read-only binds on `.git/hooks` alone are defeated by
# renaming `.git` itself (a directory that merely *contains* mount points can be renamed).
STACK_READ_ONLY = ("governance.fms", ".git")
STACK_HIDDEN = (".faramesh",)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    ctypes.set_errno(0)
    rc = _libc.libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )
    _libc.check(rc, f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x})", MountError)


def umount2(target: str, flags: int = 0) -> None:
    _libc.check(_libc.libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount2({target!r})", MountError)


def make_rslave(path: str = "/") -> None:
    """S3: nothing mounted in this namespace propagates back to the host (host mounts still come in)."""
    mount(None, path, None, MS_REC | MS_SLAVE)


def make_rprivate(path: str = "/") -> None:
    """No propagation in either direction for the mounts at and below `path` (this namespace's copy)."""
    mount(None, path, None, MS_REC | MS_PRIVATE)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def set_attrs_recursive(path: str, attrs: int) -> None:
    """Set MOUNT_ATTR_* on the mount at `path` and every submount (mount_setattr, AT_RECURSIVE).

    One syscall covers a whole tree, including submounts a per-mount remount loop could miss. Kernels
    before 5.12 (ENOSYS) fall back to remounting each mount listed in /proc/self/mountinfo.
    """
    attr = _MountAttr(attrs, 0, 0, 0)
    rc = _libc.raw_syscall("mount_setattr", AT_FDCWD, ctypes.c_char_p(path.encode()), AT_RECURSIVE,
                           ctypes.c_void_p(ctypes.addressof(attr)), ctypes.sizeof(attr))
    if rc == -1 and ctypes.get_errno() == errno.ENOSYS:
        remount_fallback(path, attrs)
        return
    _libc.check(rc, f"mount_setattr({path!r}, {attrs:#x})", MountError)


_ATTR_TO_MS = {MOUNT_ATTR_RDONLY: MS_RDONLY, MOUNT_ATTR_NOSUID: MS_NOSUID, MOUNT_ATTR_NODEV: MS_NODEV,
               MOUNT_ATTR_NOEXEC: MS_NOEXEC}
# statvfs f_flag bits that are per-mount flags: in a user namespace they are *locked* when inherited, and a
# remount that omits one is EPERM, so the fallback carries the current ones over.
_ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
             4096: MS_RELATIME}


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def submounts(path: str) -> list[str]:
    """Mount points at or below `path`, parents first (from /proc/self/mountinfo)."""
    prefix = path.rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == path or mp.startswith(prefix):
                found.append(mp)
    return sorted(set(found), key=lambda p: p.count("/"))


def remount_fallback(path: str, attrs: int) -> None:
    """Per-mount MS_REMOUNT|MS_BIND for kernels without mount_setattr, keeping locked flags."""
    wanted = 0
    for attr, ms in _ATTR_TO_MS.items():
        if attrs & attr:
            wanted |= ms
    for mp in submounts(path):
        f_flag = os.statvfs(mp).f_flag
        current = 0
        for st_flag, ms in _ST_TO_MS.items():
            if f_flag & st_flag:
                current |= ms
        mount(None, mp, None, MS_REMOUNT | MS_BIND | current | wanted)


def pivot_root(new_root: str) -> None:
    """Make `new_root` (a mount point) the root and detach the old one entirely.

    pivot_root(".", ".") stacks the old root on top of the new one at "/"; the umount2(MNT_DETACH) of "."
    then removes the old root and every host mount under it from this namespace, so no path — not even
    through a leaked cwd — leads back to the host tree. No put_old directory is needed, so the new root can
    already be read-only.
    """
    os.chdir(new_root)
    rc = _libc.raw_syscall("pivot_root", ctypes.c_char_p(b"."), ctypes.c_char_p(b"."))
    _libc.check(rc, f"pivot_root({new_root!r})", MountError)
    umount2(".", MNT_DETACH)
    os.chdir("/")


class _Source:
    """An O_PATH handle to a host path, opened *before* the base tmpfs hides anything."""

    def __init__(self, path: str, *, nofollow: bool = False, directory: bool = False, optional: bool = False) -> None:
        self.path = path
        self.fd = -1
        self.link: str | None = None
        self.is_dir = False
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0) | (os.O_DIRECTORY if directory else 0)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) and not nofollow:
                self.link = os.readlink(path)  # recreated as a symlink in the new root
                return
            self.fd = os.open(path, flags)
            mode = os.fstat(self.fd).st_mode
            if stat.S_ISLNK(mode):  # O_PATH|O_NOFOLLOW opens the link itself instead of failing
                self.close()
                raise MountError(f"bind source {path} is a symlink", errno=errno.ELOOP)
            self.is_dir = stat.S_ISDIR(mode)
        except FileNotFoundError:
            if not optional:
                raise MountError(f"bind source {path}", errno=errno.ENOENT) from None
        except OSError as e:
            # ELOOP from O_NOFOLLOW: a symlink where a real directory belongs (never follow it as root).
            raise MountError(f"bind source {path}", errno=e.errno) from None

    @property
    def exists(self) -> bool:
        return self.fd >= 0 or self.link is not None

    @property
    def proc_path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _mkdirs(path: str, mode: int = 0o755) -> None:
    try:
        os.mkdir(path, mode)  # the common case: the parent exists (one syscall)
    except OSError:
        os.makedirs(path, mode=mode, exist_ok=True)  # missing parents, or already there (checked as before)


def _touch(path: str, mode: int = 0o644) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:
        _mkdirs(os.path.dirname(path))
        fd = os.open(path, flags, mode)
    os.close(fd)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _bind(src: _Source, target: str, *, readonly: bool, nodev: bool = True) -> None:
    """Bind `src` at `target` (created as a dir or an empty file), recursively, then set its attributes."""
    if src.link is not None:
        _mkdirs(os.path.dirname(target))
        os.symlink(src.link, target)
        return
    if src.is_dir:
        _mkdirs(target)
    else:
        _touch(target)
    mount(src.proc_path, target, None, MS_BIND | MS_REC)
    attrs = MOUNT_ATTR_NOSUID | (MOUNT_ATTR_NODEV if nodev else 0) | (MOUNT_ATTR_RDONLY if readonly else 0)
    set_attrs_recursive(target, attrs)


def _tmpfs(target: str, mode: int, size: str = "64m", *, readonly: bool = False) -> None:
    _mkdirs(target)
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    mount("tmpfs", target, "tmpfs", flags, f"mode={mode:o},size={size}")


def _passwd(uid: int, gid: int, home: str) -> tuple[str, str]:
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"agent:x:{uid}:{gid}:faramesh agent:{home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nagent:x:{gid}:\nnogroup:x:65534:\n"
    return passwd, group


def build_root(spec: SandboxSpec, *, base: str = "/tmp", system_dirs: tuple[str, ...] = SYSTEM_DIRS) -> None:
    """S5: build the new root under `base`, mount /proc, pivot into it and cd to the workspace.

    Preconditions (the launch sequence's job): we are C2, PID 1 of a new PID namespace, in a new mount
    namespace owned by the agent's user namespace, with our capabilities there.
    """
    # 1. Private first: from here on nothing we mount leaks out and nothing the host mounts leaks in
    #    (a host mount appearing under a read-only bind would arrive read-write).
    make_rprivate("/")

    # 2. Open every source while the host tree is whole: the base tmpfs below may cover some of them
    #    (the workspace may well live under /tmp). The opens run as the agent's uid, so we can only ever
    #    bind what the agent could reach; O_NOFOLLOW on the spec's own paths refuses a symlink planted
    #    where a directory belongs.
    sources: list[_Source] = []

    def src(path: str, **kw: bool) -> _Source:
        s = _Source(path, **kw)
        sources.append(s)
        return s

    try:
        system = [src(d, optional=True) for d in system_dirs]
        etc = [src("/etc/" + name, optional=True) for name in ETC_ALLOW]
        devices = [src("/dev/" + name, optional=True) for name in DEVICES]
        stack = src(spec.stack_dir, nofollow=True, directory=True)
        workspace = src(spec.workspace, nofollow=True, directory=True)
        ro_paths = set(spec.read_only_paths)
        ws_prefix = spec.workspace.rstrip("/") + "/"
        if spec.stack_dir == spec.workspace or spec.stack_dir.startswith(ws_prefix):
            ro_paths.update(f"{spec.stack_dir}/{name}" for name in STACK_READ_ONLY)
        extra_ro = [src(p, nofollow=True, optional=True) for p in sorted(ro_paths, key=_depth)]
        sockets = src(spec.socket_dir, nofollow=True, directory=True) if spec.socket_dir else None
        hidden = sorted({*spec.hidden_paths, *(f"{spec.stack_dir}/{name}" for name in STACK_HIDDEN)}, key=_depth)

        # 3. The new root: a small tmpfs, read-only once populated (step 8).
        root = base
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=8m")

        # 4. Private scratch space first, so the binds below (a stack under /home, a workspace under /tmp)
        #    land on top of it instead of being covered by it; $HOME after /home, which usually holds it.
        _tmpfs(root + "/tmp", 0o1777)
        _tmpfs(root + "/var/tmp", 0o1777)
        _tmpfs(root + "/run", 0o755, "4m")
        _tmpfs(root + "/home", 0o755, "4m")
        _tmpfs(root + spec.home, 0o700)

        for s in system:
            if s.exists:
                _bind(s, root + s.path, readonly=True)
        _mkdirs(root + "/etc")
        for s in etc:
            if s.exists:
                _bind(s, root + s.path, readonly=True)
        passwd, group = _passwd(spec.inside_uid, spec.inside_gid, spec.home)
        _write(root + "/etc/passwd", passwd)
        _write(root + "/etc/group", group)
        _write(root + "/etc/hostname", spec.hostname + "\n")

        # 5. Stack read-only, then the workspace read-write over it (parents before children), then the
        #    extra read-only paths, which may sit inside the workspace and so must come after it.
        #    Shallower first: a workspace that holds the stack dir must not cover the stack's read-only bind.
        for s in sorted((stack, workspace), key=lambda x: _depth(x.path)):
            _bind(s, root + s.path, readonly=s is stack)
        for s in extra_ro:
            if s.exists:
                _bind(s, root + s.path, readonly=True)
        if sockets is not None:
            _bind(sockets, root + SOCKET_MOUNTPOINT, readonly=True)

        # 6. /dev: device nodes cannot be created in a user namespace (and a tmpfs made here is nodev), so
        #    the few harmless ones are bind-mounted from the host; a new devpts instance gives ptys that
        #    cannot reach the host's terminals.
        _tmpfs(root + "/dev", 0o755, "1m")
        for s in devices:
            if s.exists:
                _bind(s, root + s.path, readonly=False, nodev=False)
        _mkdirs(root + "/dev/pts")
        mount("devpts", root + "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", root + "/dev/ptmx")
        _tmpfs(root + "/dev/shm", 0o1777)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{root}/dev/{name}")

        # 7. /proc for the new PID namespace. The kernel allows it only while a full, uncovered /proc is
        #    visible in this mount namespace (mount_too_revealing), i.e. before the old root goes away.
        _mkdirs(root + "/proc")
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for name in PROC_READONLY:
            p = f"{root}/proc/{name}"
            if os.path.exists(p):
                mount(p, p, None, MS_BIND | MS_REC)
                set_attrs_recursive(p, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)

        # 8. Hide what must be invisible (after every bind, so nothing re-exposes it), then freeze the
        #    tmpfs skeletons (/ and /dev) read-only: no new top-level names for the agent to plant.
        #    A hidden path that has become a symlink is refused: mount(2) would follow it and mask
        #    something else while the name stays readable.
        empty = root + "/.faramesh-empty"
        _write(empty, "", 0)
        for h in hidden:
            target = root + h
            try:
                st = os.lstat(target)
            except FileNotFoundError:
                continue  # nothing there, nothing to hide
            if stat.S_ISLNK(st.st_mode):
                raise MountError(f"hidden path {h} is a symlink", errno=errno.ELOOP)
            if stat.S_ISDIR(st.st_mode):
                mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "mode=000,size=4k")
            else:
                mount(empty, target, None, MS_BIND)
                set_attrs_recursive(target, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        _set_one(root + "/dev", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
        _set_one(root, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    finally:
        for s in sources:
            s.close()

    # 9. Switch roots and drop the host tree, then start in the workspace.
    pivot_root(root)
    os.chdir(spec.workspace)


def _set_one(path: str, attrs: int) -> None:
    """mount_setattr on exactly one mount (no AT_RECURSIVE): the binds below keep their own attributes."""
    attr = _MountAttr(attrs, 0, 0, 0)
    rc = _libc.raw_syscall("mount_setattr", AT_FDCWD, ctypes.c_char_p(path.encode()), 0,
                           ctypes.c_void_p(ctypes.addressof(attr)), ctypes.sizeof(attr))
    if rc == -1 and ctypes.get_errno() == errno.ENOSYS:
        flags = 0
        for bit, ms in _ATTR_TO_MS.items():
            if attrs & bit:
                flags |= ms
        mount(None, path, None, MS_REMOUNT | MS_BIND | flags)
        return
    _libc.check(rc, f"mount_setattr({path!r})", MountError)


def _depth(path: str) -> int:
    return path.rstrip("/").count("/")
