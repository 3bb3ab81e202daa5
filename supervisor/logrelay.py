"""An agent's stdout/stderr, relayed by the supervisor into its size-rotated log.

The agent gets the write end of a pipe, never a descriptor on the log file or its directory: it cannot
truncate, seek, rewrite or fill past the rotation limit what the operator reads, and the rotation
happens here, in the one process that owns the file. The read end is non-blocking and each `pump` reads a
bounded amount, so a flooding agent costs the supervisor's poll loop at most one slice per turn.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 3  # agent-x.log.1 … .3
SLICE = 256 * 1024  # read per pump: bounded work per poll-loop turn


def open_log(path: Path) -> int:
    # O_NOFOLLOW: the log dir is root's, but never follow a link someone planted for the file itself.
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def rotate(path: Path, keep: int) -> None:
    """path → path.1 → … → path.keep (the oldest falls off)."""
    for n in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        newer = path if n == 1 else path.with_name(f"{path.name}.{n - 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(newer, older)


class LogRelay:
    """The read end of one agent's output pipe and the log it goes to."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The agent's end blocks (a full pipe slows the agent down; it never loses its own output).
        os.set_blocking(self.write_fd, True)
        self._log_fd = open_log(path)
        self._size = os.fstat(self._log_fd).st_size
        self.closed = False

    def agent_end(self) -> int:
        """The write end, for the launch; the caller closes its copy with `handed_over` once passed."""
        return self.write_fd

    def handed_over(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def fileno(self) -> int:
        return self.read_fd

    def pump(self, limit: int = SLICE) -> bool:
        """Move up to `limit` bytes from the pipe to the log. False once every writer has gone (EOF)."""
        if self.closed:
            return False
        moved = 0
        while moved < limit:
            try:
                chunk = os.read(self.read_fd, min(65536, limit - moved))
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self._write(chunk)
            moved += len(chunk)
        return True

    def _write(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self.max_bytes:
            os.close(self._log_fd)
            rotate(self.path, self.keep)
            self._log_fd = open_log(self.path)
            self._size = 0
        view = memoryview(data)
        while view:
            written = os.write(self._log_fd, view)
            view = view[written:]
        self._size += len(data)

    def close(self, drain: bool = True) -> None:
        """Drain what is buffered (bounded: writers may linger, e.g. a dying sandbox) and close."""
        if self.closed:
            return
        if drain:
            with contextlib.suppress(OSError):
                for _ in range(64):
                    if not self.pump():
                        break
        self.handed_over()
        os.close(self.read_fd)
        os.close(self._log_fd)
        self.closed = True
