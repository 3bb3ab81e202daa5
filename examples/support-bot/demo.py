"""`make demo`: the support-bot stack end to end, for real.

As root (the production path, `demo.py --apply`, the default for root):

1. copy examples/support-bot/ to a fresh temporary directory (never applied inside the checkout: an
   immutable file there breaks the next clone) with FARAMESH_STATE_DIR / RUNTIME_DIR / LOG_DIR in it too,
   so nothing lands in /var; the copy's governance.fms gets `os_tier = true`, `immutable_config = true`
   and `command = "…"` on agent "support-bot" only (the stack has three agents through its imports, so
   `supervised_command` does not apply; the imports stay, verified as in production). The single-file
   client goes next to the agent as faramesh_client.py (the sandbox strips PYTHONPATH; the script's
   directory is first on sys.path), and supervised_agent.py runs agent.py once, then idles;
2. `faramesh apply`: engine + supervisor, the agent in the full OS sandbox, reaching the engine through
   /run/faramesh/agent.sock; the launch report says which mechanisms are active;
3. the agent walks permit → defer; the operator approves through `faramesh approvals approve`; the agent,
   blocked on the approval, gets its PERMIT, then the DENYs;
4. `faramesh unlock` (recorded as a `config_unlocked` DPR by the running engine), `faramesh audit verify`
   (exit 0), `faramesh apply --stop`; no process is left; the copy is removed.

As any other user (`demo.py --dev`, the default without root): the same tour on `faramesh dev`:

1. start `faramesh dev --dir examples/support-bot` (stubs, in-memory WAL, DPRs on its stderr) with
   FARAMESH_RUNTIME_DIR / FARAMESH_STATE_DIR in a fresh temporary directory, so it never meets
   another run's socket; wait until it is READY;
2. run examples/support-bot/agent.py against it with `python -S` (no Faramesh installed for it: the
   single-file client is on its PYTHONPATH as `faramesh_client`, as the launcher does it);
3. when the agent's $100 refund is deferred, act as the operator through the real CLI:
   `faramesh approvals list` then `faramesh approvals approve <id>`; the agent's identical retry is
   then permitted;
4. SIGTERM the engine, check that it drained and exited 0, and print the engine's own records of
   every decision (the DPRs it wrote to stderr), including the approver named by the retry's DPR.

`demo.py --offline` prints the pure-evaluation table instead (compile + evaluate, no daemon).
Exit 0 when everything behaved as the policy says, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STACK = Path(__file__).resolve().parent
REPO = STACK.parent.parent
CLIENT_SOURCE = REPO / "engine" / "client.py"
CARD_NUMBER = "4242424242424242"
START_TIMEOUT = 15.0
AGENT_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------- offline

OFFLINE_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("support-bot", "knowledgebase/search", {"query": "reset password"}),
    ("support-bot", "ticket/read", {"id": 42}),
    ("support-bot", "refund", {"amount": 10, "card": {"number": CARD_NUMBER, "cvv": "123"}}),
    ("support-bot", "refund", {"amount": 100}),
    ("support-bot", "refund", {"amount": 1000}),
    ("support-bot", "shell/exec", {"cmd": "cat /etc/shadow"}),
    ("support-bot", "shell\u200b/exec", {"cmd": "id"}),
    ("payment-bot", "stripe/refund", {"amount": 300}),
    ("payment-bot", "stripe/charge", {"amount": 5000}),
    ("intruder", "ticket/read", {}),
]


def offline() -> int:
    """Compile the stack (imports verified offline) and print each call's pure decision."""
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.evaluate import evaluate
    from faramesh.engine.policy.stack import compile_stack

    try:
        compiled = compile_stack(STACK, env={})
    except FarameshError as err:
        print(f"demo: {err}", file=sys.stderr)
        return err.exit_code
    policy = compiled.policy
    print(f"stack {STACK.name}: policy version {policy.version[:16]}, agents: {', '.join(sorted(policy.agents))}")
    for imp in policy.imports:
        print(f"  import {imp['path']} verified (sha256 {imp['sha256'][:12]}, key {imp['key_id']})")
    print()
    print(f"{'agent':<12} {'tool':<22} {'args':<16} {'effect':<7} {'code':<22} rule")
    now = time.time()
    for agent, tool, args in OFFLINE_CALLS:
        d = evaluate(policy, {"agent_id": agent, "tool_id": tool, "args": args, "time": now})
        shown_args = ",".join(f"{k}={v}" for k, v in args.items() if k != "card")[:16]
        shown_tool = tool.encode("unicode_escape").decode()
        print(f"{agent:<12} {shown_tool:<22} {shown_args:<16} {d.effect:<7} {d.code:<22} {d.rule_ref or '-'}")
    return 0


