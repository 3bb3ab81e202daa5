"""The launch zygote (DESIGN.md §5): one exec'd, single-threaded interpreter that forks C1 per launch.

The supervisor execs it (`/usr/bin/python3 -I -S`, an EMPTY environment, the package root as argv[1],
like the lean launcher's BOOT) before it does anything else, so no fork of a launch ever happens in the
supervisor itself. The zygote imports `faramesh.sandbox.launch` once and serves requests over a
SOCK_SEQPACKET socketpair (one JSON object per packet; fds ride along with SCM_RIGHTS):

    supervisor → zygote   {"op": "launch", "id": N, "spec_path": P | "spec": TEXT, "argv": […], "env": {…},
                           "report": bool}            fds: [log_fd] or [log_fd, report_fd]
    zygote → supervisor   {"op": "started", "id": N, "pid": C1}            fds: [pidfd of C1]
                          {"op": "error", "id": N, "message": "…"}
                          {"op": "exit", "pid": C1, "code": STATUS}        (the agent's status, 128+sig)

Who waits: C1 is the zygote's child, so the zygote reaps it (waitpid on SIGCHLD) and sends its status.
The zygote opens C1's pidfd *before* it can reap it (it is single-threaded: nothing reaps in between) and
hands it over, so the supervisor never races a pid reuse: it polls the pidfd to learn that C1 ended,
signals it with pidfd_send_signal, and takes the status from the zygote's `exit` message.

When the supervisor's end closes (it died or stopped), the zygote stops accepting launches, waits for
its remaining children (they keep running: `apply --stop` ends them), and exits. If the zygote dies, its
C1s are re-parented to init; the supervisor still sees them end through its pidfds (status unknown).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import sys
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"
BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import runpy; "
    "runpy.run_module('faramesh.supervisor.zygote', run_name='__main__', alter_sys=True)"
)
MAX_PACKET = 1 << 20
MAX_FDS = 4
EXIT_REFUSED = 4


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One packet: (message, received fds); (None, []) at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    for fd in fds:
        os.set_inheritable(fd, False)
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise ValueError("not an object")
    return msg, list(fds)


def argv(pkg_root: str, fd: int, tag: str | None = None) -> list[str]:
    """`tag` (layout.process_tag: the stack) only marks the command line, for `apply --stop` to find the
    zygote, its C1s and their sandbox inits (forked: same command line) when the supervisor is gone."""
    return [SYSTEM_PYTHON, "-I", "-S", "-c", BOOT, pkg_root, str(fd), *([tag] if tag else [])]


# --- the supervisor's side ------------------------------------------------------------------------------


class ZygoteError(Exception):
    pass


class Zygote:
    """The supervisor's handle on its zygote: spawn (before any thread), launch, exit statuses."""

    def __init__(self, pkg_root: str, stderr_fd: int | None = None, tag: str | None = None) -> None:
        import subprocess

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                argv(pkg_root, theirs.fileno(), tag),
                env={},  # an EMPTY environment: nothing of the supervisor's reaches the agents' parent
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_fd,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                start_new_session=True,
            )
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self.pid = self.proc.pid
        self.exits: dict[int, int] = {}  # C1 pid -> status, received but not yet claimed
        self.alive = True
        self._next_id = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def _dead(self) -> None:
        if self.alive:
            self.alive = False
            self.sock.close()
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        if msg.get("op") == "exit":
            self.exits[int(msg["pid"])] = int(msg["code"])
        for fd in fds:
            os.close(fd)

    def drain(self, timeout: float = 0.0) -> None:
        """Read whatever the zygote sent (exit statuses); notices its death."""
        while self.alive:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return
            timeout = 0.0
            try:
                msg, fds = recv(self.sock)
            except (OSError, ValueError):
                self._dead()
                return
            if msg is None:
                self._dead()
                return
            self._handle(msg, fds)

    def launch(
        self,
        spec_path: str,
        command: list[str],
        env: dict[str, str],
        log_fd: int,
        report_fd: int | None,
        timeout: float = 10.0,
        notify_fd: int | None = None,
    ) -> tuple[int, int]:
        """(C1 pid, its pidfd). ZygoteError when the zygote cannot (the caller falls back)."""
        if not self.alive:
            raise ZygoteError("the zygote is not running")
        self._next_id += 1
        rid = self._next_id
        fds = [log_fd] + [fd for fd in (report_fd, notify_fd) if fd is not None]
        request = {
            "op": "launch",
            "id": rid,
            "spec_path": spec_path,
            "argv": command,
            "env": env,
            "report": report_fd is not None,
            "notify": notify_fd is not None,
        }
        try:
            send(self.sock, request, fds)
            while True:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    raise ZygoteError(f"no answer within {timeout:.0f}s")
                msg, got = recv(self.sock)
                if msg is None:
                    raise ZygoteError("the zygote exited")
                if msg.get("id") == rid and msg.get("op") == "started" and len(got) == 1:
                    return int(msg["pid"]), got[0]
                if msg.get("id") == rid:
                    for fd in got:
                        os.close(fd)
                    raise ZygoteError(str(msg.get("message", "launch failed")))
                self._handle(msg, got)
        except (OSError, ValueError) as e:
            self._dead()
            raise ZygoteError(str(e)) from None
        except ZygoteError:
            self._dead()
            raise

    def close(self) -> None:
        """The supervisor is done: EOF ends the zygote once its children are gone."""
        if self.alive:
            self.alive = False
            self.sock.close()


