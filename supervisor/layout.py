"""What `apply`, `supervise`, `apply --stop`, `unlock` and `logs` agree on: the supervisor's files, the
per-agent launch plans (SandboxSpec + argv), the package mapping the lean launcher runs from, and the
flock-based "is it running" checks (a stale pid file never blocks anything: the lock decides).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faramesh.engine.paths import StackPaths
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.sandbox.spec import valid_agent_id

SYSTEM_PYTHON = "/usr/bin/python3"
# The lean launcher's boot line: `-S` leaves site-packages out, so the package root comes as argv[1].
BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from faramesh.launchers.agent_exec import run; run()"
)
# Agents' host uids as root: base + 16 * (stack slot) + agent index (never 0, 65534 or the engine's).
UID_BASE = 61000
UID_STACK_SLOTS = 256
AGENTS_PER_STACK = 16
SOCKET_INSIDE = "/run/faramesh/agent.sock"
SUBPACKAGES = ("engine", "sandbox", "supervisor", "launchers")


@dataclass(frozen=True)
class SupervisorFiles:
    paths: StackPaths

    @property
    def pid_file(self) -> Path:
        return self.paths.runtime_dir / "supervisor.pid"

    @property
    def lock_file(self) -> Path:
        return self.paths.state_dir / "supervisor.lock"

    @property
    def state_file(self) -> Path:
        """What the supervisor runs right now (JSON, rewritten atomically on every change)."""
        return self.paths.runtime_dir / "supervisor.json"

    @property
    def agents_dir(self) -> Path:
        return self.paths.state_dir / "agents"

    def spec_file(self, agent_id: str) -> Path:
        return self.agents_dir / f"{agent_id}.json"

    def report_file(self, agent_id: str) -> Path:
        return self.agents_dir / f"{agent_id}.report"

    def agent_log(self, agent_id: str) -> Path:
        return self.paths.log_dir / f"agent-{agent_id}.log"

    @property
    def engine_log(self) -> Path:
        return self.paths.log_dir / "engine.log"

    @property
    def supervisor_log(self) -> Path:
        return self.paths.log_dir / "supervisor.log"

    @property
    def pkg_root(self) -> Path:
        """World-readable (never under a 0700 dir of its own): the state dir's parent, not the state dir."""
        return self.paths.state_dir.parent / "pkg"


def lock_holder(path: Path) -> int | None:
    """The pid recorded in a flock'ed lock file when a live process holds the lock, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.read(fd, 64).decode(errors="replace").strip()
            return int(raw) if raw.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomic replace; never follows a symlink at `path` (the rename replaces the link itself).

    The temporary file gets an unpredictable name and O_EXCL: root writes into directories the engine's
    user can also create entries in (sticky root:faramesh, supervisor/service_user.py), and a name it
    could guess and create first would hand it a descriptor on what root writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)


def open_root_file(path: Path, mode: int = 0o600) -> int:
    """A root-owned regular file at `path`, opened read-write and never through a symlink: anything else
    there (a link, a FIFO, a file another user planted in a directory it may write) is removed first —
    root may, the directories are its own — and the file is created anew with O_EXCL."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        fd = -1
    except OSError:  # ELOOP (a symlink) and the like: not ours
        fd = -1
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
    if fd >= 0:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
        path.unlink()
    return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)


def ensure_pkg_root(files: SupervisorFiles) -> Path:
    """A directory whose `faramesh/` is the installed package, for `python3 -I -S` (no site-packages).

    A regular install: the site-packages directory itself. The editable install (the package is assembled
    from several checkout directories): a directory of symlinks mapping each subpackage to its real dir.
    """
    import faramesh

    top = Path(faramesh.__file__).resolve().parent
    if all((top / sub / "__init__.py").exists() for sub in SUBPACKAGES):
        return top.parent
    import importlib

    root = files.pkg_root
    pkg = root / "faramesh"
    pkg.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(pkg, 0o755)
    wanted = {"__init__.py": top / "__init__.py"}
    for sub in SUBPACKAGES:
        mod = importlib.import_module(f"faramesh.{sub}")
        wanted[sub] = Path(str(mod.__file__)).resolve().parent
    for name, target in wanted.items():
        link = pkg / name
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(link) == str(target):
                continue
            link.unlink()
        os.symlink(target, link)
    return root


