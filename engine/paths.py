"""Where a stack's state, runtime and log files live (DESIGN.md §2). Pure functions of the stack
directory, the effective uid and the environment, so tests can point them anywhere."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SUN_PATH_MAX = 107
# The engine's own account (DESIGN.md §2): a root-applied stack's engine runs as this user and uses the
# system layout (/var/lib, /run, /var/log), like root does.
SERVICE_USER = "faramesh"
OPERATORS_GROUP = "faramesh-operators"


def service_uid() -> int | None:
    import pwd

    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        return None


def stack_id(stack_dir: Path) -> str:
    real = os.path.realpath(stack_dir)
    return f"{Path(real).name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"


def agent_dir_name(agent_id: str) -> str:
    """Agent ids may contain '/', so the per-agent socket directory is named by a hash."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StackPaths:
    stack_id: str
    state_dir: Path
    runtime_dir: Path
    log_dir: Path

    @property
    def operator_socket(self) -> Path:
        return self.runtime_dir / "operator.sock"

    @property
    def dev_socket(self) -> Path:
        return self.runtime_dir / "dev.sock"

    def agent_socket(self, agent_id: str) -> Path:
        return self.runtime_dir / "agents" / agent_dir_name(agent_id) / "agent.sock"

    @property
    def policy_copy(self) -> Path:
        return self.state_dir / "policy.json"

    @property
    def signing_key(self) -> Path:
        return self.state_dir / "signing.key"

    @property
    def hmac_key(self) -> Path:
        return self.state_dir / "engine.key"

    def env_file(self, env: Mapping[str, str] | None = None) -> Path:
        """The engine's environment file for secret references (root 0600; `apply` writes it, whoever
        starts the engine reads it as root): `/etc/faramesh/<stack-id>.env`, or under $FARAMESH_CONFIG_DIR."""
        env = os.environ if env is None else env
        return Path(env.get("FARAMESH_CONFIG_DIR") or "/etc/faramesh") / f"{self.stack_id}.env"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "engine.lock"

    def wal_path(self, wal_dir: str | None) -> Path:
        return (Path(wal_dir) if wal_dir else self.state_dir) / f"{self.stack_id}.sqlite"


def stack_paths(stack_dir: Path, *, euid: int | None = None, env: Mapping[str, str] | None = None) -> StackPaths:
    env = os.environ if env is None else env
    if euid is None:
        euid = os.geteuid()
        if euid != 0 and euid == service_uid():
            euid = 0  # the engine of a root-applied stack: the same layout `apply` made
    sid = stack_id(stack_dir)
    if env.get("FARAMESH_STATE_DIR"):
        state = Path(env["FARAMESH_STATE_DIR"]) / sid
    elif euid == 0:
        state = Path("/var/lib/faramesh") / sid
    else:
        base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/nonexistent")) / ".local" / "state")
        state = Path(base) / "faramesh" / sid
    if env.get("FARAMESH_RUNTIME_DIR"):
        runtime = Path(env["FARAMESH_RUNTIME_DIR"]) / sid
    elif euid == 0:
        runtime = Path("/run/faramesh") / sid
    else:
        runtime = Path(env.get("XDG_RUNTIME_DIR") or f"/tmp/faramesh-{euid}") / "faramesh" / sid
    # Sockets must fit sun_path: fall back to a short directory when the natural one is too long.
    longest = runtime / "agents" / ("x" * 16) / "agent.sock"
    if len(str(longest)) > SUN_PATH_MAX:
        # Root never in world-writable /tmp (another user could own /tmp/fm-0 first): /run/faramesh/s.
        short = Path("/run/faramesh/s") if euid == 0 else Path(f"/tmp/fm-{euid}")
        runtime = short / hashlib.sha256(str(runtime).encode()).hexdigest()[:12]
    if env.get("FARAMESH_LOG_DIR"):
        log = Path(env["FARAMESH_LOG_DIR"]) / sid
    else:
        log = Path("/var/log/faramesh") / sid if euid == 0 else state / "log"
    return StackPaths(sid, state, runtime, log)
