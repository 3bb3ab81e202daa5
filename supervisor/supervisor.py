"""`faramesh supervise --dir DIR`: the root supervisor of one stack (DESIGN.md §2), without typer.

Reads the installed compiled policy (never governance.fms), launches every agent that has a command
through the lean launcher (`/usr/bin/python3 -I -S … agent_exec --spec …`: the one sandbox code path of
sandbox/launch.py), restarts a crashed agent with exponential backoff (1 s doubling to 60 s) and marks it
FATAL after 5 exits in 60 s, restarts a dead engine, and on SIGTERM/SIGINT stops its agents: SIGINT (C1
forwards it to the sandbox init, which forwards it to the agent's process group), 5 s of grace, then
SIGKILL to each sandbox init (the PID namespace takes every descendant with it) and to C1.

One supervisor per stack, held by flock on `<state>/supervisor.lock` (the pid file is informational).
Its state is in `<runtime>/supervisor.json`.

Not yet: the launch zygote of DESIGN.md §5 (each launch execs a fresh launcher interpreter instead, so
the supervisor never forks itself into a sandbox), `supervisor.sock`, stdout relaying with rotation (the
agent's stdout/stderr are its log file, opened by the supervisor), WATCHDOG=1.

Exit codes: 0 stopped cleanly, 4 another supervisor holds the stack / no installed policy, 64 usage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from faramesh.supervisor.layout import (
    SOCKET_INSIDE,
    AgentPlan,
    SupervisorFiles,
    build_spec_json,
    ensure_pkg_root,
    launcher_argv,
    lock_holder,
    open_traversal,
    plan_agents,
    prepare_workspace,
    write_private,
)

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
CRASH_LOOP_EXITS = 5
CRASH_LOOP_WINDOW = 60.0
STOP_GRACE = 5.0
TICK = 0.2
ENGINE_CHECK_INTERVAL = 2.0
LOG_ROTATE_BYTES = 10 * 1024 * 1024


def _log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} faramesh supervise: {message}\n")
    sys.stderr.flush()


def sd_notify(state: str) -> None:
    """READY=1 / STOPPING=1 to systemd's NOTIFY_SOCKET when set (abstract names start with @)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), target)


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


