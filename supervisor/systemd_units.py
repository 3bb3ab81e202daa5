"""`faramesh apply` on a host where systemd is PID 1 and the units (systemd/) are installed: the stack runs
as `faramesh@<instance>.target` (engine and supervisor units) instead of two detached processes.

The instance is the stack directory escaped with `systemd-escape --path` (the units turn it back into the
path with `%f`). The engine unit reads its secret references from `/etc/faramesh/units/<instance>.env`
(a unit cannot compute the stack id DESIGN.md names its environment file by), so `apply` writes that
copy too, root 0600. Everything else — dirs, ownership, the policy copy — is what `apply` prepares for a
detached start as well.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

TARGET_UNIT = "faramesh@.target"
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
UNIT_ENV_DIR = Path("/etc/faramesh/units")

Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def booted_with_systemd(run_dir: Path = Path("/run/systemd/system")) -> bool:
    """sd_booted(): systemd is PID 1 exactly when this directory exists."""
    return run_dir.is_dir()


def units_installed(unit_dirs: tuple[str, ...] = UNIT_DIRS) -> bool:
    return any((Path(d) / TARGET_UNIT).exists() for d in unit_dirs)


def escape_path(path: Path) -> str:
    """`systemd-escape --path`, in Python (no subprocess): '/' → '-', and every byte outside
    [A-Za-z0-9:_.] (and a leading '.') as \\xNN; the root is '-'."""
    text = os.path.normpath(str(path)).strip("/")
    if not text:
        return "-"
    out = []
    for i, byte in enumerate(text.encode()):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_.")) and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


@dataclass(frozen=True)
class StackUnits:
    instance: str
    run: Runner = _run

    @property
    def target(self) -> str:
        return f"faramesh@{self.instance}.target"

    @property
    def engine(self) -> str:
        return f"faramesh-engine@{self.instance}.service"

    def env_file(self, env_dir: Path = UNIT_ENV_DIR) -> Path:
        return env_dir / f"{self.instance}.env"

    def start(self) -> str | None:
        """Start (or restart what is down in) the target; None on success, else systemctl's words."""
        proc = self.run(["systemctl", "start", self.target])
        return None if proc.returncode == 0 else (proc.stderr.strip() or f"systemctl exited {proc.returncode}")

    def stop(self) -> str | None:
        proc = self.run(["systemctl", "stop", self.target])
        return None if proc.returncode == 0 else (proc.stderr.strip() or f"systemctl exited {proc.returncode}")

    def active(self) -> bool:
        return self.run(["systemctl", "is-active", "--quiet", self.target]).returncode == 0


def for_stack(stack: Path, environ: Mapping[str, str] | None = None) -> StackUnits | None:
    """The stack's units when they should run it: systemd is PID 1, the units are installed, systemctl
    exists, and FARAMESH_NO_SYSTEMD is not set (tests and operators who want detached processes)."""
    env = os.environ if environ is None else environ
    if env.get("FARAMESH_NO_SYSTEMD") or not booted_with_systemd() or not units_installed():
        return None
    if shutil.which("systemctl") is None:
        return None
    return StackUnits(escape_path(Path(os.path.realpath(stack))))
