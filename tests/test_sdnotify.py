"""systemd's notify protocol (faramesh/sdnotify.py): READY=1, WATCHDOG=1 from a timer, STOPPING=1 — sent
by the real `faramesh serve` to a datagram socket the test binds (what systemd does for Type=notify)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_harness import EngineDirs, EngineProcess, compile_policy, make_stack, short_tmpdir
from faramesh import sdnotify


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    tmp = short_tmpdir("fsd")
    path = str(tmp / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        tmp.rmdir()


def _messages(sock: socket.socket, until: float, stop_when: str | None = None) -> list[str]:
    got: list[str] = []
    while time.monotonic() < until:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if stop_when is not None and got[-1] == stop_when:
            break
    return got


def test_notify_is_a_no_op_without_notify_socket() -> None:
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False


def test_notify_sends_to_a_path_and_to_an_abstract_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path})
    assert sock.recv(64) == b"READY=1"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"faramesh-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(2)
    try:
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(64) == b"STOPPING=1"
    finally:
        abstract.close()


def test_watchdog_interval_is_half_the_usec_and_only_for_its_pid() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "ten"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, pid=42) == 1.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"}, pid=42) is None


def test_engine_says_ready_ticks_the_watchdog_while_idle_and_says_stopping(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = listener
    stack = make_stack(tmp_path)
    _, pf = compile_policy(stack, tmp_path / "policy.json")
    assert pf is not None
    dirs = EngineDirs.fresh()
    eng = EngineProcess(stack, pf, dirs, hooks={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        eng.start()
        first = _messages(sock, time.monotonic() + 5, stop_when="READY=1")
        assert "READY=1" in first
        idle = _messages(sock, time.monotonic() + 1.0)  # no request is sent: ticks come from a timer
        assert idle.count("WATCHDOG=1") >= 3, idle
        assert eng.terminate() == 0
        assert "STOPPING=1" in _messages(sock, time.monotonic() + 5, stop_when="STOPPING=1")
    finally:
        eng.ensure_stopped()
        dirs.cleanup()