@dataclass
class Backoff:
    delay: float = BACKOFF_START
    exits: collections.deque[float] = field(default_factory=collections.deque)

    def record_exit(self, now: float, ran_for: float) -> bool:
        """True when this exit makes a crash loop (FATAL)."""
        if ran_for > CRASH_LOOP_WINDOW:
            self.delay = BACKOFF_START
        self.exits.append(now)
        while self.exits and now - self.exits[0] > CRASH_LOOP_WINDOW:
            self.exits.popleft()
        return len(self.exits) >= CRASH_LOOP_EXITS

    def next_delay(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        return delay


@dataclass
class Agent:
    plan: AgentPlan
    spec_file: Path
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"
    started_at: float = 0.0
    next_start: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    backoff: Backoff = field(default_factory=Backoff)


class Supervisor:
    def __init__(self, stack: Path, files: SupervisorFiles, plans: list[AgentPlan], pkg_root: Path) -> None:
        self.stack = stack
        self.files = files
        self.pkg_root = pkg_root
        self.agents = [Agent(p, files.spec_file(p.agent_id)) for p in plans if p.argv]
        self.stopping = False
        self.engine_backoff = Backoff()
        self.engine_next_check = 0.0
        self.engine_restarts = 0
        self.engine_fatal = False

    # --- agents ------------------------------------------------------------------------------------
    def _agent_env(self, plan: AgentPlan) -> dict[str, str]:
        sock = SOCKET_INSIDE if plan.profile != "off" else str(self.files.paths.agent_socket(plan.agent_id))
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "FARAMESH_SOCKET": sock}

    def start(self, agent: Agent, now: float) -> None:
        log_path = self.files.agent_log(agent.plan.agent_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        report_path = self.files.report_file(agent.plan.agent_id)
        report_fd = os.open(report_path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            argv = [*launcher_argv(self.pkg_root, agent.spec_file, report_fd), "--", *agent.plan.argv]
            agent.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(report_fd,),
                env=self._agent_env(agent.plan),
                start_new_session=True,
                cwd="/",
            )
        except OSError as exc:
            _log(f'agent "{agent.plan.agent_id}": cannot start the launcher: {exc}')
            agent.proc = None
            self._exited(agent, now, 127)
            return
        finally:
            os.close(log_fd)
            os.close(report_fd)
        agent.state = "running"
        agent.started_at = now
        _log(f'agent "{agent.plan.agent_id}": started (launcher pid {agent.proc.pid}, uid {agent.plan.uid})')

    def _exited(self, agent: Agent, now: float, code: int) -> None:
        agent.last_exit = code
        agent.proc = None
        if self.stopping:
            agent.state = "stopped"
            return
        if agent.backoff.record_exit(now, now - agent.started_at):
            agent.state = "FATAL"
            _log(
                f'agent "{agent.plan.agent_id}": FATAL: {CRASH_LOOP_EXITS} exits within {CRASH_LOOP_WINDOW:.0f}s'
                f" (last status {code}); not restarting"
            )
            return
        delay = agent.backoff.next_delay()
        agent.state = "backoff"
        agent.next_start = now + delay
        agent.restarts += 1
        _log(f'agent "{agent.plan.agent_id}": exited with status {code}; restarting in {delay:.0f}s')

    def poll(self, now: float) -> None:
        for agent in self.agents:
            if agent.proc is not None:
                code = agent.proc.poll()
                if code is not None:
                    self._exited(agent, now, code)
            elif agent.state in ("starting", "backoff") and now >= agent.next_start and not self.stopping:
                self.start(agent, now)

    def stop_agents(self) -> None:
        running = [a for a in self.agents if a.proc is not None]
        for agent in running:
            assert agent.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(a.proc is not None and a.proc.poll() is None for a in running):
            time.sleep(0.05)
        for agent in running:
            proc = agent.proc
            assert proc is not None
            if proc.poll() is None:
                # Each sandbox init (C2) is C1's child: SIGKILL to it ends its PID namespace.
                for child in _children_of(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # profile off: no PID namespace, C1's session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                _log(f'agent "{agent.plan.agent_id}": still running after {STOP_GRACE:.0f}s: killed')
            code = proc.wait()
            agent.proc = None
            agent.last_exit = code
            agent.state = "stopped"
        from faramesh.sandbox import cgroups

        for agent in self.agents:
            with contextlib.suppress(Exception):  # an empty leaf left behind is harmless
                cgroups.remove_cgroup(agent.plan.agent_id)

    # --- engine ------------------------------------------------------------------------------------
    def check_engine(self, now: float) -> None:
        """Without systemd the supervisor keeps the engine running (restarted with the same backoff)."""
        if self.engine_fatal or now < self.engine_next_check or self.stopping:
            return
        self.engine_next_check = now + ENGINE_CHECK_INTERVAL
        if lock_holder(self.files.paths.lock_file) is not None:
            return
        if self.engine_backoff.record_exit(now, CRASH_LOOP_WINDOW + 1 if self.engine_restarts == 0 else 0):
            self.engine_fatal = True
            _log("the engine keeps dying: FATAL, not restarting it")
            return
        _log("the engine is not running: restarting it")
        start_engine(self.stack, self.files)
        self.engine_restarts += 1
        self.engine_next_check = now + self.engine_backoff.next_delay() + ENGINE_CHECK_INTERVAL

    # --- state -------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "stopping": self.stopping,
            "engine_restarts": self.engine_restarts,
            "engine_fatal": self.engine_fatal,
            "agents": {
                a.plan.agent_id: {
                    "state": a.state,
                    "pid": a.proc.pid if a.proc is not None else None,
                    "uid": a.plan.uid,
                    "profile": a.plan.profile,
                    "restarts": a.restarts,
                    "last_exit": a.last_exit,
                    "started_at": a.started_at,
                    "log": str(self.files.agent_log(a.plan.agent_id)),
                }
                for a in self.agents
            },
        }


def start_engine(stack: Path, files: SupervisorFiles) -> subprocess.Popen[bytes]:
    """`faramesh serve --dir STACK` detached: its own session, no death signal, output to engine.log."""
    files.engine_log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(files.engine_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "faramesh.launchers.main", "serve", "--dir", str(stack)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(fd)


def start_supervisor(stack: Path, files: SupervisorFiles) -> subprocess.Popen[bytes]:
    files.supervisor_log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(files.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "faramesh.launchers.main", "supervise", "--dir", str(stack)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(fd)


def install_agent_specs(stack: Path, files: SupervisorFiles, plans: list[AgentPlan]) -> None:
    """Workspaces (owned by each agent's uid) and the 0600 spec files the launcher reads."""
    files.agents_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(files.agents_dir, 0o700)
    for plan in plans:
        prepare_workspace(plan)
        write_private(files.spec_file(plan.agent_id), build_spec_json(plan, stack).encode())


def _acquire(files: SupervisorFiles) -> IO[str] | None:
    files.lock_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(files.lock_file, "a+")  # noqa: SIM115 - held for the supervisor's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def run(stack: Path) -> int:
    from faramesh.engine.paths import stack_paths
    from faramesh.engine.runner import EngineStartError, load_installed_policy

    paths = stack_paths(stack)
    files = SupervisorFiles(paths)
    lock = _acquire(files)
    if lock is None:
        _log(f"another supervisor already runs for this stack (lock {files.lock_file})")
        return 4
    try:
        try:
            policy = load_installed_policy(paths.policy_copy)
            plans = plan_agents(stack, policy, paths)
        except (EngineStartError, ValueError, OSError) as exc:
            _log(str(exc))
            return 4
        if any(p.argv for p in plans) and os.geteuid() != 0:
            _log("launching sandboxed agents with their own uids needs root")
            return 4
        pkg_root = ensure_pkg_root(files)
        open_traversal(paths)
        install_agent_specs(stack, files, plans)
        write_private(files.pid_file, f"{os.getpid()}\n".encode(), 0o644)
        sup = Supervisor(stack, files, plans, pkg_root)

        def on_signal(signum: int, _frame: object) -> None:
            sup.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _log(f"supervising {len(sup.agents)} agent(s) for {stack}")
        last: str | None = None
        notified = False
        while not sup.stopping:
            now = time.monotonic()
            sup.poll(now)
            sup.check_engine(now)
            snap = json.dumps(sup.snapshot(), sort_keys=True)
            if snap != last:
                write_private(files.state_file, snap.encode(), 0o644)
                last = snap
            if not notified:
                sd_notify("READY=1")
                notified = True
            time.sleep(TICK)
        sd_notify("STOPPING=1")
        _log("stopping agents")
        sup.stop_agents()
        write_private(files.state_file, json.dumps(sup.snapshot(), sort_keys=True).encode(), 0o644)
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            files.pid_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            files.state_file.unlink()
        lock.close()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"faramesh supervise: {message}\n")
        raise SystemExit(64)


def main(argv: list[str]) -> int:
    parser = _Parser(prog="faramesh supervise", description="Run the root supervisor for a stack.")
    parser.add_argument("--dir", type=Path, default=None, help="stack directory")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from faramesh.engine.policy.stack import find_stack_dir

    stack = ns.dir or find_stack_dir(Path.cwd())
    if stack is None:
        sys.stderr.write("faramesh supervise: no stack here; pass --dir\n")
        return 64
    return run(Path(os.path.abspath(stack)))