def launcher_argv(pkg_root: Path, spec_file: Path, report_fd: int | None = None) -> list[str]:
    argv = [SYSTEM_PYTHON, "-I", "-S", "-c", BOOT, str(pkg_root), "--spec", str(spec_file)]
    if report_fd is not None:
        argv += ["--report-fd", str(report_fd)]
    return argv


@dataclass(frozen=True)
class AgentPlan:
    agent_id: str
    argv: tuple[str, ...]
    profile: str
    uid: int
    workspace: Path
    socket_dir: Path
    cgroup: str = ""  # faramesh/<cgroup>: `<stack>/<agent>` (stack_cgroup), never shared across stacks
    # With an `egress` block: where the launch hands its proxy listener to the engine (engine/egress_service.py).
    egress_intake: Path | None = None
    # `runtime { env_allow = […]; strip_env = […] }`: names added to the environment allow-list, and globs
    # added to the deny list (sandbox/credentials.py; deny wins).
    env_allow: tuple[str, ...] = ()
    env_deny: tuple[str, ...] = ()

    def sandbox_settings(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "profile": self.profile, "workspace": str(self.workspace),
                "egress": self.egress_intake is not None}


def stack_cgroup(stack_id: str) -> str:
    """The stack's cgroup segment (its agents' cgroups are faramesh/<this>/<agent id>): the stack id made
    safe for a path segment (its directory name may hold any character), keeping its hash suffix."""
    name, _, digest = stack_id.rpartition("-")
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)[:40]
    clean = clean.lstrip("._-") or "stack"
    return f"{clean}-{digest}" if digest.isalnum() else clean


def process_tag(stack_id: str) -> str:
    """An argv element of the stack's zygote (and, forked from it, of every C1 and sandbox init): what
    `apply --stop` finds in /proc when the supervisor died and left them behind."""
    return f"faramesh-stack={stack_cgroup(stack_id)}"


def _stack_slot(stack_id: str) -> int:
    """The slot a stack prefers (a hash of its id); `allocate_slot` moves it on when that is taken."""
    return int(hashlib.sha256(stack_id.encode()).hexdigest()[:8], 16) % UID_STACK_SLOTS


def allocate_slot(paths: StackPaths) -> int:
    """The stack's uid slot, recorded in `<state root>/uid-slots.json` under flock, so two stacks on one
    host never get the same agent uids: the preferred slot, else the next free one. A stack keeps its
    slot across applies (its workspace is owned by those uids)."""
    registry = paths.state_dir.parent / "uid-slots.json"
    registry.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(registry, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            data = json.loads(fh.read() or "{}")
        except ValueError:
            data = {}
        slots = data.get("slots") if isinstance(data, dict) else None
        if not isinstance(slots, dict):
            slots = {}
        mine = slots.get(paths.stack_id)
        if isinstance(mine, int) and 0 <= mine < UID_STACK_SLOTS:
            return mine
        taken = {v for v in slots.values() if isinstance(v, int)}
        start = _stack_slot(paths.stack_id)
        for step in range(UID_STACK_SLOTS):
            slot = (start + step) % UID_STACK_SLOTS
            if slot not in taken:
                break
        else:
            raise ValueError(f"all {UID_STACK_SLOTS} agent uid slots are taken ({registry})")
        slots[paths.stack_id] = slot
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"slots": slots}, sort_keys=True, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
        return slot


