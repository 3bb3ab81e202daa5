"""Escape probe: runs as the agent (C3) inside the sandbox, stdlib only, never imported by pytest.

usage: python3 probe_escape.py CONFIG_JSON MARKER

It first checks that it is confined (its own PID namespace, NoNewPrivs 1, Seccomp 2, all five capability
sets zero, Landlock enforced). If any check fails it REFUSES to attempt anything: it prints
{"confined": false, ...} and exits 3. Otherwise it attempts the escapes, prints one JSON line with the
errno of each attempt (0 = it succeeded), then blocks on stdin until the test closes it (so the test can
inspect the agent from the host), and exits 0.
"""

import ctypes
import json
import os
import platform
import socket
import subprocess
import sys

from probe_common import append, confinement, err, read  # beside this file in the sandbox

NR = {
    "x86_64": {"ptrace": 101, "unshare": 272, "mount": 165, "clone3": 435, "socket": 41, "io_uring_setup": 425},
    "aarch64": {"ptrace": 117, "unshare": 97, "mount": 40, "clone3": 435, "socket": 198, "io_uring_setup": 425},
}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)


def raw(name, *args):
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(NR[name]), *conv)
    return ctypes.get_errno() if rc == -1 else 0


def attempts(cfg):
    res = {}
    sentinel = cfg["sentinel"].encode()
    for who, home in (("user", cfg["user_home"]), ("root", cfg["root_home"])):
        for rel in (".ssh/id_ed25519", ".ssh/id_rsa", ".aws/credentials", ".netrc", ".docker/config.json"):
            p = os.path.join(home, rel)
            try:
                data = read(p)
                res[f"read {who} {rel}"] = "LEAK" if sentinel in data else "readable"
            except OSError as e:
                res[f"read {who} {rel}"] = e.errno
    res["env has secret"] = any(cfg["sentinel"] in v for v in os.environ.values()) or cfg["secret_name"] in os.environ
    res["self environ has secret"] = sentinel in read("/proc/self/environ")
    try:
        res["proc1 environ"] = "LEAK" if sentinel in read("/proc/1/environ") else "no sentinel"
    except OSError as e:
        res["proc1 environ"] = e.errno
    res["proc1 mem"] = err(lambda: read("/proc/1/mem"))
    res["ptrace attach parent"] = raw("ptrace", 16, os.getppid(), 0, 0)  # PTRACE_ATTACH
    res["unshare user"] = raw("unshare", 0x10000000)
    res["mount tmpfs"] = raw("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/tmp"),
                             ctypes.c_char_p(b"tmpfs"), 0, None)
    res["clone3"] = raw("clone3", None, 0)
    res["socket netlink|1<<32"] = raw("socket", 16 | (1 << 32), 3, 0)
    res["io_uring_setup"] = raw("io_uring_setup", 1, None)
    res["write /etc"] = err(lambda: append("/etc/faramesh-escape"))
    res["write /usr/bin"] = err(lambda: append("/usr/bin/faramesh-escape"))
    res["write governance.fms"] = err(lambda: append(cfg["governance"]))
    res["write workspace"] = err(lambda: append(os.path.join(cfg["workspace"], "probe-was-here")))
    py = subprocess.run(["/usr/bin/python3", "-c", "import json, ssl, sqlite3, urllib.request"],
                        capture_output=True, timeout=30)
    res["python stdlib imports"] = py.returncode
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        res["tcp host listener"] = err(lambda: s.connect(("127.0.0.1", cfg["port"])))
    finally:
        s.close()
    return res


def main():
    cfg = json.loads(sys.argv[1])
    checks = confinement(cfg)
    if not all(checks.values()):
        print(json.dumps({"confined": False, "checks": checks}), flush=True)
        sys.exit(3)
    print(json.dumps({"confined": True, "checks": checks, "pid": os.getpid(), "attempts": attempts(cfg)}),
          flush=True)
    sys.stdin.read()  # hold until the test has looked at us from the host


if __name__ == "__main__":
    main()
