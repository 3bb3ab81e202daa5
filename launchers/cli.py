"""The `faramesh` command line. Each command imports what it needs inside its body, so `--help`
and `check` do not pay for the rest of the product at start-up.

Exit codes (DESIGN.md §4): 0 ok · 1 check failed / policy error · 2 import or trust failure ·
3 warnings under --strict · 4 runtime failure · 64 usage error · 70 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.stack import CompiledStack

EXIT_OK, EXIT_FAILED, EXIT_IMPORT, EXIT_WARN, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3, 4, 64, 70

app = typer.Typer(
    name="faramesh",
    help="Policy enforcement, provenance and OS confinement for AI agents.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(StrEnum):
    text = "text"
    json = "json"


DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir", help="Stack directory (default: the nearest directory at or above . holding governance.fms)."
    ),
]
RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="Registry directory searched first for imports (offline)."),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Output format; json is a stable schema (README).")]
SecretsOpt = Annotated[
    bool,
    typer.Option("--allow-literal-secrets", help="Accept secrets written literally in secret fields."),
]


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _stack_dir(given: Path | None) -> Path:
    from faramesh.engine.policy.stack import find_stack_dir

    if given is not None:
        return given
    found = find_stack_dir(Path.cwd())
    if found is None:
        _fail_usage("no governance.fms here or in any parent directory; pass --dir or run `faramesh init`")
    return found


def _fail_usage(message: str) -> NoReturn:
    sys.stderr.write(f"faramesh: {message}\n")
    raise typer.Exit(EXIT_USAGE)


def _source_line(err: FarameshError, stack: Path | None) -> str:
    """`<line>` and a caret under the column, when the error points into the stack's own file."""
    import unicodedata

    if err.pos is None or stack is None or not err.pos.line:
        return ""
    path = stack / err.pos.file
    try:
        # Split on "\n" only, as the parser counts lines: splitlines() also breaks at \f, \x85, \u2028….
        lines = [ln.removesuffix("\r") for ln in path.read_bytes().decode("utf-8").split("\n")]
    except (OSError, UnicodeDecodeError):
        return ""
    if not 0 < err.pos.line <= len(lines):
        return ""
    # Control and format characters (NUL, ESC, BOM, zero-width) would reach the terminal raw or vanish
    # and shift the caret: show each as one replacement character.
    raw = lines[err.pos.line - 1]
    text = "".join("\ufffd" if c != "\t" and unicodedata.category(c) in ("Cc", "Cf") else c for c in raw)
    # Keep the line's tabs in the caret's indent so both expand alike in a terminal.
    indent = "".join(c if c == "\t" else " " for c in text[: max(0, err.pos.column - 1)])
    caret = indent + "^" if err.pos.column else ""
    return f"  {text}\n  {caret}\n" if caret else f"  {text}\n"


def _report_error(err: FarameshError, stack: Path | None, fmt: Format) -> NoReturn:
    if fmt is Format.json:
        _emit_json(
            {
                "ok": False,
                "error": {
                    "code": err.code,
                    "message": err.message,
                    "file": err.pos.file if err.pos else None,
                    "line": err.pos.line if err.pos else None,
                    "column": err.pos.column if err.pos else None,
                },
            }
        )
    else:
        where = f"{err.pos}: " if err.pos else ""
        sys.stderr.write(f"{where}error: {err.message}\n{_source_line(err, stack)}")
        if err.hint:
            sys.stderr.write(f"  hint: {err.hint}\n")
    raise typer.Exit(err.exit_code)


def _compile(stack: Path, registry: Path | None, allow_literal_secrets: bool, fmt: Format) -> CompiledStack:
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.stack import compile_stack

    try:
        return compile_stack(stack, registry=registry, allow_literal_secrets=allow_literal_secrets)
    except FarameshError as err:
        _report_error(err, stack, fmt)