# --------------------------------------------------------------------------------------------- live


def _say(who: str, line: str) -> None:
    sys.stdout.write(f"  {who:<8} │ {line}\n")
    sys.stdout.flush()


def _faramesh_cli() -> list[str]:
    script = Path(sys.executable).with_name("faramesh")
    return [str(script)] if script.exists() else [sys.executable, "-m", "faramesh.launchers.main"]


def _stack_arg() -> str:
    try:
        return os.path.relpath(STACK)
    except ValueError:
        return str(STACK)


def _wait_for_socket(engine: subprocess.Popen[bytes], log_path: Path) -> str:
    """The socket `faramesh dev` announces on stderr (`export FARAMESH_SOCKET=…`), once it exists."""
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"export FARAMESH_SOCKET=(\S+)")
    while time.monotonic() < deadline:
        if engine.poll() is not None:
            raise RuntimeError(f"faramesh dev exited with {engine.returncode}:\n{log_path.read_text(errors='replace')}")
        found = pattern.search(log_path.read_text(errors="replace"))
        if found and os.path.exists(found.group(1)):
            return found.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"faramesh dev announced no socket within {START_TIMEOUT:g}s")


def _dprs(text: str) -> list[dict[str, Any]]:
    """The pretty-printed DPRs `faramesh dev` writes to stderr (one JSON object, `{` … `}` at column 0)."""
    records, block = [], None
    for line in text.splitlines():
        if line == "{":
            block = [line]
        elif block is not None:
            block.append(line)
            if line == "}":
                with contextlib.suppress(ValueError):
                    records.append(json.loads("\n".join(block)))
                block = None
    return records


