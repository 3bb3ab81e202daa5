"""Escape probe, second set (issue 4 §4 items 1, 4, 6-10, 12-20): runs as the agent inside the sandbox,
stdlib only, never imported by pytest.

usage: python3 probe_escape_more.py CONFIG_JSON MARKER

Like probe_escape.py it first checks that it is confined (its own PID namespace, NoNewPrivs 1, Seccomp 2,
all five capability sets zero, Landlock enforced) and REFUSES to attempt anything otherwise: it prints
{"confined": false, ...} and exits 3. Otherwise it runs the attempts of cfg["mode"] ("main" or "limits"),
prints one JSON line (errno per attempt, 0 = it succeeded) and exits 0 ("limits" first waits for stdin to
close, so the test can time the host while the fork bomb's children are alive).

Every call that must be refused is made with arguments the kernel would reject (EINVAL/EFAULT/EBADF/…)
if it ever got past the filter: kexec_load never with 0 segments (that would unload a loaded image).
"""

import ctypes
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time

from probe_common import append, confinement, err, read  # beside this file in the sandbox

NR = {
    "x86_64": {
        "ioctl": 16, "socket": 41, "socketpair": 53, "clone": 56, "personality": 135, "pivot_root": 155,
        "mount": 165, "umount2": 166, "init_module": 175, "delete_module": 176, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "perf_event_open": 298, "open_by_handle_at": 304,
        "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320,
        "bpf": 321, "userfaultfd": 323, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    },
    "aarch64": {
        "ioctl": 29, "socket": 198, "socketpair": 199, "clone": 220, "personality": 92, "pivot_root": 41,
        "mount": 40, "umount2": 39, "init_module": 105, "delete_module": 106, "kexec_load": 104,
        "add_key": 217, "request_key": 218, "keyctl": 219, "perf_event_open": 241, "open_by_handle_at": 265,
        "process_vm_readv": 270, "process_vm_writev": 271, "finit_module": 273, "kexec_file_load": 294,
        "bpf": 280, "userfaultfd": 282, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    },
}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
AT_FDCWD = -100
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
READ_IMPLIES_EXEC = 0x0400000


def call(name, *args):
    """(return value, errno): every integer argument passed as a full 64-bit long."""
    conv = [ctypes.c_long(a if a < (1 << 63) else a - (1 << 64)) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(NR[name]), *conv)
    return rc, (ctypes.get_errno() if rc == -1 else 0)


def raw(name, *args):
    return call(name, *args)[1]


def cstr(s):
    return ctypes.c_char_p(s.encode())


# --- main -------------------------------------------------------------------------------------------------

def credentials(cfg, res):
    sentinel = cfg["sentinel"].encode()
    rels = (".config/gcloud/credentials.db", ".config/gcloud/application_default_credentials.json",
            ".config/gcloud/access_tokens.db", ".kube/config", ".git-credentials")
    for who, home in (("user", cfg["user_home"]), ("root", cfg["root_home"]), ("/root", "/root"),
                      ("$HOME", os.environ.get("HOME", "/nonexistent"))):
        for rel in rels:
            try:
                data = read(os.path.join(home, rel))
                res[f"read {who} {rel}"] = "LEAK" if sentinel in data else "readable"
            except OSError as e:
                res[f"read {who} {rel}"] = e.errno
        res[f"list {who} .config/gcloud"] = err(lambda h=home: os.listdir(os.path.join(h, ".config/gcloud")))


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def process_vm(res):
    buf = ctypes.create_string_buffer(b"faramesh", 16)
    local = _Iovec(ctypes.addressof(buf), 16)
    remote = _Iovec(ctypes.addressof(buf), 16)  # the same address: valid in ourselves
    for who, pid in (("self", os.getpid()), ("pid 1", 1), ("parent", os.getppid())):
        res[f"process_vm_readv {who}"] = raw("process_vm_readv", pid, ctypes.byref(local), 1, ctypes.byref(remote),
                                             1, 0)
    res["process_vm_writev self"] = raw("process_vm_writev", os.getpid(), ctypes.byref(local), 1,
                                        ctypes.byref(remote), 1, 0)


