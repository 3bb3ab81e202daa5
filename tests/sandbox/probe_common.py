"""What both escape probes share: errno helpers and the confinement check each runs before any attempt.

Copied beside the probes into the sandbox (stdlib only, never imported by pytest)."""

import os


def err(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno or -1


def read(path):
    with open(path, "rb") as f:
        return f.read()


def append(path):
    with open(path, "ab") as f:
        f.write(b"x")


def status():
    out = {}
    for line in read("/proc/self/status").decode().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def confinement(cfg):
    st = status()
    checks = {
        "own_pidns": os.readlink("/proc/self/ns/pid") != cfg["host_pidns"] and os.getppid() == 1,
        "no_new_privs": st.get("NoNewPrivs") == "1",
        "seccomp": st.get("Seccomp") == "2",
        "caps_zero": all(int(st[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")),
        # Landlock: / is an ordinary readable tmpfs, but no rule grants READ_DIR on it.
        "landlock": err(lambda: os.listdir("/")) == 13,
    }
    return checks
