"""`make demo`: the support-bot stack end to end on a real engine.

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


def _operator_approve(cli: list[str], env: dict[str, str], approval_id: str) -> bool:
    """As the operator: list pending approvals, then approve the agent's one, through the real CLI."""
    stack = _stack_arg()
    _say("operator", f"$ faramesh approvals list --dir {stack}")
    listed = subprocess.run(
        [*cli, "approvals", "list", "--dir", str(STACK)], env=env, capture_output=True, text=True, timeout=30
    )
    for line in (listed.stdout + listed.stderr).splitlines():
        _say("operator", f"  {line}")
    if approval_id not in listed.stdout:
        _say("operator", f"  (approval {approval_id} is not listed as pending)")
        return False
    _say("operator", f"$ faramesh approvals approve {approval_id} --dir {stack}")
    approved = subprocess.run(
        [*cli, "approvals", "approve", approval_id, "--dir", str(STACK)],
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


def live() -> int:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The support-bot demo on a real `faramesh dev` engine.")
    parser.add_argument("--offline", action="store_true", help="print the pure-evaluation table instead (no daemon)")
    args = parser.parse_args(argv)
    return offline() if args.offline else live()


if __name__ == "__main__":
    sys.exit(main())