@app.command()
def check(
    dir: DirOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 when there are warnings.")] = False,
    registry: RegistryOpt = None,
    allow_literal_secrets: SecretsOpt = False,
    format: FormatOpt = Format.text,
) -> None:
    """Validate the stack's policy: syntax, schema, imports and signatures, warnings."""
    stack = _stack_dir(dir)
    compiled = _compile(stack, registry, allow_literal_secrets, format)
    policy = compiled.policy
    code = EXIT_WARN if strict and compiled.findings else EXIT_OK
    if format is Format.json:
        _emit_json(
            {
                "ok": code == EXIT_OK,
                "file": compiled.source.path.name,
                "policy_version": policy.version,
                "agents": sorted(policy.agents),
                "rules": sum(len(a.rules) for a in policy.agents.values()),
                "imports": [dict(i) for i in policy.imports],
                "warnings": [f.to_dict() for f in compiled.findings],
            }
        )
    else:
        for f in compiled.findings:
            sys.stderr.write(f"{f.ref}: warning: {f.message} [{f.code}]\n")
        rules = sum(len(a.rules) for a in policy.agents.values())
        sys.stdout.write(
            f"{compiled.source.path.name}: valid — {len(policy.agents)} agent(s), {rules} rule(s), "
            f"{len(policy.imports)} verified import(s); policy version {policy.version[:16]}\n"
        )
        if code == EXIT_WARN:
            sys.stderr.write(f"{len(compiled.findings)} warning(s) and --strict: exit 3\n")
    raise typer.Exit(code)


@app.command("test")
def test_cmd(
    dir: DirOpt = None,
    fixture: Annotated[
        list[Path] | None,
        typer.Option("--fixture", help="Fixture file to run (repeatable; default tests/*.fmtest.json)."),
    ] = None,
    registry: RegistryOpt = None,
    format: FormatOpt = Format.text,
) -> None:
    """Run decision fixtures against the compiled policy."""
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.fixtures import find_fixtures, load_fixture, run_fixture

    stack = _stack_dir(dir)
    compiled = _compile(stack, registry, False, format)
    paths = list(fixture) if fixture else find_fixtures(stack)
    if not paths:
        _fail_usage(f"no fixtures: {stack}/tests/*.fmtest.json is empty and no --fixture was given")
    results = []
    try:
        for path in paths:
            results.extend(run_fixture(compiled.policy, path, load_fixture(path)))
    except FarameshError as err:
        _report_error(err, None, format)
    failed = [r for r in results if not r.passed]
    if format is Format.json:
        cases = [r.to_dict() for r in results]
        _emit_json({"passed": len(results) - len(failed), "failed": len(failed), "cases": cases})
    else:
        for r in results:
            if r.passed:
                sys.stdout.write(f"PASS {r.fixture} :: {r.name} → {r.got['effect']}\n")
            else:
                sys.stdout.write(f"FAIL {r.fixture} :: {r.name}: expected {r.expected}, got {r.got}\n")
        sys.stdout.write(f"{len(results) - len(failed)} passed, {len(failed)} failed\n")
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


@app.command()
def plan(
    dir: DirOpt = None,
    registry: RegistryOpt = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Also re-evaluate the requests the WAL recorded in this window (e.g. 24h)."),
    ] = None,
    strict_replay: Annotated[
        bool, typer.Option("--strict-replay", help="Exit 2 when the replay changes any decision (default --since 24h).")
    ] = False,
    format: FormatOpt = Format.text,
) -> None:
    """Compile and show what would change against the running or last applied policy."""
    from faramesh.engine.policy.diff import diff_policies

    stack = _stack_dir(dir)
    compiled = _compile(stack, registry, False, format)
    new = compiled.policy.to_dict()
    base, compared_with = _plan_base(stack)
    try:
        changes = diff_policies(base, new)
    except (KeyError, TypeError, AttributeError) as exc:
        _fail_policy(f"{stack / '.faramesh' / 'policy.json'} is malformed ({exc!r}); re-run `faramesh apply`")
    base_version = None
    if base is not None:
        import hashlib

        from faramesh.engine.policy.model import canonical_json

        base_version = hashlib.sha256(canonical_json(base)).hexdigest()
    replay = None
    if since is not None or strict_replay:
        from faramesh.launchers.audit import plan_replay

        replay = plan_replay(stack, compiled.policy, base, since or "24h")
    replay_code = EXIT_IMPORT if strict_replay and replay is not None and replay.get("changed") else EXIT_OK
    if format is Format.json:
        _emit_json(
            {
                "compared_with": compared_with,
                "base_version": base_version,
                "new_version": compiled.policy.version,
                "changes": [c.to_dict() for c in changes],
                **({"replay": replay} if replay is not None else {}),
            }
        )
        raise typer.Exit(replay_code)
    labels = {
        "applied": f"the last applied policy (.faramesh/policy.json, version {str(base_version)[:16]})",
        "none": "nothing: no engine is running and this stack has never been applied",
    }
    sys.stdout.write(f"comparing with {labels[compared_with]}\n")
    for change in changes:
        sys.stdout.write(change.text() + "\n")
    if not changes:
        sys.stdout.write("no changes\n")
    else:
        counts = {op: sum(1 for c in changes if c.op == op) for op in "+-~"}
        sys.stdout.write(f"{counts['+']} added, {counts['-']} removed, {counts['~']} changed\n")
    if replay is not None:
        from faramesh.launchers.audit import plan_replay_text

        sys.stdout.write(plan_replay_text(replay))
        if replay_code:
            sys.stderr.write(f"--strict-replay: {replay['changed']} recorded decision(s) would change: exit 2\n")
    raise typer.Exit(replay_code)


