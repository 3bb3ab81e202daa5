"""`faramesh apply`, `apply --stop` and `unlock` (DESIGN.md §3), as root.

apply: check → compile → write `.faramesh/policy.json` (deterministic; its SHA-256 is the version),
`.faramesh/bin/agent`, `.faramesh/runtime/agent.env` and the state-dir copy the engine reads → converge:
the same version running with everything up is a no-op; another version running is hot-swapped over
operator.sock (`reload`; agents keep running; those whose sandbox settings changed are named); nothing
running → `faramesh serve` and `faramesh supervise` detached, READY awaited → lock the config when
`immutable_config = true` → print socket, launcher line, the launch report and log paths.

Exit codes: 0 ok · 1 policy error (nothing changed) · 2 import/trust failure · 4 runtime failure (not
root, engine not READY in time, an agent or the engine died right after the start, immutable flag not
settable, reload refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from faramesh.engine.paths import StackPaths, stack_paths
from faramesh.supervisor.layout import (
    BOOT,
    SOCKET_INSIDE,
    SYSTEM_PYTHON,
    AgentPlan,
    SupervisorFiles,
    ensure_pkg_root,
    lock_holder,
    plan_agents,
    read_state,
    tail,
    write_private,
)

EXIT_OK, EXIT_FAILED, EXIT_RUNTIME = 0, 1, 4
SETTLE_SECONDS = 3.0  # an engine or agent that dies this soon after the start fails the apply
AGENT_START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0
SANDBOX_RUNTIME_KEYS = ("os_tier", "agent_enforce_profile", "workspace", "strip_env", "env_allow", "supervised_command")


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _err(message: str) -> None:
    sys.stderr.write(f"faramesh apply: {message}\n")
    sys.stderr.flush()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lock_targets(stack: Path) -> list[Path]:
    dot = stack / ".faramesh"
    return [stack / "governance.fms", dot, dot / "policy.json", dot / "bin" / "agent"]


def engine_request(paths: StackPaths, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
    """One request over operator.sock; None when nothing answers."""
    from faramesh.engine.client import operator_request

    return operator_request(str(paths.operator_socket), message, timeout)


def _engine_ready(paths: StackPaths) -> dict[str, Any] | None:
    reply = engine_request(paths, {"type": "status"}, timeout=2.0)
    if reply and "daemon" in reply and reply["daemon"].get("state") == "READY":
        return reply["daemon"]  # type: ignore[no-any-return]
    return None


def shim_text(files: SupervisorFiles, pkg_root: Path, default_agent: str) -> str:
    spec_dir = shlex.quote(str(files.agents_dir))
    return (
        "#!/bin/sh\n"
        "# Written by `faramesh apply`: run a command in this stack's sandbox (the supervisor's code path).\n"
        "#   .faramesh/bin/agent [--agent ID] -- command [args…]\n"
        f"agent={shlex.quote(default_agent)}\n"
        'if [ "$1" = "--agent" ]; then agent="$2"; shift 2; fi\n'
        'case "$agent" in ""|.*|*[!A-Za-z0-9._-]*) echo "agent: bad agent id" >&2; exit 64;; esac\n'
        + (
            # Installed from the .deb: the stable /usr/bin/faramesh, never a path inside the virtualenv,
            # so an upgrade (even to another Python) cannot break a launcher that is immutable.
            f'exec {PACKAGED_CLI} __agent-exec --spec {spec_dir}/"$agent".json "$@"\n'
            if _packaged()
            else f"exec {SYSTEM_PYTHON} -I -S -c {shlex.quote(BOOT)} {shlex.quote(str(pkg_root))} "
            f'--spec {spec_dir}/"$agent".json "$@"\n'
        )
    )


PACKAGED_PREFIX = "/opt/faramesh"
PACKAGED_CLI = "/usr/bin/faramesh"


def _packaged() -> bool:
    return sys.prefix == PACKAGED_PREFIX and os.access(PACKAGED_CLI, os.X_OK)


def agent_env_text(paths: StackPaths, plans: list[AgentPlan]) -> str:
    lines = [f"FARAMESH_STACK_ID={paths.stack_id}"]
    if len(plans) == 1:
        lines.append(f"FARAMESH_SOCKET={SOCKET_INSIDE}")
    for plan in plans:
        name = "".join(c if c.isalnum() else "_" for c in plan.agent_id).upper()
        lines.append(f"FARAMESH_AGENT_SOCKET_{name}={paths.agent_socket(plan.agent_id)}")
    return "\n".join(lines) + "\n"


def _differs(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() != data
    except OSError:
        return True


def _restart_needed(old_raw: bytes | None, policy: Any) -> list[str]:
    """Agents whose sandbox settings (command, profile, workspace, env rules) changed: they keep running
    with the old ones until restarted."""
    if old_raw is None:
        return []
    try:
        old = json.loads(old_raw)
    except ValueError:
        return sorted(policy.agents)
    new = policy.to_dict()
    runtime_changed = any(old.get("runtime", {}).get(k) != new["runtime"].get(k) for k in SANDBOX_RUNTIME_KEYS)
    names = []
    for agent_id, agent in new["agents"].items():
        before = old.get("agents", {}).get(agent_id)
        if runtime_changed or before is None or before.get("command") != agent.get("command"):
            names.append(agent_id)
    return sorted(names)


def _lock_config(stack: Path, version: str) -> tuple[list[str], list[str]]:
    """(every locked path, the paths this call locked)."""
    from faramesh.sandbox import immutable

    locked, newly = [], []
    when = _now()
    for path in lock_targets(stack):
        if not immutable.is_set(str(path)):
            immutable.lock(str(path), version, when)
            newly.append(str(path))
        locked.append(str(path))
    return locked, newly


def record_config_event(paths: StackPaths, event_name: str, files: list[str]) -> dict[str, Any] | None:
    """`config_locked` / `config_unlocked` as a DPR through the engine's operator socket (None: no engine)."""
    event: dict[str, Any] = {"type": "config_event", "event": event_name, "paths": files}
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or ""
    if user:
        event["by"] = user[:256]
    return engine_request(paths, event)