def _operator_approve(cli: list[str], env: dict[str, str], approval_id: str, stack_dir: Path = STACK) -> bool:
    """As the operator: list pending approvals, then approve the agent's one, through the real CLI."""
    stack = _stack_arg() if stack_dir == STACK else str(stack_dir)
    _say("operator", f"$ faramesh approvals list --dir {stack}")
    listed = subprocess.run(
        [*cli, "approvals", "list", "--dir", str(stack_dir)], env=env, capture_output=True, text=True, timeout=30
    )
    for line in (listed.stdout + listed.stderr).splitlines():
        _say("operator", f"  {line}")
    if approval_id not in listed.stdout:
        _say("operator", f"  (approval {approval_id} is not listed as pending)")
        return False
    _say("operator", f"$ faramesh approvals approve {approval_id} --dir {stack}")
    approved = subprocess.run(
        [*cli, "approvals", "approve", approval_id, "--dir", str(stack_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    for line in (approved.stdout + approved.stderr).splitlines():
        _say("operator", f"  {line}")
    return approved.returncode == 0


def _run_agent(workdir: Path, engine_env: dict[str, str], socket_path: str, cli: list[str]) -> tuple[int, bool]:
    """Run agent.py; approve its deferred refund when it says it is waiting. (exit code, approved?)"""
    lib = workdir / "agent-lib"
    lib.mkdir()
    shutil.copyfile(CLIENT_SOURCE, lib / "faramesh_client.py")
    agent_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONPATH": str(lib),
        "PYTHONIOENCODING": "utf-8",
        "FARAMESH_SOCKET": socket_path,
        "FARAMESH_AGENT_ID": "support-bot",
    }
    _say(
        "demo",
        f"agent: python -S {_stack_arg()}/agent.py (Faramesh not installed for it; faramesh_client.py on PYTHONPATH)",
    )
    agent = subprocess.Popen(
        [sys.executable, "-S", str(STACK / "agent.py"), "--approval-timeout", "20"],
        env=agent_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        cwd=os.getcwd(),
    )
    approved = False
    deadline = time.monotonic() + AGENT_TIMEOUT
    waiting = re.compile(r"faramesh approvals approve (apr-\S+)")
    assert agent.stdout is not None
    try:
        for line in agent.stdout:
            _say("agent", line.rstrip("\n"))
            match = waiting.search(line)
            if match and not approved:
                approved = _operator_approve(cli, engine_env, match.group(1))
            if time.monotonic() > deadline:
                break
        rc = agent.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
        _say("demo", f"the agent did not finish within {AGENT_TIMEOUT:g}s")
        rc = 1
    return rc, approved


def _transcript(records: list[dict[str, Any]]) -> None:
    print()
    print("The engine's records of the decisions (DPRs, in order):")
    print(f"  {'tool':<22} {'effect':<7} {'code':<14} {'rule':<18} {'approval / approver'}")
    for r in records:
        if r.get("action_type") != "tool_call":
            continue
        approval = r.get("approval_id") or ""
        if r.get("approver"):
            approval += f" approved by {r['approver']}"
        print(
            f"  {r.get('tool', '?'):<22} {r.get('effect', '?'):<7} {r.get('code', '?'):<14} "
            f"{r.get('rule_ref') or '-':<18} {approval}".rstrip()
        )


def dev_tour() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fm-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_")}
    env["FARAMESH_RUNTIME_DIR"] = str(workdir / "run")
    env["FARAMESH_STATE_DIR"] = str(workdir / "state")
    cli = _faramesh_cli()
    log_path = workdir / "engine.log"
    started = time.monotonic()
    checks: list[tuple[str, bool]] = []
    engine: subprocess.Popen[bytes] | None = None
    try:
        print(f"$ faramesh dev --dir {_stack_arg()}   (runtime dir {env['FARAMESH_RUNTIME_DIR']})")
        with open(log_path, "wb") as log:
            engine = subprocess.Popen(
                [*cli, "dev", "--dir", str(STACK)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
            )
        try:
            socket_path = _wait_for_socket(engine, log_path)
        except RuntimeError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        from faramesh.engine.client import Client, EngineUnavailable

        try:
            with Client(socket_path) as probe:
                probe.wait_ready(timeout=START_TIMEOUT)
        except EngineUnavailable as exc:
            print(f"demo: {exc.human_message}", file=sys.stderr)
            return 1
        for line in log_path.read_text(errors="replace").splitlines():
            if line == "{":
                break
            _say("engine", line)
        rc, approved = _run_agent(workdir, env, socket_path, cli)
        checks.append(("the agent's smoke test passed (exit 0)", rc == 0))
        checks.append(("the operator approved the deferred refund through `faramesh approvals approve`", approved))

        engine.send_signal(signal.SIGTERM)
        try:
            engine_rc = engine.wait(timeout=15)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine_rc = engine.wait()
        _say("demo", f"SIGTERM → faramesh dev exited {engine_rc}")
        checks.append(("the engine drained and exited 0 on SIGTERM", engine_rc == 0))

        output = log_path.read_text(errors="replace")
        records = _dprs(output)
        _transcript(records)
        retried = [r for r in records if r.get("tool") == "refund" and r.get("code") == "APPROVED"]
        approver = retried[0].get("approver") if retried else None
        checks.append((f"the retry's DPR names the approver ({approver})", bool(approver)))
        checks.append(("no DPR or engine output contains the card number (redacted)", CARD_NUMBER not in output))
        effects = [(r.get("tool"), r.get("effect")) for r in records if r.get("action_type") == "tool_call"]
        checks.append(
            (
                "the shell call and the $1000 refund were denied",
                ("shell/exec", "DENY") in effects and effects.count(("refund", "DENY")) == 1,
            )
        )
    finally:
        if engine is not None and engine.poll() is None:
            engine.kill()
            engine.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for what, ok in checks:
        print(f"  {'ok ' if ok else 'FAIL'} {what}")
    elapsed = time.monotonic() - started
    passed = all(ok for _, ok in checks)
    print(f"\ndemo {'passed' if passed else 'FAILED'} in {elapsed:.1f}s")
    return 0 if passed else 1


# --------------------------------------------------------------------------------------------- apply

APPLY_TIMEOUT = 60.0


def _run_cli(cli: list[str], env: dict[str, str], *args: str, show: str = "") -> subprocess.CompletedProcess[str]:
    """Run one `faramesh …` command, echoing it and its output in the transcript."""
    _say("operator", f"$ faramesh {show or ' '.join(args)}")
    proc = subprocess.run(
        [*cli, *args], env=env, capture_output=True, text=True, timeout=APPLY_TIMEOUT, stdin=subprocess.DEVNULL
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        _say("operator", f"  {line}")
    if proc.returncode != 0:
        _say("operator", f"  (exit {proc.returncode})")
    return proc


def _prepare_copy(stack: Path) -> None:
    """The stack copy: the example, the single-file client, the supervised agent as support-bot's command."""
    shutil.copytree(
        STACK,
        stack,
        ignore=shutil.ignore_patterns("demo.py", "tests", "__pycache__", ".*cache", ".faramesh", "workspace"),
    )
    shutil.copyfile(CLIENT_SOURCE, stack / "faramesh_client.py")
    for path in stack.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)  # readable by the agent's own uid
    os.chmod(stack, 0o755)
    fms = stack / "governance.fms"
    text = fms.read_text()
    command = f"/usr/bin/python3 -S {stack / 'supervised_agent.py'} --approval-timeout {AGENT_TIMEOUT:g}"
    edits = [
        # The demo signs its audit chain with a local key (no KMS here): say so, as `apply` demands in enforce.
        (
            "runtime {\n",
            "runtime {\n  os_tier = true\n  immutable_config = true\n  signing_warning_acknowledged = true\n",
        ),
        ('agent "support-bot" {\n', f'agent "support-bot" {{\n  command = "{command}"\n'),
    ]
    for marker, replacement in edits:
        if text.count(marker) != 1:
            raise RuntimeError(f"governance.fms: expected one {marker.strip()!r} block to extend")
        text = text.replace(marker, replacement)
    fms.write_text(text)


def _processes_under(root: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(root).encode() in cmdline:
            found.append(int(entry))
    return found


def _clear_flags(root: Path) -> None:
    from faramesh.sandbox.immutable import clear_immutable

    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(Exception):
                    clear_immutable(path)


def _follow_agent(
    log_path: Path, cli: list[str], env: dict[str, str], stack: Path, checks: list[tuple[str, bool]]
) -> int | None:
    """Print the agent's log as it grows; approve its deferred refund; return the smoke test's exit code."""
    waiting = re.compile(r"faramesh approvals approve (apr-\S+)")
    finished = re.compile(r"^smoke test exit (\d+)")
    approved = False
    seen = 0
    deadline = time.monotonic() + AGENT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines[seen:]:
            _say("agent", line)
            match = waiting.search(line)
            if match and not approved:
                approved = _operator_approve(cli, env, match.group(1), stack)
                checks.append(
                    ("the operator approved the deferred refund through `faramesh approvals approve`", approved)
                )
            done = finished.match(line)
            if done:
                return int(done.group(1))
        seen = len(lines)
        time.sleep(0.1)
    _say("demo", f"the agent did not finish its smoke test within {AGENT_TIMEOUT:g}s")
    return None


def _records(cli: list[str], env: dict[str, str], stack: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [*cli, "audit", "tail", "--dir", str(stack), "-n", "100", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    try:
        return list(json.loads(proc.stdout)["records"])
    except (ValueError, KeyError, TypeError):
        return []


def apply_tour() -> int:
    """The production path, as root: apply a copy with the OS sandbox, tour, unlock, verify, stop."""
    from faramesh.engine.paths import stack_paths
    from faramesh.supervisor.layout import SupervisorFiles

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fm-demo-", dir="/tmp"))
    os.chmod(workdir, 0o755)  # the agent's uid traverses it to reach the stack copy
    stack = workdir / "support-bot"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_")}
    env.update(
        FARAMESH_STATE_DIR=str(workdir / "state"),
        FARAMESH_RUNTIME_DIR=str(workdir / "run"),
        FARAMESH_LOG_DIR=str(workdir / "log"),
    )
    cli = _faramesh_cli()
    checks: list[tuple[str, bool]] = []
    stopped = False
    records: list[dict[str, Any]] = []
    try:
        _prepare_copy(stack)
        _say("demo", f"stack copied to {stack} (os_tier, immutable_config, command on agent support-bot)")
        _say("demo", f"state, runtime and log dirs under {workdir}")
        applied = _run_cli(cli, env, "apply", "--dir", str(stack))
        report = applied.stdout
        checks.append(
            ("`faramesh apply` started engine, supervisor and the sandboxed agent (exit 0)", applied.returncode == 0)
        )
        if applied.returncode != 0:
            return _verdict(checks, started)
        report_lines = [line.strip() for line in report.splitlines()]
        active = [line.split(":", 1)[1].strip() for line in report_lines if line.startswith("applied:")]
        missing = [line.split(":", 1)[1].strip() for line in report_lines if line.startswith("NOT applied:")]
        checks.append(("the launch report names the active OS mechanisms", bool(active)))
        checks.append(("the config is locked (immutable)", "locked (immutable)" in report))

        files = SupervisorFiles(stack_paths(stack, env=env))
        rc = _follow_agent(files.agent_log("support-bot"), cli, env, stack, checks)
        checks.append(("the agent's smoke test passed inside the sandbox (exit 0)", rc == 0))

        unlocked = _run_cli(cli, env, "unlock", "--dir", str(stack))
        checks.append(
            (
                "`faramesh unlock` cleared the flags and the engine recorded config_unlocked",
                unlocked.returncode == 0 and "recorded config_unlocked" in unlocked.stdout,
            )
        )
        verified = _run_cli(cli, env, "audit", "verify", "--dir", str(stack))
        checks.append(("`faramesh audit verify`: the chain is intact (exit 0)", verified.returncode == 0))
        records = _records(cli, env, stack)

        halted = _run_cli(cli, env, "apply", "--stop", "--dir", str(stack))
        stopped = halted.returncode == 0
        checks.append(("`faramesh apply --stop` exit 0", stopped))
        left = _processes_under(workdir)
        checks.append((f"no process left behind ({len(left)} found)", not left))

        _transcript(records)
        for r in records:
            if r.get("action_type") == "config_unlocked":
                print(f"  [config_unlocked] by {r.get('by')}, policy {str(r.get('policy_version'))[:16]}, "
                      f"{len(r.get('paths') or [])} paths")  # fmt: skip
        print()
        print("Active OS mechanisms (the agent's launch report):")
        for line in active:
            print(f"  {line}")
        if missing:
            print("Not applied (the report says why):")
            for line in missing:
                print(f"  {line}")
        retried = [r for r in records if r.get("tool") == "refund" and r.get("code") == "APPROVED"
                   and r.get("action_type") == "tool_call"]  # fmt: skip
        approver = retried[0].get("approver") if retried else None
        checks.append((f"the retry's DPR names the approver ({approver})", bool(approver)))
        effects = [(r.get("tool"), r.get("effect")) for r in records if r.get("action_type") == "tool_call"]
        checks.append(
            (
                "the shell call and the $1000 refund were denied",
                ("shell/exec", "DENY") in effects and effects.count(("refund", "DENY")) == 1,
            )
        )
        leaked = [p for p in workdir.rglob("*") if p.is_file() and p.suffix in (".sqlite", ".log")
                  and CARD_NUMBER.encode() in p.read_bytes()]  # fmt: skip
        checks.append(("no WAL or log contains the card number (redacted)", not leaked))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _say("demo", f"error: {exc}")
        checks.append((f"the tour ran to its end ({type(exc).__name__})", False))
    finally:
        _teardown(cli, env, stack, workdir, stopped)
    return _verdict(checks, started)


def _teardown(cli: list[str], env: dict[str, str], stack: Path, workdir: Path, stopped: bool) -> None:
    """Always: stop, unlock, clear every immutable flag, kill what is left, remove the copy."""
    for args, done in ((("apply", "--stop"), stopped), (("unlock",), False)):
        if not done and stack.exists():
            with contextlib.suppress(Exception):
                subprocess.run([*cli, *args, "--dir", str(stack)], env=env, capture_output=True, timeout=60)
    _clear_flags(workdir)
    for pid in _processes_under(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        _say("demo", f"could not remove {workdir}")


def _verdict(checks: list[tuple[str, bool]], started: float) -> int:
    print()
    for what, ok in checks:
        print(f"  {'ok ' if ok else 'FAIL'} {what}")
    passed = bool(checks) and all(ok for _, ok in checks)
    print(f"\ndemo {'passed' if passed else 'FAILED'} in {time.monotonic() - started:.1f}s")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The support-bot demo on a real Faramesh engine.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="print the pure-evaluation table instead (no daemon)")
    mode.add_argument("--dev", action="store_true", help="the tour on `faramesh dev` (the default without root)")
    mode.add_argument(
        "--apply", action="store_true", help="the production tour: apply a copy with the OS sandbox (root; default)"
    )
    args = parser.parse_args(argv)
    if args.offline:
        return offline()
    if args.apply and os.geteuid() != 0:
        print("demo: --apply needs root (`faramesh apply` launches agents under their own uids)", file=sys.stderr)
        return 1
    if args.dev or os.geteuid() != 0:
        return dev_tour()
    return apply_tour()


if __name__ == "__main__":
    sys.exit(main())