def _plan_base(stack: Path) -> tuple[dict[str, Any] | None, str]:
    """The policy to diff against: the running engine's (once it exists), else the applied artifact."""
    from faramesh.engine.policy.errors import CompiledPolicyError
    from faramesh.engine.policy.model import policy_from_json

    applied = stack / ".faramesh" / "policy.json"
    try:
        raw = applied.read_bytes()
    except FileNotFoundError:
        return None, "none"
    except OSError as exc:
        _fail_policy(f"{applied} is unreadable ({exc.strerror}); re-run `faramesh apply`")
    try:
        policy_from_json(raw)  # refuses other formats and malformed artifacts
        data = json.loads(raw)
    except (CompiledPolicyError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _fail_policy(f"{applied} is not a compiled policy ({exc}); re-run `faramesh apply`")
    return data, "applied"


def _fail_policy(message: str) -> NoReturn:
    """A broken artifact is a policy error (exit 1), not a usage error."""
    sys.stderr.write(f"faramesh: {message}\n")
    raise typer.Exit(EXIT_FAILED)


@app.command("compile")
def compile_cmd(
    dir: DirOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the artifact here (default: standard output).")
    ] = None,
    registry: RegistryOpt = None,
    allow_literal_secrets: SecretsOpt = False,
) -> None:
    """Write the deterministic compiled policy (its SHA-256 is the policy version)."""
    stack = _stack_dir(dir)
    compiled = _compile(stack, registry, allow_literal_secrets, Format.text)
    data = compiled.policy.to_json()
    if out is None:
        sys.stdout.buffer.write(data + b"\n" if sys.stdout.isatty() else data)
    else:
        try:
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
        except OSError as exc:
            sys.stderr.write(f"faramesh: cannot write {out}: {exc.strerror}\n")
            raise typer.Exit(EXIT_FAILED) from None
    sys.stderr.write(f"policy version {compiled.policy.version}\n")
    raise typer.Exit(EXIT_OK)


STARTER_POLICY = """\
# governance.fms — written by `faramesh init`. Check it with `faramesh check`,
# try it with `faramesh test`, run it with `faramesh dev`.

agent "my-agent" {
  default deny

  rules {
    # permit: the call goes ahead
    permit docs/search
    # defer: a human approves or denies (`faramesh approvals`)
    defer email/send if recipients > 10
    permit email/send
    # deny: refused, with a reason the agent sees
    deny shell/* reason "no shell access"
  }

  rate_limit "email/send": 20 per hour
}
"""


@app.command()
def init(dir: DirOpt = None) -> None:
    """Write a starter governance.fms (default deny, one rule of each effect)."""
    from faramesh.engine.policy.stack import POLICY_FILES

    target = dir or Path.cwd()
    existing = [n for n in POLICY_FILES if (target / n).exists()]
    if existing:
        sys.stderr.write(f"faramesh: {target / existing[0]} already exists; init never overwrites\n")
        raise typer.Exit(EXIT_FAILED)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with open(target / "governance.fms", "x", encoding="utf-8") as fh:
            fh.write(STARTER_POLICY)
    except OSError as exc:
        sys.stderr.write(f"faramesh: cannot write {target / 'governance.fms'}: {exc.strerror}\n")
        raise typer.Exit(EXIT_FAILED) from None
    sys.stdout.write(f"wrote {target / 'governance.fms'}; next: faramesh check --dir {target}\n")
    raise typer.Exit(EXIT_OK)


class Profile(StrEnum):
    full = "full"
    minimal = "minimal"
    off = "off"