def _record_locked(paths: StackPaths, newly: list[str]) -> None:
    """A `config_locked` DPR for the flags this apply set, through the (READY) engine, so the audit chain
    shows both sides of every unlock window. The flags stay set whatever the engine answers."""
    if not newly:
        return
    reply = record_config_event(paths, "config_locked", newly)
    if reply is None or "error" in reply:
        why = "no answer on operator.sock" if reply is None else reply["error"]
        _err(f"the config is locked, but the engine did not record `config_locked`: {why}")
    else:
        _say(f"recorded config_locked (DPR {reply.get('id')})")


def _unlock_for_write(stack: Path) -> None:
    from faramesh.sandbox import immutable
    from faramesh.sandbox.errors import SandboxError

    for path in lock_targets(stack):
        with contextlib.suppress(FileNotFoundError, SandboxError):
            if path.exists() and immutable.is_set(str(path)):
                immutable.clear_immutable(str(path))


def local_signing_refusal(runtime: Mapping[str, Any], providers: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why `apply` refuses this stack, or None. A stack that writes `mode = "enforce"` declares itself
    production; its audit chain must then be signed by a KMS the host cannot read, unless the operator
    says otherwise: `signing_warning_acknowledged = true`. Local signing means no `kms` provider (the
    engine's own key in the state dir) or `kms` with `backend = "local"` (a key file on this host).
    A stack that does not write `mode` gets the same signing without the refusal (the engine enforces
    either way; only the explicit declaration is held to production's standard). Identity has no stub
    here: `serve` never uses `dev`'s synthesized identities (an agent is known by its socket and
    SO_PEERCRED, kernel-attested, unless an `identity` block says otherwise)."""
    if runtime.get("mode") != "enforce" or runtime.get("signing_warning_acknowledged") is True:
        return None
    kms = [(name, p) for name, p in providers.items() if p.get("type") == "kms"]
    if kms and all(p.get("backend") != "local" for _, p in kms):
        return None
    how = (
        f'provider "{kms[0][0]}" is `kms` with backend = "local" (a key file on this host)'
        if kms
        else "no `kms` provider is declared, so checkpoints would be signed with the engine's local key"
    )
    return (
        f'mode = "enforce" with local audit signing: {how}. Someone who compromises this host could re-sign '
        'the audit history. Declare a `provider "audit-kms" { type = "kms"; backend = "aws-kms" | '
        '"vault-transit" … }`, or acknowledge local signing with `signing_warning_acknowledged = true` '
        "in the runtime block"
    )


def uid_report(stack: Path, registry: Path | None = None) -> tuple[list[str], list[str]]:
    """(lines describing the host uids engine and agents would run as, problems preventing separation)."""
    from faramesh.engine.policy.stack import compile_stack
    from faramesh.supervisor.supervisor import uid_squatters

    policy = compile_stack(stack, registry=registry).policy
    plans = plan_agents(stack, policy, stack_paths(stack))
    from faramesh.supervisor.service_user import lookup_service_user

    engine_uid = os.geteuid()
    service = lookup_service_user() if engine_uid == 0 else None
    if engine_uid == 0:
        engine_uid = service.uid if service is not None else -1
    lines = [f"engine    uid {engine_uid}" + (" (faramesh)" if service else "")]
    if os.geteuid() == 0 and service is None:
        lines[0] = "engine    user faramesh (created by the next `apply`)"
    problems = []
    if os.geteuid() != 0:
        problems.append(
            f"unprivileged: agents would run as the invoking uid {engine_uid} (mapped to 1000 inside):"
            " no uid separation"
        )
    seen: dict[int, str] = {}
    state = read_state(SupervisorFiles(stack_paths(stack))) or {}
    ours = {int(a["pid"]) for a in state.get("agents", {}).values() if a.get("pid")}  # our own C1s
    for plan in plans:
        uid = plan.uid if os.geteuid() == 0 else engine_uid
        lines.append(f'agent     "{plan.agent_id}": uid {uid}, gid {uid}')
        if os.geteuid() != 0:
            continue
        if uid in (0, 65534, engine_uid):
            problems.append(f'agent "{plan.agent_id}": uid {uid} is reserved')
        if uid in seen:
            problems.append(f'agents "{seen[uid]}" and "{plan.agent_id}" share uid {uid}')
        seen[uid] = plan.agent_id
        squat = uid_squatters(uid, ours)
        if squat:
            problems.append(f'agent "{plan.agent_id}": uid {uid} is used outside a sandbox by pid {squat}')
    return lines, problems


def check_uid(stack: Path, registry: Path | None = None) -> int:
    """`apply --check-uid`: report only; exit 0 when uid separation is possible, 4 when not."""
    from faramesh.engine.policy.errors import FarameshError

    try:
        lines, problems = uid_report(Path(os.path.realpath(stack)), registry)
    except FarameshError as err:
        sys.stderr.write(f"error: {err.message}\n")
        return int(err.exit_code)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_FAILED
    for line in lines:
        _say(line)
    for problem in problems:
        _say(f"problem   {problem}")
    _say("uid separation: " + ("possible" if not problems else "NOT possible"))
    return EXIT_OK if not problems else EXIT_RUNTIME


def apply(
    stack: Path,
    *,
    foreground: bool = False,
    registry: Path | None = None,
    require_uid_separation: bool = False,
) -> int:
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.stack import compile_stack
    from faramesh.sandbox.errors import SandboxError
    from faramesh.supervisor import systemd_units
    from faramesh.supervisor.service_user import (
        AWS_ENV,
        ServiceUserError,
        ensure_service_user,
        env_file_values,
        optional_env_values,
        prepare_engine_dirs,
        read_env_file,
        render_env_file,
        secret_references,
        uses_aws,
    )
    from faramesh.supervisor.supervisor import install_agent_specs, start_engine, start_supervisor

    if os.geteuid() != 0:
        if require_uid_separation:
            _err("--require-uid-separation: unprivileged, agents would share the invoking uid; refusing")
            return EXIT_RUNTIME
        _err("needs root (it launches agents under their own uids); use `faramesh dev` unprivileged")
        return EXIT_RUNTIME
    stack = Path(os.path.realpath(stack))
    try:
        compiled = compile_stack(stack, registry=registry)
    except FarameshError as err:
        where = f"{err.pos}: " if err.pos else ""
        sys.stderr.write(f"{where}error: {err.message}\nfaramesh apply: nothing changed\n")
        return int(err.exit_code)
    policy = compiled.policy
    refusal = local_signing_refusal(policy.runtime, policy.providers)
    if refusal is not None:
        _err(f"{refusal}; nothing changed")
        return EXIT_FAILED
    version = policy.version
    paths = stack_paths(stack)
    if require_uid_separation:
        try:
            _, problems = uid_report(stack, registry)
        except ValueError as exc:
            problems = [str(exc)]
        if problems:
            _err("--require-uid-separation: " + "; ".join(problems) + "; nothing changed")
            return EXIT_RUNTIME
    files = SupervisorFiles(paths)
    try:
        plans = plan_agents(stack, policy, paths)
    except ValueError as exc:
        _err(f"{exc}; nothing changed")
        return EXIT_FAILED
    # The engine's account and its secret references, before anything is written.
    try:
        service = ensure_service_user()
    except ServiceUserError as exc:
        _err(f"{exc}; nothing changed")
        return EXIT_RUNTIME
    env_file = paths.env_file()
    names = secret_references(json.loads(policy.to_json()))
    previous_env = read_env_file(env_file)
    env_values, unset = env_file_values(names, os.environ, previous_env)
    if uses_aws(policy.providers):
        env_values.update(optional_env_values(AWS_ENV, os.environ, previous_env))
    if unset:
        _err(
            f"the policy references {', '.join('$' + n for n in unset)}, set neither in this environment nor in"
            f" {env_file}; export it for `apply` (it is kept in {env_file}, root 0600); nothing changed"
        )
        return EXIT_FAILED
    try:
        env_text = render_env_file(env_values).encode()
    except ValueError as exc:
        _err(f"{exc}; nothing changed")
        return EXIT_FAILED
    units = None if foreground else systemd_units.for_stack(stack)

    # 1. Artifacts (only what changed is rewritten, so a converged apply touches nothing).
    pkg_root = ensure_pkg_root(files)
    dot = stack / ".faramesh"
    default_agent = next((p.agent_id for p in plans if p.argv), plans[0].agent_id if plans else "agent")
    artifacts = [
        (dot / "policy.json", policy.to_json(), 0o644),
        (dot / "bin" / "agent", shim_text(files, pkg_root, default_agent).encode(), 0o755),
        (dot / "runtime" / "agent.env", agent_env_text(paths, plans).encode(), 0o644),
    ]
    # Root's view of the state dir: created private, never chmod-ed once it exists (the engine's account
    # shares it through the group and the sticky bit: supervisor/service_user.py).
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not paths.state_dir.is_dir() or paths.state_dir.is_symlink():
        _err(f"{paths.state_dir} is not a directory; nothing changed")
        return EXIT_RUNTIME
    try:
        old_copy: bytes | None = paths.policy_copy.read_bytes()
    except OSError:
        old_copy = None
    changed = [p for p, data, _ in artifacts if _differs(p, data)]
    try:
        if changed:
            _unlock_for_write(stack)
        for path, data, mode in artifacts:
            if path in changed:
                write_private(path, data, mode)
        if _differs(paths.policy_copy, policy.to_json()):
            write_private(paths.policy_copy, policy.to_json(), 0o640)
        os.chown(paths.policy_copy, 0, service.gid)  # the engine reads it through its group; root writes
        if (env_values or env_file.exists()) and _differs(env_file, env_text):
            env_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            write_private(env_file, env_text, 0o600)
        install_agent_specs(stack, files, plans)
    except OSError as exc:
        _err(f"cannot write the applied files: {exc}")
        return EXIT_RUNTIME
    locked: list[str] = []
    newly_locked: list[str] = []
    if policy.runtime.get("immutable_config"):
        try:
            locked, newly_locked = _lock_config(stack, version)
        except (SandboxError, OSError) as exc:
            _err(f"immutable_config = true but the config could not be locked: {exc}")
            return EXIT_RUNTIME

    # 2. The engine: converge, hot swap, or start.
    acted = bool(changed)
    daemon = _engine_ready(paths) if lock_holder(paths.lock_file) is not None else None
    if daemon is not None and daemon.get("policy_version") != version:
        previous = str(daemon.get("policy_version"))
        reply = engine_request(paths, {"type": "reload", "policy_version": version})
        if reply is None or "error" in reply:
            why = (reply or {}).get("error", {}).get("message", "no answer on operator.sock")
            _err(f"the engine refused the new policy; version {previous[:16]} keeps running: {why}")
            return EXIT_RUNTIME
        _say(f"hot-swapped policy {previous[:16]} → {version[:16]} (agents keep running)")
        restart = _restart_needed(old_copy, policy)
        if restart:
            _say(f"sandbox settings changed: restart to apply them: {', '.join(restart)}")
        acted = True
    elif daemon is None:
        if lock_holder(paths.lock_file) is not None:
            _err("an engine holds this stack but is not READY; see `faramesh status` and `faramesh logs --engine`")
            return EXIT_RUNTIME
        timeout = float(policy.runtime.get("cold_start_deny_window", 30)) + 5.0
        deadline = time.monotonic() + timeout
        if units is not None:  # systemd runs the stack: engine and supervisor are the target's units
            prepare_engine_dirs(paths, service, {p.agent_id: p.uid for p in plans}, policy.runtime.get("wal_dir"))
            write_private(units.env_file(), env_text, 0o600)
            problem = units.start()
            if problem is not None:
                _err(f"systemctl start {units.target} failed: {problem}")
                return EXIT_RUNTIME
            while (daemon := _engine_ready(paths)) is None:
                if time.monotonic() > deadline:
                    _err(f"the engine is not READY within {timeout:.0f}s; see `journalctl -u {units.engine}`")
                    return EXIT_RUNTIME
                time.sleep(0.1)
            _say(f"engine READY (pid {daemon.get('pid')}, policy {version[:16]}) under {units.target}")
        proc = start_engine(stack, files, plans, policy.runtime.get("wal_dir")) if daemon is None else None
        while proc is not None and (daemon := _engine_ready(paths)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with status {proc.returncode}"
                    if proc.returncode is not None
                    else (f"not READY within {timeout:.0f}s")
                )
                _err(f"the engine {why}; last lines of {files.engine_log}:\n{tail(files.engine_log)}")
                with contextlib.suppress(ProcessLookupError):
                    if proc.poll() is None:
                        proc.terminate()
                return EXIT_RUNTIME
            time.sleep(0.1)
        if proc is not None and daemon is not None:
            _say(f"engine READY (pid {daemon.get('pid')}, policy {version[:16]})")
        acted = True
    _record_locked(paths, newly_locked)

    # 3. The supervisor and its agents.
    launched = [p for p in plans if p.argv]
    if lock_holder(files.lock_file) is None:
        if foreground:
            _summary(stack, paths, files, launched, locked)
            _say("supervising in the foreground (Ctrl-C stops the agents; the engine keeps running)")
            from faramesh.supervisor.supervisor import run as supervise

            return supervise(stack)
        if units is None:
            start_supervisor(stack, files)
        elif not units.active() and (problem := units.start()) is not None:
            _err(f"systemctl start {units.target} failed: {problem}")
            return EXIT_RUNTIME
        acted = True
        if launched and not _await_agents(paths, files, launched):
            return EXIT_RUNTIME
    if not acted:
        _say(f"up to date: policy {version[:16]}, engine READY, supervisor running; nothing to do")
        return EXIT_OK
    _summary(stack, paths, files, launched, locked)
    return EXIT_OK


def _await_agents(paths: StackPaths, files: SupervisorFiles, plans: list[AgentPlan]) -> bool:
    """Every agent running, then still running (and the engine still up) SETTLE_SECONDS later."""
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    settle_until: float | None = None
    while True:
        state = read_state(files)
        agents = (state or {}).get("agents", {})
        bad = [
            a
            for a in plans
            if agents.get(a.agent_id, {}).get("state") in ("BACKOFF", "FATAL")
            or agents.get(a.agent_id, {}).get("restarts", 0)
        ]
        if bad:
            for plan in bad:
                reason = agents.get(plan.agent_id, {}).get("reason")
                if reason and not agents.get(plan.agent_id, {}).get("restarts", 0):
                    _err(f'agent "{plan.agent_id}" was not launched: {reason}')
                    continue
                _err(
                    f'agent "{plan.agent_id}" died right after its start; last lines of '
                    f"{files.agent_log(plan.agent_id)}:\n{tail(files.agent_log(plan.agent_id))}"
                )
            return False
        if lock_holder(paths.lock_file) is None:
            _err(f"the engine died; last lines of {files.engine_log}:\n{tail(files.engine_log)}")
            return False
        if state is not None and lock_holder(files.lock_file) is None:
            _err(f"the supervisor died; last lines of {files.supervisor_log}:\n{tail(files.supervisor_log)}")
            return False
        running = all(agents.get(a.agent_id, {}).get("state") == "RUNNING" for a in plans)
        now = time.monotonic()
        if running and settle_until is None:
            settle_until = now + SETTLE_SECONDS
        if settle_until is not None and now >= settle_until:
            return True
        if settle_until is None and now > deadline:
            _err(
                f"the agents did not start within {AGENT_START_TIMEOUT:.0f}s; last lines of "
                f"{files.supervisor_log}:\n{tail(files.supervisor_log)}"
            )
            return False
        time.sleep(0.1)


def _summary(stack: Path, paths: StackPaths, files: SupervisorFiles, plans: list[AgentPlan], locked: list[str]) -> None:
    _say(f"socket    {paths.operator_socket}  (operator)")
    for plan in plans:
        _say(
            f'socket    {paths.agent_socket(plan.agent_id)}  (agent "{plan.agent_id}", '
            f"{SOCKET_INSIDE} inside its sandbox)"
        )
    _say(f"launcher  {stack / '.faramesh' / 'bin' / 'agent'} [--agent ID] -- command …")
    for plan in plans:
        try:
            report = files.report_file(plan.agent_id).read_text(errors="replace").strip()
        except OSError:
            report = ""
        _say(f'agent     "{plan.agent_id}": uid {plan.uid}, profile {plan.profile}, workspace {plan.workspace}')
        for line in report.splitlines():
            _say(f"  {line}")
    _say(f"config    {'locked (immutable): ' + ', '.join(locked) if locked else 'not locked (immutable_config off)'}")
    _say(f"logs      {files.engine_log}")
    _say(f"          {files.supervisor_log}")
    for plan in plans:
        _say(f"          {files.agent_log(plan.agent_id)}")


def _wait_unlocked(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while lock_holder(path) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _is_engine(pid: int, stack: Path) -> bool:
    """`faramesh serve --dir STACK`, run by root or the engine's service user."""
    from faramesh.supervisor.service_user import lookup_service_user

    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        uids = next(
            line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")
        )
    except (OSError, StopIteration):
        return False
    service = lookup_service_user()
    allowed = {"0", str(os.geteuid())} | ({str(service.uid)} if service is not None else set())
    return b"serve" in args and str(stack).encode() in args and all(u in allowed for u in uids)


def _wait_gone(pid: int, timeout: float) -> bool:
    from faramesh.supervisor.layout import is_zombie_or_gone

    deadline = time.monotonic() + timeout
    while not is_zombie_or_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _signal(pid: int, signum: int) -> None:
    if pid > 1:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def stop(stack: Path) -> int:
    """Supervisor first (it stops the agents: SIGINT, grace, SIGKILL to each sandbox init), then the
    engine (SIGTERM: it drains and exits 0); then sockets, pid and lock files. Nothing running → 0."""
    from faramesh.supervisor.supervisor import STOP_GRACE

    if os.geteuid() != 0:
        _err("--stop needs root")
        return EXIT_RUNTIME
    from faramesh.supervisor import systemd_units

    stack = Path(os.path.realpath(stack))
    paths = stack_paths(stack)
    files = SupervisorFiles(paths)
    stopped = []
    units = systemd_units.for_stack(stack)
    if units is not None and units.active():  # the units' own stop: agents first (KillMode), then the engine
        problem = units.stop()
        if problem is not None:
            _err(f"systemctl stop {units.target} failed: {problem}; stopping what is left directly")
        else:
            stopped.append(units.target)
    sup = lock_holder(files.lock_file)
    if sup is not None:
        state = read_state(files) or {}
        _signal(sup, signal.SIGTERM)
        if not _wait_unlocked(files.lock_file, STOP_GRACE + 5):
            _signal(sup, signal.SIGKILL)
            for info in state.get("agents", {}).values():
                if info.get("pid"):
                    _kill_tree(int(info["pid"]))
            _wait_unlocked(files.lock_file, 5)
        zygote = state.get("zygote_pid")
        if isinstance(zygote, int):  # it exits once its supervisor is gone and its C1s reaped
            _wait_gone(zygote, 2.0)
        if not _wait_gone(sup, STOP_GRACE + 5):
            _signal(sup, signal.SIGKILL)
            _wait_gone(sup, 5)
        stopped.append(f"supervisor (pid {sup})")
    orphans = _sweep_stack(paths, files)
    if orphans:
        stopped.append(f"{orphans} process(es) left by a dead supervisor")
    eng = lock_holder(paths.lock_file)
    if eng is not None and not _is_engine(eng, stack):
        # engine.lock is the engine user's file: the pid in it is a claim, checked before root signals it.
        _err(f"{paths.lock_file} names pid {eng}, which is not this stack's engine: not signalled")
        eng = None
    if eng is not None:
        _signal(eng, signal.SIGTERM)
        if not _wait_unlocked(paths.lock_file, STOP_TIMEOUT):
            _err(f"the engine (pid {eng}) did not drain within {STOP_TIMEOUT:.0f}s: killed")
            _signal(eng, signal.SIGKILL)
            _wait_unlocked(paths.lock_file, 5)
        # The lock is released as the engine finishes; the process itself is gone a moment later:
        # `--stop` returns only once nothing of the stack runs.
        if not _wait_gone(eng, STOP_TIMEOUT):
            _signal(eng, signal.SIGKILL)
            _wait_gone(eng, 5)
        stopped.append(f"engine (pid {eng})")
    for path in (paths.operator_socket, files.pid_file, files.state_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    agents_dir = paths.runtime_dir / "agents"
    if agents_dir.is_dir():
        for sub in agents_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                (sub / "agent.sock").unlink()
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            agents_dir.rmdir()
    with contextlib.suppress(OSError):
        paths.runtime_dir.rmdir()
    for lock in (files.lock_file, paths.lock_file):
        if lock_holder(lock) is None:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    _say(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return EXIT_OK


def _tagged_processes(tag: str, spec_prefix: str) -> list[int]:
    """The stack's zygote, C1s and sandbox inits (their argv holds `tag`) and launcher sessions (a spec
    under the stack's agents dir), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace") == tag or a.decode(errors="replace").startswith(spec_prefix)
               for a in args):
            found.append(int(entry))
    return found


def _sweep_stack(paths: StackPaths, files: SupervisorFiles, timeout: float = 5.0) -> int:
    """Whatever the stack still runs once its supervisor is gone (SIGKILLed: its zygote waits on, with
    the C1s; or an agent escaped to a new session): SIGKILL the tagged processes, then every process in
    the stack's cgroups (`cgroup.procs`: nothing leaves its cgroup unprivileged), then rmdir them.
    Returns how many processes it killed."""
    from faramesh.sandbox import cgroups
    from faramesh.supervisor.layout import is_zombie_or_gone, process_tag, stack_cgroup

    killed: set[int] = set()
    tagged = _tagged_processes(process_tag(paths.stack_id), f"{files.agents_dir}/")
    for pid in tagged:
        _signal(pid, signal.SIGKILL)
        killed.add(pid)
    for name in cgroups.list_cgroups(stack_cgroup(paths.stack_id)):
        with contextlib.suppress(Exception):
            killed |= cgroups.cgroup_pids(name)
            if not cgroups.kill_cgroup(name, timeout=timeout):
                _err(f"cgroup faramesh/{name}: processes still there after {timeout:.0f}s")
        with contextlib.suppress(Exception):
            cgroups.remove_cgroup(name)
    deadline = time.monotonic() + timeout
    while not all(is_zombie_or_gone(pid) for pid in tagged) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(killed)


def _kill_tree(pid: int) -> None:
    from faramesh.supervisor.supervisor import _children_of

    for child in _children_of(pid):
        _kill_tree(child)
    _signal(pid, signal.SIGKILL)


def unlock(stack: Path) -> int:
    """Clear the immutable flags (the next `apply` re-locks) and record when, in trusted xattrs."""
    from faramesh.sandbox import immutable
    from faramesh.sandbox.errors import SandboxError

    if os.geteuid() != 0:
        sys.stderr.write("faramesh unlock: needs root (CAP_LINUX_IMMUTABLE)\n")
        return EXIT_RUNTIME
    stack = Path(os.path.realpath(stack))
    when = _now()
    cleared = []
    try:
        for path in lock_targets(stack):
            if path.exists() and immutable.is_set(str(path)):
                immutable.unlock(str(path), when)
                cleared.append(str(path))
    except (SandboxError, OSError) as exc:
        sys.stderr.write(f"faramesh unlock: {exc}\n")
        return EXIT_RUNTIME
    if cleared:
        _say(f"config unlocked since {when}: {', '.join(cleared)}")
    else:
        _say("config was not locked")
    # `faramesh unlock` (launchers/cli.py) then records `config_unlocked` through the engine's `config_event`.
    return EXIT_OK
