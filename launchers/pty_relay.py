"""The launcher's pty relay (DESIGN.md §3): with a terminal on stdin, the agent gets a new pty, never
the operator's terminal.

A sandboxed process that holds the operator's tty can change its modes, write escape sequences
the operator's terminal emulator interprets, or (where TIOCSTI is allowed) type commands into the
operator's shell. So the launcher forks: the child becomes C1 with a fresh pty slave as stdin, stdout
and stderr; this process stays outside the sandbox and copies bytes between the real terminal and the
pty master. The real terminal is left in its own (cooked) mode: Ctrl-C reaches this process and its
child C1 through the terminal's foreground process group, and C1 forwards it into the sandbox as
every launch does. The slave has echo and canonical mode off, so the real terminal's line discipline is
the only one (no double echo). Window size is copied at start and on SIGWINCH.

Limit: the agent's output reaches the operator's terminal byte for byte, escape sequences included
(a terminal emulator that acts on OSC 52 clipboard writes or title reports acts on the agent's); the
relay takes the terminal's controls away from the agent, not its rendering.

Lean like the rest of the launch path: os, select, termios, fcntl, struct and the C signal module.
"""

from __future__ import annotations

import _signal as signal  # type: ignore[import-not-found]  # `signal` imports enum
import errno
import fcntl
import os
import select
import struct
import termios

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_CHUNK = 65536


def _copy_winsize(src: int, dst: int) -> None:
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def _quiet_slave(fd: int) -> None:
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~(termios.ECHO | termios.ICANON)  # lflags: the real terminal already echoes and edits
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except InterruptedError:
            continue


def run_with_pty(launch: Callable[[], int], tty_fd: int = 0, out_fd: int = 1) -> int:
    """Run `launch` (which becomes C1) in a child whose stdio is a new pty; relay until it exits."""
    master, slave = os.openpty()
    _copy_winsize(tty_fd, slave)
    _quiet_slave(slave)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(master)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            if slave > 2:
                os.close(slave)
            code = launch()
        finally:
            os._exit(code)
    os.close(slave)
    # The relay outlives a Ctrl-C (C1 gets it too and ends the agent); SIGWINCH resizes the pty.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(tty_fd, master))
    watched = [master, tty_fd]
    status: int | None = None
    try:
        while True:
            try:
                ready, _, _ = select.select(watched, [], [], 0.5)
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, _CHUNK)
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: every slave fd closed (the agent's tree ended)
                        raise
                    data = b""
                if not data:
                    break
                _write_all(out_fd, data)
            if tty_fd in ready:
                data = os.read(tty_fd, _CHUNK)
                if data:
                    _write_all(master, data)
                else:
                    watched.remove(tty_fd)  # the operator closed stdin: the agent keeps running
            if status is None:
                done, code = os.waitpid(pid, os.WNOHANG)
                status = code if done else None
            if status is not None and not select.select([master], [], [], 0)[0]:
                break  # C1 is gone and its output drained (a daemonised descendant died with the sandbox)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    os.close(master)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