@app.command()
def preflight(
    profile: Annotated[Profile, typer.Option("--profile", help="Sandbox profile to check.")] = Profile.full,
    format: FormatOpt = Format.text,
) -> None:
    """Can this host deliver a sandbox profile? Exit 0 yes, 4 no (naming what is missing)."""
    from faramesh.sandbox.errors import SandboxError
    from faramesh.sandbox.preflight import run_preflight

    try:
        report = run_preflight(profile.value)
    except SandboxError as exc:
        sys.stderr.write(f"faramesh preflight: {exc}\n")
        raise typer.Exit(EXIT_RUNTIME) from None
    data = report.to_dict()
    if format is Format.json:
        _emit_json(data)
    else:
        for key, value in data.items():
            if key not in ("problems", "warnings", "can_deliver"):
                sys.stdout.write(f"{key:<22} {value}\n")
        for w in report.warnings:
            sys.stdout.write(f"warning: {w}\n")
        for p in report.problems:
            sys.stdout.write(f"missing: {p}\n")
        verdict = "can" if report.can_deliver else "CANNOT"
        sys.stdout.write(f"this host {verdict} deliver profile {profile.value}\n")
    raise typer.Exit(EXIT_OK if report.can_deliver else EXIT_RUNTIME)


@app.command()
def dev(dir: DirOpt = None, registry: RegistryOpt = None) -> None:
    """Run the engine in the foreground with in-process stubs (in-memory WAL, no sandbox)."""
    from faramesh.engine.runner import dev_server, run, stack_paths

    stack = _stack_dir(dir)
    compiled = _compile(stack, registry, False, Format.text)
    server = dev_server(compiled.policy, stack, stack_paths(stack))
    raise typer.Exit(run(server))


@app.command()
def serve(
    dir: DirOpt = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Compiled policy to serve (default: the copy `apply` installed).")
    ] = None,
) -> None:
    """Run the production engine from the installed compiled policy (never reads governance.fms)."""
    from faramesh.launchers.serve import main as serve_main

    argv = (["--dir", str(dir)] if dir else []) + (["--policy", str(policy)] if policy else [])
    raise typer.Exit(serve_main(argv))


@app.command()
def supervise(dir: DirOpt = None) -> None:
    """Run the root supervisor alone (what `apply` starts detached): launches, confines, restarts agents."""
    from faramesh.supervisor.supervisor import main as supervise_main

    raise typer.Exit(supervise_main(["--dir", str(dir)] if dir else []))


@app.command()
def apply(
    dir: DirOpt = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Stay attached as the supervisor instead of detaching one.")
    ] = False,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop the agents, the supervisor and the engine; remove sockets.")
    ] = False,
    check_uid: Annotated[
        bool,
        typer.Option("--check-uid", help="Report the host uids engine and agents would run as (4: no separation)."),
    ] = False,
    require_uid_separation: Annotated[
        bool, typer.Option("--require-uid-separation", help="Refuse unless every agent gets its own host uid.")
    ] = False,
    registry: RegistryOpt = None,
) -> None:
    """As root: compile, install, start or hot-swap the engine, launch the sandboxed agents, lock the config."""
    from faramesh.launchers import apply as apply_mod

    stack = _stack_dir(dir)
    if stop:
        raise typer.Exit(apply_mod.stop(stack))
    if check_uid:
        raise typer.Exit(apply_mod.check_uid(stack, registry=registry))
    raise typer.Exit(
        apply_mod.apply(stack, foreground=foreground, registry=registry, require_uid_separation=require_uid_separation)
    )


@app.command()
def unlock(dir: DirOpt = None) -> None:
    """As root: clear the immutable flags `apply` set (the next `apply` locks again) and record a
    `config_unlocked` DPR through the running engine.

    Exit 0: unlocked (or nothing was locked), and recorded — or the engine is not running, so there is
    nothing to record it on (said on stderr; the trusted xattrs keep the time). Exit 4: not root, a flag
    could not be cleared, or the engine is running but refused to record the event (the flags are
    cleared all the same)."""
    from faramesh.engine.paths import stack_paths
    from faramesh.launchers import apply as apply_mod
    from faramesh.sandbox import immutable
    from faramesh.sandbox.errors import SandboxError

    stack = Path(os.path.realpath(_stack_dir(dir)))
    locked: list[str] = []
    for path in apply_mod.lock_targets(stack):
        try:
            if path.exists() and immutable.is_set(str(path)):
                locked.append(str(path))
        except (SandboxError, OSError):
            continue
    rc = apply_mod.unlock(stack)
    if rc != EXIT_OK or not locked:
        raise typer.Exit(rc)
    reply = apply_mod.record_config_event(stack_paths(stack), "config_unlocked", locked)
    if reply is None:
        sys.stderr.write(
            "faramesh unlock: the engine is not running: `config_unlocked` could not be recorded in the audit log "
            "(the unlock time is kept in the files' trusted xattrs)\n"
        )
        raise typer.Exit(EXIT_OK)
    if "error" in reply:
        why = reply["error"].get("message", reply["error"]) if isinstance(reply["error"], dict) else reply["error"]
        sys.stderr.write(f"faramesh unlock: the config is unlocked, but the engine did not record it: {why}\n")
        raise typer.Exit(EXIT_RUNTIME)
    sys.stdout.write(f"recorded config_unlocked (DPR {reply.get('id')})\n")
    raise typer.Exit(EXIT_OK)


