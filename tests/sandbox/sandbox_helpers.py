"""Helpers for the sandbox tests: every kernel experiment runs in a forked child.

`forked(fn)` forks; the child runs `fn()` and sends its dict result (JSON) through a pipe, then
os._exit()s — it never returns into pytest. The pytest process itself is never confined or changed.
A test must assert that the child reported its set-up succeeded before asserting what was denied: a
"denied" that comes from a child that never got confined proves nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from faramesh.sandbox import _libc, namespaces

IS_ROOT = os.geteuid() == 0
# The host uid/gid the tests' agents run as when the tests run as root (a uid nothing else uses).
AGENT_UID = 65000 if IS_ROOT else os.geteuid()
AGENT_GID = 65000 if IS_ROOT else os.getegid()


@dataclass
class ChildResult:
    data: dict[str, Any]
    exit_status: int | None  # exit code, or None when killed
    signal: int | None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def forked(fn: Callable[[], dict[str, Any]], timeout: float = 30.0) -> ChildResult:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            try:
                out = fn()
                code = 0
            except BaseException:
                out = {"__error__": traceback.format_exc()}
            os.write(w, json.dumps(out, default=repr).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                data = os.read(r, 65536)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks)
    data = json.loads(raw) if raw else {}
    assert "__error__" not in data, data.get("__error__")
    return ChildResult(
        data,
        os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
    )


def errno_of(rc: int) -> int:
    """0 when a raw call succeeded, else its errno."""
    return ctypes.get_errno() if rc == -1 else 0


def raw(name: str, *args: Any) -> int:
    """errno of a raw syscall by name (0 = it succeeded)."""
    return errno_of(_libc.raw_syscall(name, *args))


def raw_nr(number: int, *args: int) -> int:
    """errno of a raw syscall by number with 64-bit integer arguments."""
    ctypes.set_errno(0)
    conv = [ctypes.c_long(a if a < (1 << 63) else a - (1 << 64)) for a in args]
    return errno_of(int(_libc.libc.syscall(ctypes.c_long(number), *conv)))


def become_agent() -> tuple[int, int]:
    """In a forked child: as root, drop to the test agent's ids (R3); unprivileged, keep our own."""
    if os.geteuid() == 0:
        namespaces.switch_ids(AGENT_UID, AGENT_GID)
    return os.geteuid(), os.getegid()


def enter_sandbox_namespaces() -> tuple[int, int]:
    """R3 + S1 + S2 + S3 in a forked child (the caller must fork again to get PID 1)."""
    from faramesh.sandbox import mounts

    uid, gid = become_agent()
    namespaces.unshare(namespaces.SANDBOX_NAMESPACES)
    namespaces.write_id_maps(1000, uid, 1000, gid)
    mounts.make_rslave("/")
    namespaces.bring_up_loopback()
    return uid, gid


def in_pid1(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """From C1 (after unshare(CLONE_NEWPID)): fork C2, which is PID 1, run fn there, relay its result."""
    res = forked(fn)
    out = dict(res.data)
    out["c2_exit"] = res.exit_status
    out["c2_signal"] = res.signal
    return out


@pytest.fixture
def world_dir() -> Iterator[str]:
    """A directory under /tmp the test agent's uid can traverse (pytest's tmp_path is 0700 root)."""
    d = tempfile.mkdtemp(prefix="faramesh-sbx-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def chown_agent(path: str) -> None:
    if IS_ROOT:
        os.chown(path, AGENT_UID, AGENT_GID)


def slurp(path: str, mode: str = "r") -> Any:
    """The whole content of a file (raises OSError like open())."""
    with open(path, mode) as f:
        return f.read()


def put(path: str, text: str, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(text)


def touch_new(path: str) -> None:
    """Create a file that must not exist yet (O_EXCL)."""
    with open(path, "x"):
        pass