def links(cfg, res):
    ws = cfg["workspace"]
    targets = {"policy.json": cfg["policy"], "host file": cfg["host_secret"], "shadow": "/etc/shadow"}
    for name, target in targets.items():
        link = os.path.join(ws, f"sym-{name.replace(' ', '_')}")
        res[f"symlink {name}"] = err(lambda t=target, lk=link: os.symlink(t, lk))
        try:
            data = read(link)
            res[f"read via symlink {name}"] = "LEAK" if cfg["sentinel"].encode() in data else "readable"
        except OSError as e:
            res[f"read via symlink {name}"] = e.errno
        hard = os.path.join(ws, f"hard-{name.replace(' ', '_')}")
        res[f"hardlink {name}"] = err(lambda t=target, h=hard: os.link(t, h))
    # A hard link to the read-only governance file (from the read-write workspace) would be writable.
    res["hardlink governance.fms"] = err(lambda: os.link(cfg["governance"], os.path.join(ws, "hard-gov")))


def mount_family(cfg, res):
    ws = cfg["workspace"]
    res["umount2 /usr"] = raw("umount2", cstr("/usr"), 2)
    res["umount2 stack"] = raw("umount2", cstr(cfg["stack"]), 2)
    res["mount --bind / ws"] = raw("mount", cstr("/usr"), cstr(ws), None, 4096 | 16384, None)
    res["mount remount rw /usr"] = raw("mount", None, cstr("/usr"), None, 32 | 4096, None)
    res["pivot_root"] = raw("pivot_root", cstr("."), cstr("."))
    res["fsopen tmpfs"] = raw("fsopen", cstr("tmpfs"), 1)  # FSOPEN_CLOEXEC
    res["fspick /usr"] = raw("fspick", AT_FDCWD, cstr("/usr"), 1)
    res["fsconfig bad fd"] = raw("fsconfig", -1, 7, None, None, 0)  # FSCONFIG_CMD_CREATE on fd -1
    res["fsmount bad fd"] = raw("fsmount", -1, 0, 0)
    res["open_tree clone /usr"] = raw("open_tree", AT_FDCWD, cstr("/usr"), 1 | 0x80000)  # OPEN_TREE_CLONE|CLOEXEC
    res["move_mount"] = raw("move_mount", -1, cstr(""), AT_FDCWD, cstr(ws), 4)  # F_EMPTY_PATH on fd -1
    attr = (ctypes.c_uint64 * 4)(0, 1, 0, 0)  # attr_clr = MOUNT_ATTR_RDONLY
    res["mount_setattr clear ro /usr"] = raw("mount_setattr", AT_FDCWD, cstr("/usr"), 0x8000, ctypes.byref(attr), 32)
    sub = cfg.get("ro_submount")
    if sub:
        res["submount is a mount"] = os.path.ismount(sub)
        res["write ro submount"] = err(lambda: append(os.path.join(sub, "x")))


def clones(res):
    for name, flags in (("newuser", CLONE_NEWUSER), ("newns", CLONE_NEWNS), ("newpid", CLONE_NEWPID),
                        ("newnet", CLONE_NEWNET), ("newuser|1<<32", CLONE_NEWUSER | (1 << 32))):
        rc, e = call("clone", flags | signal.SIGCHLD, 0, 0, 0, 0)
        if rc == 0:  # the child of a clone that should never have happened
            os._exit(0)
        if rc > 0:
            os.waitpid(rc, 0)
        res[f"clone {name}"] = e
    for argv in (["unshare", "-Ur", "true"], ["unshare", "-m", "true"], ["unshare", "-n", "true"]):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        res[" ".join(argv)] = [p.returncode, "Operation not permitted" in p.stderr]


