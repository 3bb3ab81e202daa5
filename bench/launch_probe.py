"""The confinement probe bench/launch_bench.py runs instead of /bin/true (passed to `python3 -I -S -c`).

    python3 -I -S -c "$(cat launch_probe.py)" WORKSPACE OUTSIDE_FILE

Checks, each a bit of the exit status when it fails (0 = everything of profile `full` is in force):
  1  /proc/self/status: NoNewPrivs 1, Seccomp 2, CapInh/CapPrm/CapEff/CapBnd/CapAmb all 0
  2  Landlock: reading a directory outside the rules (`/`, which exists in the new root) → EACCES
  4  seccomp: unshare(0) (a no-op the kernel always allows) and unshare(CLONE_NEWUSER) → EPERM
  8  a write outside the workspace (a file in the read-only stack dir, and /etc) → EACCES/EROFS
and, on success, a write inside the workspace works. One JSON line on stdout says what was seen.
"""

import ctypes
import errno
import json
import os
import sys

ws, outside = sys.argv[1], sys.argv[2]
seen = {}
bad = 0

status = {}
with open("/proc/self/status") as f:
    for line in f:
        k, _, v = line.partition(":")
        status[k] = v.strip()
want = {"NoNewPrivs": "1", "Seccomp": "2"}
want.update({k: "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")})
seen["status"] = {k: status.get(k) for k in want}
if any(status.get(k) != v for k, v in want.items()):
    bad |= 1

try:
    os.listdir("/")
    seen["landlock_read"] = "allowed"
    bad |= 2
except OSError as e:
    seen["landlock_read"] = errno.errorcode.get(e.errno, str(e.errno))
    if e.errno != errno.EACCES:
        bad |= 2

libc = ctypes.CDLL(None, use_errno=True)
for name, flags in (("unshare0", 0), ("unshare_user", 0x10000000)):
    rc = libc.unshare(ctypes.c_int(flags))
    err = ctypes.get_errno()
    seen[name] = "ok" if rc == 0 else errno.errorcode.get(err, str(err))
    if rc == 0 or err != errno.EPERM:
        bad |= 4

for key, path in (("write_stack", outside), ("write_etc", "/etc/faramesh-probe")):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
        seen[key] = "allowed"
        bad |= 8
    except OSError as e:
        seen[key] = errno.errorcode.get(e.errno, str(e.errno))
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            bad |= 8

try:
    p = os.path.join(ws, ".probe")
    with open(p, "w") as f:
        f.write("ok")
    os.unlink(p)
    seen["write_workspace"] = "ok"
except OSError as e:
    seen["write_workspace"] = errno.errorcode.get(e.errno, str(e.errno))
    bad |= 16

seen["uid"] = os.getuid()
seen["pid"] = os.getpid()
print(json.dumps(seen, sort_keys=True), flush=True)
sys.exit(bad)