@app.command()
def logs(
    engine: Annotated[bool, typer.Option("--engine", help="The engine's log (the default).")] = False,
    supervisor: Annotated[bool, typer.Option("--supervisor", help="The supervisor's log.")] = False,
    agent: Annotated[str | None, typer.Option("--agent", help="This agent's stdout/stderr.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing what is appended (Ctrl-C ends).")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many last lines to print first.")] = 50,
    dir: DirOpt = None,
) -> None:
    """Print (and with -f follow) the engine's, the supervisor's or an agent's log."""
    import time

    from faramesh.engine.runner import stack_paths
    from faramesh.supervisor.layout import SupervisorFiles

    if sum([engine, supervisor, agent is not None]) > 1:
        _fail_usage("give one of --engine, --supervisor, --agent ID")
    files = SupervisorFiles(stack_paths(_stack_dir(dir)))
    path = files.supervisor_log if supervisor else files.agent_log(agent) if agent else files.engine_log
    if agent is not None and ("/" in agent or agent.startswith(".")):
        _fail_usage(f"bad agent id {agent!r}")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - followed below
    except OSError as exc:
        sys.stderr.write(f"faramesh logs: {path}: {exc.strerror}\n")
        raise typer.Exit(EXIT_FAILED) from None
    with fh:
        data = fh.read()
        text = data.decode(errors="replace").splitlines(keepends=True)
        sys.stdout.write("".join(text[-lines:] if lines > 0 else []))
        sys.stdout.flush()
        if not follow:
            raise typer.Exit(EXIT_OK)
        try:
            while True:
                chunk = fh.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.25)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_OK) from None


def _engine_request(stack: Path, message: dict[str, Any], socket_path: Path | None = None) -> dict[str, Any]:
    """One request to the running engine's operator (or dev) socket; exits 4 when none answers."""
    import socket as socketlib

    from faramesh.engine.runner import stack_paths

    candidates = [socket_path] if socket_path else []
    paths = stack_paths(stack)
    candidates += [paths.operator_socket, paths.dev_socket]
    last_error = "no engine socket found"
    for path in candidates:
        if path is None or not path.exists():
            continue
        try:
            with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                sock.sendall(json.dumps(message).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            reply = json.loads(data)
        except (OSError, ValueError) as exc:
            last_error = f"{path}: {exc}"
            continue
        if not isinstance(reply, dict):
            last_error = f"{path}: unreadable reply"
            continue
        return reply
    sys.stderr.write(f"faramesh: the engine for {stack} is not running ({last_error})\n")
    raise typer.Exit(EXIT_RUNTIME)


SocketOpt = Annotated[
    Path | None, typer.Option("--socket", help="Engine socket (default: the stack's operator or dev socket).")
]


WATCH_INTERVAL_S = 1.0


@app.command()
def status(
    dir: DirOpt = None,
    socket: SocketOpt = None,
    format: FormatOpt = Format.text,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Redraw every second until Ctrl-C (json: one object per line); exits 0."),
    ] = False,
) -> None:
    """Engine, supervisor and agents, config lock, policy, WAL, budgets, approvals. Exit 0 READY, 2
    initialising, 3 degraded (also: supervisor dead, an agent FATAL or refused), 4 down."""
    stack = _stack_dir(dir)
    if not watch:
        raise typer.Exit(_status_once(stack, socket, format))
    import time

    clear = sys.stdout.isatty() and format is Format.text
    try:
        while True:
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            try:
                _status_once(stack, socket, format, compact=True)
            except typer.Exit:  # not running (said on stderr): keep watching, it may come back
                if format is Format.json:
                    sys.stdout.write(json.dumps({"daemon": {"state": "DOWN"}}, sort_keys=True) + "\n")
                else:
                    sys.stdout.write("engine    DOWN (not running)\n")
            sys.stdout.flush()
            time.sleep(WATCH_INTERVAL_S)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


