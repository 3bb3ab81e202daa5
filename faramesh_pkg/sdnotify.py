"""systemd's notify protocol in a few lines of stdlib: READY=1, WATCHDOG=1, STOPPING=1 to $NOTIFY_SOCKET.

Shared by the engine and the supervisor (both run as `Type=notify` units). Outside systemd nothing is
set and every call is a no-op. The watchdog is ticked by a timer in each process (the supervisor's poll
loop, the engine's event loop), never by traffic: an idle but healthy process keeps ticking, a wedged
loop stops, and systemd restarts it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") when NOTIFY_SOCKET names a path or an abstract socket (@…).
    True when a datagram was sent."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), target)
        return True
    return False


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 ticks: half of WATCHDOG_USEC (systemd's advice), or None when no
    watchdog is asked of this process (unset, malformed, or WATCHDOG_PID names another process)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 2_000_000