# --- inside the zygote ------------------------------------------------------------------------------------


def _c1(sock: socket.socket, wake: tuple[int, int], msg: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become C1 and run the launch sequence (never returns to the serve loop)."""
    from faramesh.sandbox import launch as sandbox_launch
    from faramesh.sandbox.errors import SandboxError

    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    sock.close()
    for fd in wake:
        os.close(fd)
    os.setsid()  # its own session and process group (profile off: the supervisor kills the group)
    log_fd = fds[0]
    extra = iter(fds[1:])
    report_fd = next(extra, None) if msg.get("report") else None
    notify_fd = next(extra, None) if msg.get("notify") else None
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    if report_fd is not None:
        os.set_inheritable(report_fd, True)
    try:
        if "spec" in msg:
            raw: bytes = str(msg["spec"]).encode()
        else:
            fd = os.open(str(msg["spec_path"]), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                raw = b""
                while chunk := os.read(fd, 1 << 16):
                    raw += chunk
            finally:
                os.close(fd)
        spec = sandbox_launch.spec_from_json(raw)
        env = {str(k): str(v) for k, v in dict(msg.get("env") or {}).items()}
        return sandbox_launch.launch(
            spec, [str(a) for a in msg["argv"]], report_fd=report_fd, host_env=env, notify_fd=notify_fd
        )
    except SandboxError as e:
        os.write(2, f"zygote: sandbox refused to start: {e.code}: {e}\n".encode())
        return EXIT_REFUSED
    except (OSError, ValueError, KeyError) as e:
        os.write(2, f"zygote: cannot launch: {e}\n".encode())
        return EXIT_REFUSED


def _reap(sock: socket.socket | None, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        if sock is not None:
            with contextlib.suppress(OSError):
                send(sock, {"op": "exit", "pid": pid, "code": code})


def serve(sock: socket.socket) -> int:
    # Importing the per-launch code once is the zygote's point: every C1 starts with it loaded.
    import faramesh.sandbox.launch  # noqa: F401

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    children: set[int] = set()
    live: socket.socket | None = sock
    while live is not None or children:
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        if live is not None:
            poller.register(live.fileno(), select.POLLIN)
        ready = {fd for fd, _ in poller.poll(1000)}
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        _reap(live, children)
        if live is None or live.fileno() not in ready:
            continue
        try:
            msg, fds = recv(live)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"zygote: bad request: {e}\n")
            continue
        if msg is None:  # the supervisor is gone: serve no more, outlive our children
            live.close()
            live = None
            continue
        try:
            if msg.get("op") != "launch" or not fds:
                send(live, {"op": "error", "id": msg.get("id"), "message": "bad request"})
                continue
            pid = os.fork()
            if pid == 0:
                code = EXIT_REFUSED
                try:
                    code = _c1(live, (wake_r, wake_w), msg, fds)
                finally:
                    os._exit(code)
            children.add(pid)
            pidfd = os.pidfd_open(pid)  # before any waitpid: C1 cannot be reaped (and its pid reused) yet
            try:
                send(live, {"op": "started", "id": msg.get("id"), "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                send(live, {"op": "error", "id": msg.get("id"), "message": str(e)})
        finally:
            for fd in fds:
                os.close(fd)
    return 0


def main() -> int:
    if len(sys.argv) not in (2, 3) or not sys.argv[1].isdigit():
        sys.stderr.write("usage: zygote FD [TAG] (started by `faramesh supervise`)\n")
        return 64
    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