def _status_once(stack: Path, socket: Path | None, format: Format, *, compact: bool = False) -> int:
    """Print the engine's status once; the exit code it means. `compact`: JSON on one line (--watch)."""
    emit = (lambda d: sys.stdout.write(json.dumps(d, sort_keys=True) + "\n")) if compact else _emit_json
    reply = _engine_request(stack, {"type": "status"}, socket)
    if "error" in reply:
        code = reply["error"].get("code")
        if format is Format.json:
            emit(
                {
                    "daemon": {"state": "INITIALIZING" if code == "DAEMON_NOT_READY" else "UNKNOWN"},
                    "error": reply["error"],
                }
            )
        else:
            sys.stdout.write(f"engine: {reply['error'].get('message')}\n")
        return EXIT_IMPORT if code == "DAEMON_NOT_READY" else EXIT_RUNTIME
    daemon = reply["daemon"]
    sup = _supervisor_status(stack)
    config = _config_status(stack)
    if sup is not None:
        reply["supervisor"] = sup
    if config is not None:
        reply["config"] = config
    if format is Format.json:
        emit(reply)
    else:
        wal = daemon["wal"]
        degraded = f" (degraded: {daemon['last_error']})" if daemon["degraded"] else ""
        dev_tag = "  dev" if daemon["dev"] else ""
        sys.stdout.write(
            f"engine    {daemon['state']}{degraded}  pid {daemon['pid']}  up {daemon['uptime_seconds']}s"
            f"  mode {daemon['mode']}{dev_tag}\n"
            f"policy    {daemon['policy_version'][:16]}  applied {daemon['applied_at']}\n"
            f"wal       {wal.get('backend', '?')} {wal.get('path') or ''} seq {wal.get('seq')} "
            f"signed through {wal.get('signed_through')}\n"
            f"approvals {reply['approvals']['pending']} pending\n"
        )
        for line in _signing_status_lines(wal.get("checkpoints"), reply.get("providers") or []):
            sys.stdout.write(line)
        for b in reply["budgets"]:
            used = b["spent_cents"] + b["reserved_cents"]
            name = f"{b['agent_id']}/{b['name']}" + (" (fleet)" if b.get("scope") == "fleet" else "")
            sys.stdout.write(f"budget    {name}: {used}c of {b['max_cents']}c, {b['calls']} calls\n")
        alerts = reply.get("alerts")
        if alerts:
            sys.stdout.write(
                f"alerts    {alerts['sent']} sent, {alerts['failed']} failed, {alerts['dropped']} dropped, "
                f"{alerts['queued']} queued\n"
            )
        for sink in reply.get("sinks") or []:
            error = sink.get("last_error") or {}
            why = f"  last error: {error.get('message')}" if error.get("message") else ""
            sys.stdout.write(
                f"sink      {sink.get('name')} ({sink.get('type')}): {sink.get('health')}  "
                f"{sink.get('delivered', 0)} delivered, {sink.get('spooled', 0)} spooled{why}\n"
            )
        for block in reply.get("identity") or []:
            if block.get("type") in (None, "peercred"):
                continue
            why = f"  last error: {block['last_error']}" if block.get("last_error") else ""
            sys.stdout.write(f"identity  {block.get('name')} ({block.get('type')}): {block.get('health')}{why}\n")
        proxy = reply.get("egress_proxy")
        if proxy:
            refusals = sum(int(a.get("refusals", 0)) for a in (proxy.get("agents") or {}).values())
            state = "running" if proxy.get("running") else "RESTARTING"
            sys.stdout.write(
                f"egress    proxy {state}  pid {proxy.get('pid')}  {proxy.get('listeners', 0)} listener(s), "
                f"{proxy.get('open_connections', 0)} open, {refusals} refused, {proxy.get('restarts', 0)} restarts\n"
            )
        if sup is not None:
            if sup["alive"]:
                sys.stdout.write(f"supervisor running  pid {sup['pid']}  zygote {sup.get('zygote_pid')}\n")
            else:
                sys.stdout.write(f"supervisor DEAD (degraded: last pid {sup['pid']}; agents are not supervised)\n")
            for a in sup["agents"]:
                why = f"  ({a['reason']})" if a.get("reason") else ""
                sys.stdout.write(
                    f"agent     {a['id']}: {a['state']}  pid {a['pid']}  uid {a['uid']}  restarts {a['restarts']}"
                    f"  last exit {a['last_exit']}{why}\n"
                )
        if config is not None:
            sys.stdout.write(f"config    {config['summary']}\n")
    if daemon["state"] != "READY":
        return EXIT_IMPORT
    troubled = sup is not None and (
        not sup["alive"] or any(a["state"] == "FATAL" or a.get("reason") for a in sup["agents"])
    )
    return EXIT_WARN if daemon["degraded"] or troubled else EXIT_OK


