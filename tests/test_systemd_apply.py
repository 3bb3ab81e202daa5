"""`apply` on a systemd host (supervisor/systemd_units.py): the instance name, when units are used, and
the systemctl calls — with a recording runner, since PID 1 here is not systemd (the real target is
exercised by tests/test_systemd_units.py where PID 1 is systemd)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from faramesh.supervisor import systemd_units


@pytest.mark.parametrize(
    "path",
    ["/srv/stacks/support-bot", "/tmp/a b/ü", "/srv/.hidden/x", "/", "/srv/with-dash/and.dot", "/a//b/"],
)
def test_escape_path_matches_systemd_escape(path: str) -> None:
    tool = shutil.which("systemd-escape")
    if tool is None:
        pytest.fail("systemd-escape is missing (Debian package systemd)")
    expected = subprocess.run([tool, "--path", path], capture_output=True, text=True, check=True).stdout.strip()
    assert systemd_units.escape_path(Path(path)) == expected


def test_units_are_used_only_on_a_systemd_host_with_them_installed(tmp_path: Path) -> None:
    assert systemd_units.booted_with_systemd(tmp_path / "missing") is False
    (tmp_path / "run").mkdir()
    assert systemd_units.booted_with_systemd(tmp_path / "run") is True
    assert systemd_units.units_installed((str(tmp_path),)) is False
    (tmp_path / "faramesh@.target").write_text("[Unit]\n")
    assert systemd_units.units_installed((str(tmp_path),)) is True
    # Here PID 1 is not systemd: apply keeps its detached processes.
    if not Path("/run/systemd/system").is_dir():
        assert systemd_units.for_stack(tmp_path) is None
    assert systemd_units.for_stack(tmp_path, {"FARAMESH_NO_SYSTEMD": "1"}) is None


def test_start_and_stop_drive_the_target() -> None:
    calls: list[list[str]] = []

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        failing = argv[1] == "stop"
        return subprocess.CompletedProcess(argv, 1 if failing else 0, "", "unit not loaded" if failing else "")

    units = systemd_units.StackUnits("srv-stacks-bot", run)
    assert units.target == "faramesh@srv-stacks-bot.target"
    assert units.engine == "faramesh-engine@srv-stacks-bot.service"
    assert units.env_file() == Path("/etc/faramesh/units/srv-stacks-bot.env")
    assert units.start() is None
    assert units.stop() == "unit not loaded"
    assert units.active() is True
    assert calls == [
        ["systemctl", "start", "faramesh@srv-stacks-bot.target"],
        ["systemctl", "stop", "faramesh@srv-stacks-bot.target"],
        ["systemctl", "is-active", "--quiet", "faramesh@srv-stacks-bot.target"],
    ]