def plan_agents(stack: Path, policy: CompiledPolicy, paths: StackPaths) -> list[AgentPlan]:
    """A plan per agent (each gets its uid, workspace and spec, so `.faramesh/bin/agent --agent ID` works
    for all); the supervisor launches those with an argv: `command`, or the single agent's
    `runtime.supervised_command`. Commands are split with shell rules (shlex), never run by a shell."""
    stack = Path(os.path.realpath(stack))
    runtime = policy.runtime
    supervised = runtime.get("supervised_command")
    profile = str(runtime.get("agent_enforce_profile") or "full")
    if runtime.get("os_tier") is False:
        profile = "off"
    ws_setting = runtime.get("workspace")
    workspace = Path(str(ws_setting)) if ws_setting else Path("workspace")
    if not workspace.is_absolute():
        workspace = stack / workspace
    workspace = Path(os.path.normpath(workspace))
    slot = allocate_slot(paths)
    plans = []
    for index, agent_id in enumerate(sorted(policy.agents)):
        command = policy.agents[agent_id].command or (supervised if len(policy.agents) == 1 else None)
        if index >= AGENTS_PER_STACK:
            raise ValueError(f"at most {AGENTS_PER_STACK} agents per applied stack")
        try:
            argv = tuple(shlex.split(str(command))) if command else ()
        except ValueError as exc:
            raise ValueError(f'agent "{agent_id}": command {command!r}: {exc}') from None
        if command and not argv:
            raise ValueError(f'agent "{agent_id}": empty command')
        uid = UID_BASE + slot * AGENTS_PER_STACK + index
        # Several agents never share a workspace (each owns its own): one subdirectory each.
        ws = workspace if len(policy.agents) == 1 else workspace / agent_id
        cgroup = f"{stack_cgroup(paths.stack_id)}/{agent_id}"
        if not valid_agent_id(agent_id):
            # Checked before `apply` writes anything: the sandbox names hosts, cgroups and specs after it.
            raise ValueError(
                f'agent "{agent_id}" cannot be launched in a sandbox: an applied agent id is 1-63 letters, digits,'
                " '.', '_' or '-' (no '/'); rename it, or run it with `faramesh dev`"
            )
        has_egress = policy.agents[agent_id].settings.get("egress") is not None and profile != "off"
        intake = paths.runtime_dir / "egress.sock" if has_egress else None
        plans.append(
            AgentPlan(
                agent_id, argv, profile, uid, ws, paths.agent_socket(agent_id).parent, cgroup, intake,
                _strings(runtime.get("env_allow")), _strings(runtime.get("strip_env")),
            )
        )
    return plans


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else ()


def prepare_workspace(plan: AgentPlan) -> None:
    """Create the workspace and give it to the agent's uid (never following a symlink at the leaf)."""
    plan.workspace.mkdir(parents=True, exist_ok=True)
    fd = os.open(plan.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, plan.uid, plan.uid)
        os.fchmod(fd, 0o750)
    finally:
        os.close(fd)


# The port the proxy listener takes inside every sandbox's own network namespace (one per sandbox, so
# every agent can use the same one): HTTP(S)_PROXY=http://127.0.0.1:3128.
EGRESS_PROXY_PORT = 3128


def build_spec_json(plan: AgentPlan, stack: Path) -> str:
    from faramesh.sandbox.launch import build_spec, spec_to_json

    spec = build_spec(
        plan.profile,
        plan.agent_id,
        plan.uid,
        plan.uid,
        str(plan.workspace),
        os.path.normpath(os.path.realpath(stack)),
        socket_dir=str(plan.socket_dir),
        hidden_paths=(str(stack / ".faramesh"),),
        cgroup_name=plan.cgroup or None,
        env_allow=plan.env_allow,
        env_deny_globs=plan.env_deny,
        egress_port=EGRESS_PROXY_PORT if plan.egress_intake is not None else None,
        egress_intake=str(plan.egress_intake) if plan.egress_intake is not None else None,
    )
    return spec_to_json(spec)


def open_traversal(paths: StackPaths) -> None:
    """The agent (its own uid, inside its user namespace) must reach its socket directory to bind-mount
    it: the runtime dir and `agents/` get search-only permission for others (no listing); operator.sock
    itself stays root-only."""
    for d in (paths.runtime_dir, paths.runtime_dir / "agents"):
        d.mkdir(parents=True, exist_ok=True, mode=0o711)
        st = os.lstat(d)
        if st.st_uid == os.geteuid():  # keep the sticky bit and the engine's group write; never other-write
            os.chmod(d, (st.st_mode & 0o7777 & ~0o002) | 0o711)


def read_state(files: SupervisorFiles) -> dict[str, Any] | None:
    try:
        data = json.loads(files.state_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError as e:
        return e.errno in (errno.ENOENT, errno.ESRCH)


def tail(path: Path, lines: int = 20) -> str:
    try:
        data = path.read_bytes()[-65536:]
    except OSError:
        return f"(no log at {path})\n"
    text = data.decode(errors="replace").splitlines()[-lines:]
    return "".join(f"  | {line}\n" for line in text)