def setuid(cfg, res):
    for key in ("suid_copy", "fcap_copy"):
        path = cfg.get(key)
        if not path:
            continue
        res[f"{key} mode"] = os.stat(path).st_mode & 0o7777
        args = [path] if key == "suid_copy" else [path, "/proc/self/status"]
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=10)
            res[f"{key} out"] = p.stdout.strip() if key == "suid_copy" else [
                line for line in p.stdout.splitlines() if line.startswith(("Uid:", "CapEff:", "CapPrm:"))]
            res[f"{key} rc"] = p.returncode
        except OSError as e:
            res[f"{key} rc"] = -e.errno
    try:  # sudo is not installed here; where it is, it must fail (nosuid, no_new_privs)
        res["sudo"] = ["rc", subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=10).returncode]
    except OSError as e:
        res["sudo"] = e.errno
    res["euid after"] = os.geteuid()


def root_owned(cfg, res):
    path = cfg.get("root_file")
    if not path:
        return
    res["root file append"] = err(lambda: append(path))
    res["root file truncate"] = err(lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC)))
    res["root file chmod"] = err(lambda: os.chmod(path, 0o666))
    res["root file chown"] = err(lambda: os.chown(path, os.getuid(), os.getgid()))


def kernel_calls(res):
    res["bpf map_create NULL"] = raw("bpf", 0, None, 0)  # EFAULT/EINVAL if reached
    res["perf_event_open NULL"] = raw("perf_event_open", None, 0, -1, -1, 0)  # EFAULT
    res["userfaultfd bad flags"] = raw("userfaultfd", 0x7FFFFFFF)  # EINVAL
    res["keyctl get session keyring"] = raw("keyctl", 0, -3, 0)  # would succeed: harmless read
    res["add_key bogus type"] = raw("add_key", cstr("faramesh-no-such-type"), cstr("x"), None, 0, -2)  # ENODEV
    res["request_key bogus type"] = raw("request_key", cstr("faramesh-no-such-type"), cstr("x"), None, 0)
    # 17 segments (> KEXEC_SEGMENT_MAX), unknown flag and arch bits: EINVAL if ever reached, never an unload.
    res["kexec_load EINVAL args"] = raw("kexec_load", 0, 17, None, 0x7FFF0100)
    res["kexec_file_load bad fds"] = raw("kexec_file_load", -1, -1, 0, None, 0)
    junk = ctypes.create_string_buffer(b"\0" * 16)
    res["init_module junk"] = raw("init_module", junk, 16, cstr(""))  # ENOEXEC
    res["finit_module bad fd"] = raw("finit_module", -1, cstr(""), 0)  # EBADF
    res["delete_module missing"] = raw("delete_module", cstr("faramesh_no_such_module"), 0o4000)  # ENOENT
    res["open_by_handle_at NULL"] = raw("open_by_handle_at", AT_FDCWD, None, 0)  # EFAULT
    for name, value in (("READ_IMPLIES_EXEC", READ_IMPLIES_EXEC),
                        ("READ_IMPLIES_EXEC|1<<32", READ_IMPLIES_EXEC | (1 << 32)), ("ADDR_NO_RANDOMIZE", 0x0040000)):
        rc, e = call("personality", value)
        if rc != -1:
            call("personality", 0)  # put it back if it ever got through
        res[f"personality {name}"] = e
    rc, e = call("personality", 0xFFFFFFFF)
    res["personality query"] = e


def tty(res):
    c = ctypes.c_char(b"x")
    res["open /dev/tty"] = err(lambda: os.close(os.open("/dev/tty", os.O_RDWR)))
    res["stdin isatty"] = os.isatty(0)
    res["TIOCSTI stdin"] = raw("ioctl", 0, TIOCSTI, ctypes.byref(c))
    res["TIOCSTI|1<<32 stdin"] = raw("ioctl", 0, TIOCSTI | (1 << 32), ctypes.byref(c))
    res["TIOCLINUX stdin"] = raw("ioctl", 0, TIOCLINUX, ctypes.byref(c))
    # On a pty of our own (new devpts instance): TIOCSTI would work there if the filter let it through.
    try:
        master, slave = os.openpty()
        res["TIOCSTI own pty"] = raw("ioctl", slave, TIOCSTI, ctypes.byref(c))
        res["TIOCSTI|1<<32 own pty"] = raw("ioctl", slave, TIOCSTI | (0xFFFF << 32), ctypes.byref(c))
        os.close(master)
        os.close(slave)
    except OSError as e:
        res["openpty"] = e.errno


