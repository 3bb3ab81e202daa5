"""Seccomp violation reports: the supervisor end of the user-notification filter (DESIGN.md §5).

Per launch the supervisor makes a socketpair and hands one end to the launch; the sandbox init sends the
violation filter's listener back on it (sandbox/launch.py, S8). From then on every reported call the
agent attempts (ptrace, the mount family, unshare/setns, bpf, kexec, module loading, io_uring) stops
in the kernel until this module answers it — always EPERM, never "continue" — and is counted. Counts
are flushed at most once a second per agent as one `sandbox_violation` event on the engine's operator
socket, so a flood of attempts costs one DPR per second, not one per call. When the engine is down,
counts wait (merged) for the next flush.

Everything here runs on the supervisor's single poll loop: NOTIF_RECV is only called when poll says a
notification is pending, and under a short interval timer, because the kernel blocks in NOTIF_RECV if
the caller died in between (O_NONBLOCK does not apply to it).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faramesh.sandbox import seccomp
from faramesh.sandbox.errors import SeccompError

FLUSH_INTERVAL = 1.0
RECV_GUARD = 0.2  # seconds NOTIF_RECV may block before the timer cuts it short
MAX_PER_TURN = 256  # notifications answered per listener per poll turn
# Answered per listener per second; past it the listener is not polled until the second ends, so an agent
# hammering reported calls waits in the kernel (its own cost) instead of holding the supervisor's one loop.
PER_SECOND = 2000

Sender = Callable[[dict[str, Any]], bool]


@dataclass
class _Watch:
    agent_id: str
    handoff: socket.socket | None
    listener: int | None = None
    counts: Counter[str] = field(default_factory=Counter)
    first_ms: int | None = None
    last_ms: int | None = None
    window: int = 0  # the second `answered` counts in
    answered: int = 0


def _guarded_receive(listener: int) -> seccomp.SeccompNotif | None:
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, RECV_GUARD)
    try:
        return seccomp.receive_violation(listener)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class ViolationMonitor:
    """Listeners of the running agents, their pending counts, and the flush to the engine."""

    def __init__(self, send: Sender, clock: Callable[[], float] = time.time) -> None:
        self.send = send
        self.clock = clock
        self._watches: dict[int, _Watch] = {}  # key: a token per launch
        self._next = 0
        self._last_flush = 0.0
        self.reported = 0  # attempts handed to the engine (for status)

    def prepare(self, agent_id: str) -> tuple[int, int]:
        """(token, the fd to hand the launch). The caller closes that fd once it has been passed on."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        self._next += 1
        self._watches[self._next] = _Watch(agent_id, mine)
        return self._next, theirs.detach()

    def fds(self) -> list[int]:
        out = []
        second = int(self.clock())
        for w in self._watches.values():
            if w.handoff is not None:
                out.append(w.handoff.fileno())
            if w.listener is not None and (w.window != second or w.answered < PER_SECOND):
                out.append(w.listener)
        return out

    def on_ready(self, ready: set[int]) -> None:
        for w in self._watches.values():
            if w.handoff is not None and w.handoff.fileno() in ready:
                self._take_listener(w)
            if w.listener is not None and w.listener in ready:
                self._answer(w)

    def _take_listener(self, w: _Watch) -> None:
        assert w.handoff is not None
        try:
            _data, fds, _flags, _addr = socket.recv_fds(w.handoff, 16, 2)
        except BlockingIOError:
            return
        except OSError:
            fds = []
        for extra in fds[1:]:
            os.close(extra)
        if fds and w.listener is None:
            w.listener = fds[0]
            os.set_blocking(w.listener, False)
        elif fds:
            os.close(fds[0])
        w.handoff.close()  # one listener per launch; EOF or a message ends the hand-off either way
        w.handoff = None

    def _answer(self, w: _Watch) -> None:
        for _ in range(MAX_PER_TURN):
            if w.listener is None:
                return
            events = _events(w.listener)
            if not events & select.POLLIN:
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self._drop_listener(w)  # every task under the filter is gone
                return
            try:
                notif = _guarded_receive(w.listener)
            except SeccompError:
                self._drop_listener(w)
                return
            if notif is None:
                return
            if w.window == int(self.clock()) and w.answered >= PER_SECOND:
                with contextlib.suppress(SeccompError):
                    seccomp.respond_eperm(w.listener, notif)
                w.counts[_name(notif.data.nr)] += 1
                return
            with contextlib.suppress(SeccompError):
                seccomp.respond_eperm(w.listener, notif)
            now_ms = int(self.clock() * 1000)
            if w.window != now_ms // 1000:
                w.window, w.answered = now_ms // 1000, 0
            w.answered += 1
            w.counts[_name(notif.data.nr)] += 1
            w.first_ms = w.first_ms if w.first_ms is not None else now_ms
            w.last_ms = now_ms

    def _drop_listener(self, w: _Watch) -> None:
        if w.listener is not None:
            os.close(w.listener)
            w.listener = None

    def release(self, token: int) -> None:
        """The launch ended: pending counts are flushed now, then its fds close."""
        w = self._watches.get(token)
        if w is None:
            return
        self._answer(w)
        self._flush_one(w)
        if w.handoff is not None:
            w.handoff.close()
        self._drop_listener(w)
        if not w.counts:
            del self._watches[token]
        else:  # the engine did not take them: keep them (without fds) for the next flush
            self._watches[token] = _Watch(w.agent_id, None, None, w.counts, w.first_ms, w.last_ms)

    def flush(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_flush < FLUSH_INTERVAL:
            return
        self._last_flush = now
        for token in list(self._watches):
            w = self._watches[token]
            self._flush_one(w)
            if w.handoff is None and w.listener is None and not w.counts:
                del self._watches[token]

    def _flush_one(self, w: _Watch) -> None:
        if not w.counts:
            return
        event = {
            "type": "sandbox_violation",
            "agent_id": w.agent_id,
            "attempts": dict(sorted(w.counts.items())),
            "first_ms": w.first_ms,
            "last_ms": w.last_ms,
        }
        if self.send(event):
            self.reported += sum(w.counts.values())
            w.counts.clear()
            w.first_ms = w.last_ms = None

    def close(self) -> None:
        for token in list(self._watches):
            self.release(token)


_NAMES: dict[int, str] = {}


def _name(number: int) -> str:
    if number not in _NAMES and len(_NAMES) < 1024:  # bounded: syscall numbers are few
        _NAMES[number] = seccomp.syscall_name(number)
    return _NAMES.get(number) or f"syscall_{number}"


def _events(fd: int) -> int:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


def engine_sender(operator_socket: str, timeout: float = 0.5) -> Sender:
    """Events to the engine over its operator socket (root is an operator); False when not recorded."""

    def send(event: dict[str, Any]) -> bool:
        from faramesh.engine.client import operator_request

        reply = operator_request(operator_socket, event, timeout)
        return reply is not None and "error" not in reply

    return send

