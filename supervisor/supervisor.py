"""`faramesh supervise --dir DIR`: the root supervisor of one stack (DESIGN.md §2), without typer.

Reads the installed compiled policy (never governance.fms), launches every agent that has a command
through the launch zygote (supervisor/zygote.py: exec'd before anything else, it forks C1 per launch and
runs the one sandbox code path of sandbox/launch.py; when it dies it is restarted, and when it cannot be,
the lean launcher `/usr/bin/python3 -I -S … agent_exec --spec …` is the fallback), watches each C1 through
a pidfd (no SIGCHLD races; the zygote, C1's parent, reaps it and sends its status), refuses to launch an
agent whose uid a process outside any sandbox already uses,
restarts a crashed agent with exponential backoff (1 s doubling to 60 s) and marks it
FATAL after 5 exits in 60 s, restarts a dead engine, and on SIGTERM/SIGINT stops its agents: SIGINT (C1
forwards it to the sandbox init, which forwards it to the agent's process group), 5 s of grace, then
SIGKILL to each sandbox init (the PID namespace takes every descendant with it) and to C1.

One supervisor per stack, held by flock on `<state>/supervisor.lock` (the pid file is informational).
Its state is in `<runtime>/supervisor.json`.

The supervisor has one thread: a poll loop over the zygote's socket, the agents' pidfds and
`<runtime>/supervisor.sock` (supervisor/control.py: list, stop, reload; root only).

Under systemd it sends READY=1 once its agents are launched, WATCHDOG=1 from the poll loop (every half
WATCHDOG_USEC, whatever the traffic) and STOPPING=1 when it stops them (faramesh/sdnotify.py).

Exit codes: 0 stopped cleanly, 4 another supervisor holds the stack / no installed policy, 64 usage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from faramesh.sdnotify import notify as sd_notify
from faramesh.sdnotify import watchdog_interval
from faramesh.supervisor.control import ControlServer
from faramesh.supervisor.layout import (
    SOCKET_INSIDE,
    AgentPlan,
    SupervisorFiles,
    build_spec_json,
    ensure_pkg_root,
    launcher_argv,
    lock_holder,
    open_root_file,
    open_traversal,
    plan_agents,
    prepare_workspace,
    process_tag,
    write_private,
)
from faramesh.supervisor.logrelay import LogRelay
from faramesh.supervisor.service_user import (
    ServiceUser,
    ServiceUserError,
    engine_environment,
    ensure_service_user,
    prepare_engine_dirs,
)
from faramesh.supervisor.violations import ViolationMonitor, engine_sender
from faramesh.supervisor.zygote import Zygote, ZygoteError

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
CRASH_LOOP_EXITS = 5
CRASH_LOOP_WINDOW = 60.0
STOP_GRACE = 5.0
TICK = 0.2
ENGINE_CHECK_INTERVAL = 2.0


def _log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} faramesh supervise: {message}\n")
    sys.stderr.flush()


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
    pid: int | None = None
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | None = None  # the subprocess fallback (no zygote)
    via: str = ""
    state: str = "STARTING"
    reason: str | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    spec_json: str = ""
    backoff: Backoff = field(default_factory=Backoff)
    relay: LogRelay | None = None  # the read end of its stdout/stderr pipe, pumped into its log
    violations: int | None = None  # its launch's token in the ViolationMonitor


def uid_squatters(uid: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Live processes outside any sandbox (in our PID namespace) with `uid` among their real, effective,
    saved or filesystem uids.

    Inside = a deeper PID namespace, read from `NSpid:` in /proc/<pid>/status (world-readable: one pid
    for a process of our namespace, more for one in a namespace below it). Reading /proc/<pid>/ns/pid
    instead needs ptrace access, and a process we could not inspect must never count as sandboxed."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as fh:
                fields = dict(line.split(":", 1) for line in fh.read().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        if str(uid) not in fields.get("Uid", "").split():
            continue
        if len(fields.get("NSpid", entry).split()) <= 1:
            found.append(int(entry))
    return sorted(found)


def _remove_cgroup(plan: AgentPlan) -> None:
    """The agent's sandbox ended: its cgroup goes (it stays while something still runs in it, e.g. a
    launcher session of the same agent; `apply --stop` kills that and removes it)."""
    from faramesh.sandbox import cgroups

    with contextlib.suppress(Exception):
        cgroups.remove_cgroup(plan.cgroup or plan.agent_id)


def control_socket(files: SupervisorFiles) -> Path:
    return files.paths.runtime_dir / "supervisor.sock"


class Supervisor:
    def __init__(
        self, stack: Path, files: SupervisorFiles, plans: list[AgentPlan], pkg_root: Path, zygote: Zygote | None = None
    ) -> None:
        self.stack = stack
        self.files = files
        self.pkg_root = pkg_root
        self.zygote = zygote
        self.zygote_restarts = 0
        self.agents = [Agent(p, files.spec_file(p.agent_id)) for p in plans if p.argv]
        self.stopping = False
        self.engine_backoff = Backoff()
        self.engine_next_check = 0.0
        self.engine_restarts = 0
        self.engine_fatal = False
        self.violations = ViolationMonitor(engine_sender(str(files.paths.operator_socket)))

    # --- agents ------------------------------------------------------------------------------------
    def _agent_env(self, plan: AgentPlan) -> dict[str, str]:
        sock = SOCKET_INSIDE if plan.profile != "off" else str(self.files.paths.agent_socket(plan.agent_id))
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "FARAMESH_SOCKET": sock}

    def _zygote(self) -> Zygote | None:
        """The live zygote; a dead one is restarted (an exec, so safe at any time) once per launch."""
        if self.zygote is not None and self.zygote.alive:
            return self.zygote
        try:
            self.zygote = Zygote(str(self.pkg_root), stderr_fd=2, tag=process_tag(self.files.paths.stack_id))
        except OSError as exc:
            _log(f"cannot restart the launch zygote: {exc}; launching through the subprocess launcher")
            self.zygote = None
            return None
        self.zygote_restarts += 1
        _log(f"launch zygote restarted (pid {self.zygote.pid})")
        return self.zygote

    def _own_pids(self) -> set[int]:
        return {a.pid for a in self.agents if a.pid is not None}

    def start(self, agent: Agent, now: float) -> None:
        squatters = uid_squatters(agent.plan.uid, self._own_pids())
        if squatters:
            agent.reason = (
                f"uid {agent.plan.uid} is already used outside a sandbox by pid "
                f"{', '.join(map(str, squatters))}: refusing to launch"
            )
            delay = agent.backoff.next_delay()
            agent.state = "BACKOFF"
            agent.next_start = now + delay
            _log(f'agent "{agent.plan.agent_id}": {agent.reason} (retry in {delay:.0f}s)')
            return
        agent.reason = None
        try:
            agent.spec_json = agent.spec_file.read_text()
        except OSError:
            agent.spec_json = ""
        # stdout/stderr: a pipe this process relays into the rotated log (supervisor/logrelay.py).
        agent.relay = LogRelay(self.files.agent_log(agent.plan.agent_id))
        log_fd = agent.relay.agent_end()
        report_path = self.files.report_file(agent.plan.agent_id)
        report_fd = os.open(report_path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        env = self._agent_env(agent.plan)
        # The sandbox init sends its seccomp violation listener back on this socket (supervisor/violations.py).
        agent.violations, notify_fd = self.violations.prepare(agent.plan.agent_id)
        try:
            zygote = self._zygote()
            if zygote is not None:
                try:
                    agent.pid, agent.pidfd = zygote.launch(
                        str(agent.spec_file), list(agent.plan.argv), env, log_fd, report_fd, notify_fd=notify_fd
                    )
                    agent.via = "zygote"
                except ZygoteError as exc:
                    _log(f"the launch zygote failed ({exc}); falling back to the subprocess launcher")
            if agent.pid is None:
                argv = [*launcher_argv(self.pkg_root, agent.spec_file, report_fd), "--", *agent.plan.argv]
                agent.popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    pass_fds=(report_fd,),
                    env=env,
                    start_new_session=True,
                    cwd="/",
                )
                agent.pid = agent.popen.pid
                agent.pidfd = os.pidfd_open(agent.pid)  # our child, unreaped until its pidfd fires
                agent.via = "subprocess"
        except OSError as exc:
            _log(f'agent "{agent.plan.agent_id}": cannot start the launcher: {exc}')
            self._clear(agent)
            self._exited(agent, now, 127)
            return
        finally:
            if agent.relay is not None:
                agent.relay.handed_over()
            os.close(report_fd)
            os.close(notify_fd)
        agent.state = "RUNNING"
        agent.started_at = now
        _log(f'agent "{agent.plan.agent_id}": started (C1 pid {agent.pid} via {agent.via}, uid {agent.plan.uid})')

    def _clear(self, agent: Agent) -> None:
        if agent.pidfd is not None:
            os.close(agent.pidfd)
        agent.pid = agent.pidfd = agent.popen = None
        if agent.relay is not None:
            agent.relay.close()
            agent.relay = None
        if agent.violations is not None:
            self.violations.release(agent.violations)
            agent.violations = None

    def _collect(self, agent: Agent) -> int | None:
        """The status of an agent whose pidfd fired: from the zygote (its parent) or our own Popen."""
        if agent.popen is not None:
            code = agent.popen.wait()
            return 128 - code if code < 0 else code
        zygote = self.zygote
        deadline = time.monotonic() + 2.0
        while zygote is not None and agent.pid not in zygote.exits and zygote.alive:
            if time.monotonic() > deadline:
                break
            zygote.drain(0.1)
        if zygote is not None and agent.pid in zygote.exits:
            return zygote.exits.pop(agent.pid)
        return None  # the zygote died and init reaped C1: the status is lost

    def _exited(self, agent: Agent, now: float, code: int | None) -> None:
        agent.last_exit = code
        if self.stopping:
            agent.state = "STOPPED"
            return
        if agent.backoff.record_exit(now, now - agent.started_at):
            agent.state = "FATAL"
            agent.reason = f"crash loop: {CRASH_LOOP_EXITS} exits within {CRASH_LOOP_WINDOW:.0f}s (last status {code})"
            _log(f'agent "{agent.plan.agent_id}": FATAL: {agent.reason}; not restarting')
            return
        delay = agent.backoff.next_delay()
        agent.state = "BACKOFF"
        agent.next_start = now + delay
        agent.restarts += 1
        _log(f'agent "{agent.plan.agent_id}": exited with status {code}; restarting in {delay:.0f}s')

    def fds(self) -> list[int]:
        pidfds = [a.pidfd for a in self.agents if a.pidfd is not None]
        relays = [a.relay.fileno() for a in self.agents if a.relay is not None]
        return pidfds + relays + self.violations.fds()

    def on_ready(self, ready: set[int], now: float) -> None:
        if self.zygote is not None and self.zygote.alive and self.zygote.fileno() in ready:
            self.zygote.drain()
            if not self.zygote.alive:
                _log("the launch zygote died; it is restarted at the next launch")
        self.violations.on_ready(ready)
        for agent in self.agents:
            if agent.relay is not None and agent.relay.fileno() in ready and not agent.relay.pump():
                agent.relay.close()  # every writer is gone; the exit follows on the pidfd
                agent.relay = None
            if agent.pidfd is not None and agent.pidfd in ready:
                code = self._collect(agent)
                self._clear(agent)
                _remove_cgroup(agent.plan)
                self._exited(agent, now, code)

    def poll(self, now: float) -> None:
        for agent in self.agents:
            due = agent.pid is None and agent.state in ("STARTING", "BACKOFF") and now >= agent.next_start
            if due and not self.stopping:
                self.start(agent, now)

    def _signal(self, agent: Agent, signum: int) -> None:
        if agent.pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(agent.pidfd, signum)

    def _ended(self, agent: Agent) -> bool:
        if agent.pidfd is None:
            return True
        return bool(select.select([agent.pidfd], [], [], 0)[0])

    def stop_some(self, agents: list[Agent]) -> None:
        """SIGINT (C1 forwards it to the sandbox init, which forwards it to the agent's group), grace, then
        SIGKILL to each sandbox init (the PID namespace takes every descendant) and to C1's group."""
        running = [a for a in agents if a.pidfd is not None]
        for agent in running:
            self._signal(agent, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and not all(self._ended(a) for a in running):
            time.sleep(0.05)
        for agent in running:
            if not self._ended(agent):
                assert agent.pid is not None
                for child in _children_of(agent.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(agent.pid, signal.SIGKILL)  # profile off: no PID namespace, C1's session
                self._signal(agent, signal.SIGKILL)
                _log(f'agent "{agent.plan.agent_id}": still running after {STOP_GRACE:.0f}s: killed')
                if agent.pidfd is not None:
                    select.select([agent.pidfd], [], [], 5.0)
            agent.last_exit = self._collect(agent)
            self._clear(agent)
            agent.state = "STOPPED"

    def stop_agents(self) -> None:
        """stop_some, then whatever is left in each agent's cgroup (a profile-off agent's setsid'd
        descendants, a launcher session of the same agent) is killed and the cgroup removed."""
        self.stop_some(self.agents)
        from faramesh.sandbox import cgroups

        for agent in self.agents:
            with contextlib.suppress(Exception):
                cgroups.kill_cgroup(agent.plan.cgroup or agent.plan.agent_id, timeout=2.0)
            _remove_cgroup(agent.plan)

    # --- control -----------------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the installed policy: agents whose command or sandbox spec changed are restarted."""
        from faramesh.engine.runner import EngineStartError, load_installed_policy

        try:
            policy = load_installed_policy(self.files.paths.policy_copy)
            plans = [p for p in plan_agents(self.stack, policy, self.files.paths) if p.argv]
            install_agent_specs(self.stack, self.files, plans)
        except (EngineStartError, ValueError, OSError) as exc:
            return {"error": {"code": "RELOAD_FAILED", "message": str(exc)}}
        by_id = {a.plan.agent_id: a for a in self.agents}
        wanted = {p.agent_id: p for p in plans}
        removed = [a for a in self.agents if a.plan.agent_id not in wanted]
        changed = []
        for plan in plans:
            agent = by_id.get(plan.agent_id)
            if agent is None:
                continue
            try:
                spec_json = agent.spec_file.read_text()
            except OSError:
                spec_json = ""
            if plan != agent.plan or (agent.pid is not None and spec_json != agent.spec_json):
                changed.append(agent)
        self.stop_some(removed + changed)
        now = time.monotonic()
        for agent in changed:
            agent.plan = wanted[agent.plan.agent_id]
            agent.state, agent.next_start, agent.reason, agent.backoff = "STARTING", now, None, Backoff()
        added = [Agent(p, self.files.spec_file(p.agent_id)) for p in plans if p.agent_id not in by_id]
        self.agents = [a for a in self.agents if a not in removed] + added
        _log(
            f"reload: restarted {[a.plan.agent_id for a in changed]}, added {[a.plan.agent_id for a in added]}"
            f", removed {[a.plan.agent_id for a in removed]}"
        )
        return {
            "ok": True,
            "restarted": sorted(a.plan.agent_id for a in changed),
            "added": sorted(a.plan.agent_id for a in added),
            "removed": sorted(a.plan.agent_id for a in removed),
        }

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        verb = request.get("verb", request.get("type"))
        if verb == "list":
            return {
                "supervisor": {"pid": os.getpid(), "zygote_pid": self.zygote.pid if self.zygote else None},
                "agents": self.agent_list(),
            }
        if verb == "stop":
            self.stopping = True
            return {"ok": True}
        if verb == "reload":
            return self.reload()
        return {"error": {"code": "UNKNOWN_VERB", "message": f"unknown verb {verb!r} (list, stop, reload)"}}

    # --- engine ------------------------------------------------------------------------------------
    def check_engine(self, now: float) -> None:
        """Without systemd the supervisor keeps the engine running (restarted with the same backoff)."""
        if self.engine_fatal or now < self.engine_next_check or self.stopping:
            return
        if os.environ.get("FARAMESH_ENGINE_UNIT"):  # under systemd the engine is its own unit's to restart
            return
        self.engine_next_check = now + ENGINE_CHECK_INTERVAL
        if lock_holder(self.files.paths.lock_file) is not None:
            return
        if self.engine_backoff.record_exit(now, CRASH_LOOP_WINDOW + 1 if self.engine_restarts == 0 else 0):
            self.engine_fatal = True
            _log("the engine keeps dying: FATAL, not restarting it")
            return
        _log("the engine is not running: restarting it")
        try:
            start_engine(self.stack, self.files)  # plans of every agent, from the installed policy
        except (OSError, ServiceUserError) as exc:
            _log(f"cannot restart the engine: {exc}")
        self.engine_restarts += 1
        self.engine_next_check = now + self.engine_backoff.next_delay() + ENGINE_CHECK_INTERVAL

    # --- state -------------------------------------------------------------------------------------
    def agent_list(self) -> list[dict[str, Any]]:
        return [
            {
                "id": a.plan.agent_id,
                "pid": a.pid,
                "state": a.state,
                "restarts": a.restarts,
                "last_exit": a.last_exit,
                "uid": a.plan.uid,
                "reason": a.reason,
                "via": a.via or None,
            }
            for a in self.agents
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "zygote_pid": self.zygote.pid if self.zygote is not None and self.zygote.alive else None,
            "zygote_restarts": self.zygote_restarts,
            "stopping": self.stopping,
            "engine_restarts": self.engine_restarts,
            "engine_fatal": self.engine_fatal,
            "agents": {
                a.plan.agent_id: {
                    "state": a.state,
                    "pid": a.pid,
                    "uid": a.plan.uid,
                    "profile": a.plan.profile,
                    "restarts": a.restarts,
                    "last_exit": a.last_exit,
                    "reason": a.reason,
                    "via": a.via or None,
                    "started_at": a.started_at,
                    "log": str(self.files.agent_log(a.plan.agent_id)),
                }
                for a in self.agents
            },
        }


def _start_detached(
    command: str,
    stack: Path,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    user: ServiceUser | None = None,
) -> subprocess.Popen[bytes]:
    """`faramesh <command> --dir STACK` detached: its own session, no death signal, output to `log`
    (opened here, as root: the child never needs the log directory). With `user`, the child starts as
    that user with only its operators group (Popen switches ids after fork, before exec)."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    ids: dict[str, Any] = {}
    if user is not None:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": [user.operators_gid]}
    try:
        return subprocess.Popen(
            # -I: root starts these; PYTHONPATH, the user's site-packages and the cwd must not add code.
            [sys.executable, "-I", "-m", "faramesh.launchers.main", command, "--dir", str(stack)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            cwd="/",
            env=env,
            **ids,
        )
    finally:
        os.close(fd)


def start_engine(stack: Path, files: SupervisorFiles, plans: list[AgentPlan] | None = None,
                 wal_dir: str | None = None) -> subprocess.Popen[bytes]:
    """The engine, detached. As root it runs as the `faramesh` service user (DESIGN.md §2) with the
    environment `engine_environment` builds; `plans` name the agents whose socket dirs it needs."""
    if os.geteuid() != 0:
        return _start_detached("serve", stack, files.engine_log)
    user = ensure_service_user()
    if plans is None or wal_dir is None:
        from faramesh.engine.runner import load_installed_policy

        with contextlib.suppress(Exception):
            policy = load_installed_policy(files.paths.policy_copy)
            plans = plans if plans is not None else plan_agents(stack, policy, files.paths)
            wal_dir = wal_dir if wal_dir is not None else policy.runtime.get("wal_dir")
    prepare_engine_dirs(files.paths, user, {p.agent_id: p.uid for p in plans or []}, wal_dir)
    env = engine_environment(files.paths, os.environ)
    return _start_detached("serve", stack, files.engine_log, env=env, user=user)


def start_supervisor(stack: Path, files: SupervisorFiles) -> subprocess.Popen[bytes]:
    return _start_detached("supervise", stack, files.supervisor_log)


def install_agent_specs(stack: Path, files: SupervisorFiles, plans: list[AgentPlan]) -> None:
    """Workspaces (owned by each agent's uid) and the 0600 spec files the launcher reads."""
    files.agents_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(files.agents_dir, 0o700)
    for plan in plans:
        prepare_workspace(plan)
        write_private(files.spec_file(plan.agent_id), build_spec_json(plan, stack).encode())


def _acquire(files: SupervisorFiles) -> IO[str] | None:
    files.lock_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The state dir is shared with the engine's user: never open root's lock through a link it planted.
    handle = os.fdopen(open_root_file(files.lock_file, 0o644), "a+")  # held for the supervisor's lifetime
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
    zygote: Zygote | None = None
    sup: Supervisor | None = None
    control: ControlServer | None = None
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
        # The zygote first: exec'd (python3 -I -S, empty environment) while this process is single-threaded;
        # every launch forks there, never here. (The supervisor never starts a thread: one poll loop.)
        try:
            zygote = Zygote(str(pkg_root), stderr_fd=2, tag=process_tag(paths.stack_id))
        except OSError as exc:
            _log(f"cannot start the launch zygote ({exc}): launching through the subprocess launcher")
        open_traversal(paths)
        install_agent_specs(stack, files, plans)
        write_private(files.pid_file, f"{os.getpid()}\n".encode(), 0o644)
        sup = Supervisor(stack, files, plans, pkg_root, zygote)
        control = ControlServer(control_socket(files))

        def on_signal(signum: int, _frame: object) -> None:
            sup.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _log(
            f"supervising {len(sup.agents)} agent(s) for {stack} (zygote pid {zygote.pid if zygote else None}, "
            f"control {control.path})"
        )
        last: str | None = None
        notified = False
        watchdog = watchdog_interval()
        next_tick = 0.0
        while not sup.stopping:
            now = time.monotonic()
            if watchdog is not None and now >= next_tick:  # the poll timeout is the timer; no thread
                sd_notify("WATCHDOG=1")
                next_tick = now + watchdog
            sup.poll(now)
            sup.check_engine(now)
            sup.violations.flush(now)
            snap = json.dumps(sup.snapshot(), sort_keys=True)
            if snap != last:
                write_private(files.state_file, snap.encode(), 0o644)
                last = snap
            if not notified:
                sd_notify("READY=1")
                notified = True
            poller = select.poll()
            watched = [control.fileno(), *sup.fds()]
            if sup.zygote is not None and sup.zygote.alive:
                watched.append(sup.zygote.fileno())
            for fd in watched:
                poller.register(fd, select.POLLIN)
            try:
                ready = {fd for fd, _ in poller.poll(TICK * 1000)}
            except InterruptedError:
                continue
            now = time.monotonic()
            sup.on_ready(ready, now)
            if control.fileno() in ready:
                control.serve_pending(sup.handle)
        sd_notify("STOPPING=1")
        _log("stopping agents")
        sup.stop_agents()
        sup.violations.close()
        write_private(files.state_file, json.dumps(sup.snapshot(), sort_keys=True).encode(), 0o644)
        return 0
    finally:
        if control is not None:
            control.close()
        for z in {zygote, sup.zygote if sup is not None else None}:
            if z is not None:
                z.close()
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