def network(cfg, res):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    res["udp sendto host 127.0.0.1"] = err(lambda: u.sendto(b"escape", ("127.0.0.1", cfg["udp_port"])))
    u.close()
    ext = cfg.get("ext_addr")
    if ext:
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.settimeout(3)
        res["tcp connect host ext addr"] = err(lambda: t.connect((ext, cfg["ext_tcp_port"])))
        t.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        res["udp sendto host ext addr"] = err(lambda: u.sendto(b"escape", (ext, cfg["ext_udp_port"])))
        u.close()
    for name, fam in (("packet", 17), ("vsock", 40), ("netlink", 16), ("bluetooth", 31), ("alg", 38)):
        for suffix, value in (("", fam), ("|1<<32", fam | (1 << 32))):
            res[f"socket {name}{suffix}"] = raw("socket", value, 2, 0)  # SOCK_DGRAM
    res["socketpair packet"] = raw("socketpair", 17, 2, 0, ctypes.byref((ctypes.c_int * 2)()))


def unix_sockets(cfg, res):
    for path in cfg["host_sockets"]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        res[f"connect {path}"] = err(lambda p=path, s=s: s.connect(p))
        s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    res["connect abstract host socket"] = err(lambda: s.connect("\0" + cfg["abstract_name"]))
    s.close()
    res["SSH_AUTH_SOCK in env"] = "SSH_AUTH_SOCK" in os.environ
    if cfg.get("engine_socket"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        res["connect engine socket"] = err(lambda: s.connect(cfg["engine_socket"]))
        if res["connect engine socket"] == 0:
            s.sendall(b"hello from the sandbox\n")
        s.close()


def devices(res):
    for dev in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/sda", "/dev/vda", "/dev/nvme0n1",
                "/dev/xvda", "/dev/loop0", "/dev/dm-0"):
        res[f"open {dev}"] = err(lambda d=dev: os.close(os.open(d, os.O_RDONLY)))
    res["mknod /tmp/mem"] = err(lambda: os.mknod("/tmp/mem", 0o600 | 0o020000, os.makedev(1, 1)))
    res["mknod ws/sda"] = err(lambda: os.mknod("dev-sda", 0o600 | 0o060000, os.makedev(8, 0)))


def writes(cfg, res):
    targets = {
        "/etc": "/etc/faramesh-escape",
        "/etc/passwd": "/etc/passwd",
        "/usr/bin": "/usr/bin/faramesh-escape",
        "/usr/bin/python3": "/usr/bin/python3",
        "governance.fms": cfg["governance"],
        ".faramesh/": os.path.join(cfg["stack"], ".faramesh", "escape"),
        ".faramesh/policy.json": cfg["policy"],
        ".git/hooks/": os.path.join(cfg["stack"], ".git", "hooks", "pre-commit"),
        ".git/hooks/existing": os.path.join(cfg["stack"], ".git", "hooks", "post-checkout"),
        ".git/config": os.path.join(cfg["stack"], ".git", "config"),
    }
    for name, path in targets.items():
        res[f"write {name}"] = err(lambda p=path: append(p))
    scratch = os.path.join(cfg["workspace"], "scratch-for-rename")
    with open(scratch, "w") as f:
        f.write("evil rules\n")
    for name in ("governance.fms", ".git/hooks/post-checkout", ".git/config"):
        res[f"rename over {name}"] = err(lambda n=name: os.rename(scratch, os.path.join(cfg["stack"], n)))
        res[f"unlink {name}"] = err(lambda n=name: os.unlink(os.path.join(cfg["stack"], n)))
    res["rename .git/hooks away"] = err(lambda: os.rename(os.path.join(cfg["stack"], ".git", "hooks"),
                                                    os.path.join(cfg["workspace"], "hooks-moved")))
    res["rename .git away"] = err(lambda: os.rename(os.path.join(cfg["stack"], ".git"),
                                                    os.path.join(cfg["workspace"], "git-moved")))
    res["rename .faramesh away"] = err(lambda: os.rename(os.path.join(cfg["stack"], ".faramesh"),
                                                         os.path.join(cfg["workspace"], "faramesh-moved")))
    res["list .faramesh"] = err(lambda: os.listdir(os.path.join(cfg["stack"], ".faramesh")))
    res["read policy.json"] = err(lambda: read(cfg["policy"]))
    res["write workspace"] = err(lambda: append(os.path.join(cfg["workspace"], "probe-more-was-here")))
    res["write /tmp"] = err(lambda: append("/tmp/probe-more-was-here"))
    py = subprocess.run(["/usr/bin/python3", "-c", "import json, ssl, sqlite3, urllib.request"],
                        capture_output=True, timeout=30)
    res["python stdlib imports"] = py.returncode