def _signing_status_lines(checkpoints: Any, providers: list[dict[str, Any]]) -> list[str]:
    """`signing` and one `provider` line each: health and the last (redacted) error; the checkpoint
    queue that grows while the KMS cannot sign."""
    lines = []
    if isinstance(checkpoints, dict):
        signer = checkpoints.get("signer") or ("(pinning the KMS key)" if checkpoints.get("pinning") else "none")
        queue = f"  queue {checkpoints.get('queue', 0)}, {checkpoints.get('unsigned_records', 0)} unsigned record(s)"
        error = f"  (last error: {checkpoints['last_error']})" if checkpoints.get("last_error") else ""
        required = "  signing_required" if checkpoints.get("signing_required") else ""
        lines.append(f"signing   {signer}{queue}{required}{error}\n")
    for p in providers:
        stub = "  (dev stub)" if p.get("stub") else ""
        error = f"  last error: {p['last_error']}" if p.get("last_error") and p.get("health") != "HEALTHY" else ""
        restarts = f"  restarts {p['restarts']}" if p.get("restarts") else ""
        lines.append(f"provider  {p.get('name')} ({p.get('type')}): {p.get('health')}{stub}{restarts}{error}\n")
    return lines


def _supervisor_status(stack: Path) -> dict[str, Any] | None:
    """The supervisor of an applied stack (None when none was ever started here, e.g. `faramesh dev`):
    alive by its flock, agents from its state file (a dead supervisor's last word)."""
    from faramesh.engine.runner import stack_paths
    from faramesh.supervisor.layout import SupervisorFiles, lock_holder, read_state

    files = SupervisorFiles(stack_paths(stack))
    holder = lock_holder(files.lock_file)
    state = read_state(files)
    if holder is None and state is None and not files.pid_file.exists() and not files.lock_file.exists():
        return None
    pid: int | None = holder
    if pid is None:
        try:
            pid = int(files.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = (state or {}).get("pid")
    agents = []
    for agent_id, info in sorted(((state or {}).get("agents") or {}).items()):
        agents.append(
            {
                "id": agent_id,
                "pid": info.get("pid") if holder is not None else None,
                "state": str(info.get("state", "UNKNOWN")).upper() if holder is not None else "UNSUPERVISED",
                "restarts": info.get("restarts", 0),
                "last_exit": info.get("last_exit"),
                "uid": info.get("uid"),
                "reason": info.get("reason"),
            }
        )
    return {
        "pid": pid,
        "alive": holder is not None,
        "zygote_pid": (state or {}).get("zygote_pid") if holder is not None else None,
        "agents": agents,
    }


def _config_status(stack: Path) -> dict[str, Any] | None:
    """`locked (version …)` / `unlocked since …` from governance.fms' immutable flag and trusted xattrs,
    when the applied policy sets `immutable_config`."""
    try:
        applied = json.loads((stack / ".faramesh" / "policy.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(applied, dict) or not (applied.get("runtime") or {}).get("immutable_config"):
        return None
    from faramesh.sandbox import immutable
    from faramesh.sandbox.errors import SandboxError

    target = stack / "governance.fms"
    try:
        st = immutable.state(str(target))
    except (SandboxError, OSError) as exc:
        return {"path": str(target), "locked": None, "summary": f"unknown ({exc})"}
    lock = str(st.get("lock") or "")
    version = st.get("version")
    if st.get("immutable"):
        summary = f"locked (version {str(version or '?')[:16]})"
    elif lock.startswith("unlocked "):
        summary = f"unlocked since {lock.removeprefix('unlocked ')}"
    else:
        summary = "not locked"
    return {
        "path": str(target),
        "locked": bool(st.get("immutable")),
        "version": version,
        "lock": lock or None,
        "unlocked_since": lock.removeprefix("unlocked ") if lock.startswith("unlocked ") else None,
        "summary": summary,
    }


approvals_app = typer.Typer(
    help="List, show, approve and deny deferred calls.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(approvals_app, name="approvals")

# `audit …` and `explain` read the WAL directly (launchers/audit.py); they never talk to the engine.
from faramesh.launchers.audit import audit_app, explain  # noqa: E402

app.add_typer(audit_app, name="audit")
app.command("explain")(explain)


@approvals_app.command("list")
def approvals_list(
    dir: DirOpt = None,
    socket: SocketOpt = None,
    all: Annotated[bool, typer.Option("--all", help="Include resolved and expired approvals.")] = False,
    format: FormatOpt = Format.text,
) -> None:
    """Pending approvals (all of them with --all)."""
    reply = _engine_request(_stack_dir(dir), {"type": "approvals_list", "all": all}, socket)
    _check_reply(reply)
    items = reply["approvals"]
    if format is Format.json:
        _emit_json({"approvals": items})
    else:
        for a in items:
            sys.stdout.write(f"{a['id']}  {a['status']:<8} {a['agent_id']}  {a['tool']}  created {a['created_at']}\n")
        if not items:
            sys.stdout.write("no pending approvals\n")
    raise typer.Exit(EXIT_OK)


@approvals_app.command("show")
def approvals_show(
    approval_id: str, dir: DirOpt = None, socket: SocketOpt = None, format: FormatOpt = Format.text
) -> None:
    """One approval."""
    reply = _engine_request(_stack_dir(dir), {"type": "approvals_list", "all": True}, socket)
    _check_reply(reply)
    found = next((a for a in reply["approvals"] if a["id"] == approval_id), None)
    if found is None:
        sys.stderr.write(f"faramesh: no approval {approval_id}\n")
        raise typer.Exit(EXIT_FAILED)
    if format is Format.json:
        _emit_json(found)
    else:
        for k, v in found.items():
            sys.stdout.write(f"{k:<12} {v}\n")
    raise typer.Exit(EXIT_OK)


def _decide(
    approval_id: str, verb: str, dir: Path | None, socket: Path | None, reason: str | None, format: Format
) -> None:
    message: dict[str, Any] = {"type": verb, "approval_id": approval_id}
    if reason:
        message["reason"] = reason
    user = os.environ.get("SUDO_USER") or os.environ.get("USER")
    if user:
        message["approver"] = user
    reply = _engine_request(_stack_dir(dir), message, socket)
    _check_reply(reply)
    if format is Format.json:
        _emit_json(reply)
    else:
        a = reply["approval"]
        sys.stdout.write(f"{a['id']} {a['status'].lower()} by {a['approver']}\n")
    raise typer.Exit(EXIT_OK)


ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why; the agent sees it on a deny.")]


@approvals_app.command("approve")
def approvals_approve(
    approval_id: str,
    dir: DirOpt = None,
    socket: SocketOpt = None,
    reason: ReasonOpt = None,
    format: FormatOpt = Format.text,
) -> None:
    """Approve: the next identical call (same agent, tool and args) is permitted once."""
    _decide(approval_id, "approve", dir, socket, reason, format)


@approvals_app.command("deny")
def approvals_deny(
    approval_id: str,
    dir: DirOpt = None,
    socket: SocketOpt = None,
    reason: ReasonOpt = None,
    format: FormatOpt = Format.text,
) -> None:
    """Deny: a retry of the call gets POLICY_DENY with this reason."""
    _decide(approval_id, "deny", dir, socket, reason, format)


def _check_reply(reply: dict[str, Any]) -> None:
    if "error" in reply:
        sys.stderr.write(f"faramesh: {reply['error'].get('code')}: {reply['error'].get('message')}\n")
        raise typer.Exit(EXIT_FAILED)


def _version_callback(value: bool) -> None:
    if value:
        from faramesh import __version__

        sys.stdout.write(f"faramesh {__version__}\n")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Policy enforcement, provenance and OS confinement for AI agents."""


def _internal_error(exc: BaseException) -> int:
    import traceback

    if os.environ.get("FARAMESH_LOG_DIR"):
        log_dir = Path(os.environ["FARAMESH_LOG_DIR"])
    elif os.geteuid() == 0:
        log_dir = Path("/var/log/faramesh")
    else:
        log_dir = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "faramesh" / "log"
    log = log_dir / "cli-crash.log"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write("".join(traceback.format_exception(exc)))
        where = f"details in {log}"
    except OSError:
        where = "and the crash log could not be written"
    sys.stderr.write(f"faramesh: internal error ({type(exc).__name__}); this is a bug, {where}\n")
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    """Entry point. Maps click's usage errors (exit 2) to 64 and never shows a traceback."""
    from typer._click.exceptions import ClickException, UsageError  # typer ≥ 0.29 (pyproject) vendors click

    try:
        result = app(args=argv, prog_name="faramesh", standalone_mode=False)
    except typer.Exit as e:
        return int(e.exit_code)
    except UsageError as e:
        e.show()
        return EXIT_USAGE
    except ClickException as e:
        e.show()
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # last resort: a bug must not print a traceback
        return _internal_error(exc)
    # In non-standalone mode an Exit raised inside a command comes back as its return value.
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
