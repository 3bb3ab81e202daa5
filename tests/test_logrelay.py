"""supervisor/logrelay.py with real pipes and files: relay, rotation, EOF, bounded slices."""

from __future__ import annotations

import os
from pathlib import Path

from faramesh.supervisor.logrelay import LogRelay


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_output_reaches_the_log_and_eof_is_reported(tmp_path: Path) -> None:
    relay = LogRelay(tmp_path / "agent-bot.log")
    writer = os.dup(relay.agent_end())
    relay.handed_over()
    _write_all(writer, b"hello\n")
    assert relay.pump() is True  # more may come: the writer is still open
    os.close(writer)
    assert relay.pump() is False  # every writer gone
    relay.close()
    assert (tmp_path / "agent-bot.log").read_bytes() == b"hello\n"


def test_rotation_keeps_at_most_keep_files_each_near_the_limit(tmp_path: Path) -> None:
    log = tmp_path / "agent-bot.log"
    log.write_bytes(b"old run\n")
    relay = LogRelay(log, max_bytes=4096, keep=2)
    writer = os.dup(relay.agent_end())
    relay.handed_over()
    for i in range(40):
        _write_all(writer, f"{i:04d}".encode() * 250 + b"\n")  # 1,001 bytes a line
        relay.pump()
    os.close(writer)
    relay.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["agent-bot.log", "agent-bot.log.1", "agent-bot.log.2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 4096
        assert path.stat().st_mode & 0o777 == 0o600
    assert log.read_bytes().endswith(b"0039" * 250 + b"\n")  # the newest line is in the live log
    assert b"old run" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())  # rotated away


def test_a_pump_moves_a_bounded_slice(tmp_path: Path) -> None:
    relay = LogRelay(tmp_path / "a.log")
    writer = os.dup(relay.agent_end())
    relay.handed_over()
    _write_all(writer, b"x" * 60000)
    assert relay.pump(limit=1000) is True
    assert (tmp_path / "a.log").stat().st_size == 1000
    relay.close()  # drains the rest
    assert (tmp_path / "a.log").stat().st_size == 60000
    os.close(writer)


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "etc-shadow"
    target.write_bytes(b"")
    (tmp_path / "agent-bot.log").symlink_to(target)
    try:
        LogRelay(tmp_path / "agent-bot.log")
    except OSError as exc:
        assert exc.errno == 40  # ELOOP
    else:
        raise AssertionError("the relay followed a symlink")
    assert target.read_bytes() == b""