def kills(cfg, res):
    # Last: kill -9 -1 reaches every process we may signal (inside our PID namespace only).
    res["kill sentinel host pid"] = err(lambda: os.kill(cfg["sentinel_pid"], signal.SIGKILL))
    res["kill -9 1"] = err(lambda: os.kill(1, signal.SIGKILL))
    p = subprocess.Popen(["sleep", "30"])  # a process of ours: kill -1 must take it
    res["kill -9 -1"] = err(lambda: os.kill(-1, signal.SIGKILL))
    p.wait(timeout=5)
    res["own child killed"] = p.returncode == -signal.SIGKILL


def main_attempts(cfg):
    res = {}
    for step in (lambda: credentials(cfg, res), lambda: process_vm(res), lambda: links(cfg, res),
                 lambda: mount_family(cfg, res), lambda: clones(res), lambda: setuid(cfg, res),
                 lambda: root_owned(cfg, res), lambda: kernel_calls(res), lambda: tty(res),
                 lambda: network(cfg, res), lambda: unix_sockets(cfg, res), lambda: devices(res),
                 lambda: writes(cfg, res), lambda: kills(cfg, res)):
        step()
    return res


# --- limits -----------------------------------------------------------------------------------------------

def limits_attempts(cfg):
    res = {"rlimit NPROC": resource.getrlimit(resource.RLIMIT_NPROC),
           "rlimit AS": resource.getrlimit(resource.RLIMIT_AS),
           "rlimit NOFILE": resource.getrlimit(resource.RLIMIT_NOFILE)}
    # 100k open files.
    fds = []
    try:
        for _ in range(100_000):
            fds.append(os.open("/dev/null", os.O_RDONLY))
        res["open 100k"] = 0
    except OSError as e:
        res["open 100k"] = e.errno
    res["files opened"] = len(fds)
    for fd in fds:
        os.close(fd)
    try:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
        res["raise NOFILE hard"] = 0
    except ValueError:
        res["raise NOFILE hard"] = 1  # EPERM, as Python reports it
    # Memory hog in a child: 4 GiB, touched in 64 MiB steps.
    pid = os.fork()
    if pid == 0:
        try:
            chunks = []
            for _ in range(64):
                chunks.append(bytearray(64 << 20))
            os._exit(0)
        except MemoryError:
            os._exit(42)
        os._exit(1)
    _, st = os.waitpid(pid, 0)
    res["memory hog"] = {"exit": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
                         "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None}
    # Fork bomb: fork until the kernel says no; every child just sleeps.
    children = []
    t0 = time.monotonic()
    res["fork bomb"] = 0
    while len(children) < 5000 and time.monotonic() - t0 < 10:
        try:
            pid = os.fork()
        except OSError as e:
            res["fork bomb"] = e.errno
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    res["forked"] = len(children)
    print(json.dumps({"confined": True, "stage": "bomb holding", "attempts": res}), flush=True)
    sys.stdin.read()  # the test times the host while the children live
    os.kill(-1, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return res


def main():
    cfg = json.loads(sys.argv[1])
    checks = confinement(cfg)
    if not all(checks.values()):
        print(json.dumps({"confined": False, "checks": checks}), flush=True)
        sys.exit(3)
    if cfg["mode"] == "limits":
        limits_attempts(cfg)
        return
    print(json.dumps({"confined": True, "checks": checks, "attempts": main_attempts(cfg)}), flush=True)


if __name__ == "__main__":
    main()
