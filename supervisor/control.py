"""`<runtime>/supervisor.sock`: the supervisor's control socket (DESIGN.md §2), root 0600.

Newline-delimited JSON, one request per connection, answered by the supervisor's single thread (the
listening socket is one more fd in its poll loop: the supervisor never starts a thread). Peers other than
uid 0 (SO_PEERCRED) get `{"error": {"code": "FORBIDDEN", …}}`.

    {"verb": "list"}    → {"supervisor": {pid, zygote_pid}, "agents": [{id, pid, state, restarts,
                           last_exit, uid, reason}]}    state: STARTING|RUNNING|BACKOFF|FATAL|STOPPED
    {"verb": "stop"}    → {"ok": true}  then the same as SIGTERM: agents stopped gracefully, exit 0
    {"verb": "reload"}  → {"ok": true, "restarted": […], "added": […], "removed": […]}: re-reads the
                           installed policy; agents whose sandbox spec or command changed are restarted
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]
REQUEST_TIMEOUT = 2.0
MAX_REQUEST = 65536


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(8)
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_pending(self, handler: Handler) -> None:
        """Answer every connection waiting now (called when the listening fd polls readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                self._one(conn, handler)

    def _one(self, conn: socket.socket, handler: Handler) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            if peer_uid(conn) != 0:
                reply: dict[str, Any] = {"error": {"code": "FORBIDDEN", "message": "supervisor.sock is root-only"}}
            else:
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                try:
                    request = json.loads(data)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    reply = {"error": {"code": "BAD_REQUEST", "message": str(e)}}
                else:
                    reply = handler(request)
            conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any] | None:
    """One request to supervisor.sock; None when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
    except (OSError, ValueError):
        return None
    return reply if isinstance(reply, dict) else None
