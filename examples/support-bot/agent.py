"""The support-bot example agent: the seed's smoke test, run through the Faramesh agent client.

Start an engine, then run the agent against it:

    .venv/bin/faramesh dev --dir examples/support-bot        # prints `export FARAMESH_SOCKET=…`
    FARAMESH_SOCKET=… python3 examples/support-bot/agent.py

When the 100-dollar refund is deferred, the agent waits for an operator; approve it from another
terminal with the command it prints (`faramesh approvals approve apr-… --dir examples/support-bot`).
`make demo` does all of this by itself (examples/support-bot/demo.py).

The agent uses only the standard library and `faramesh_client` — the single-file client the launcher
puts on an agent's PYTHONPATH (a copy of engine/client.py); with Faramesh installed it falls back to
`faramesh.engine.client`. Steps and what the seed's policy must answer:

    knowledgebase/search     PERMIT                       the search runs and returns articles
    refund $10               PERMIT                       the refund runs (card fields are redacted)
    refund $100              DEFER → operator approves → the identical retry is PERMITTED once
    refund $1000             DENY  (ToolDenied carries the rule and its reason)
    shell/exec               DENY  (no rule: default deny)

Exit 0 when every answer was the expected one and no tool ran without a PERMIT; 1 on an unexpected
answer; 4 when the engine is unavailable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faramesh.engine import client as fm
else:
    try:  # the single-file client the launcher puts on PYTHONPATH
        import faramesh_client as fm
    except ImportError:  # Faramesh installed in this interpreter
        from faramesh.engine import client as fm

AGENT_ID = "support-bot"
STACK = Path(__file__).resolve().parent

ran: list[str] = []  # every tool body that executed, in order: a denied call must never appear here


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # the demo reads this line by line


def _stack_arg() -> str:
    try:
        return os.path.relpath(STACK)
    except ValueError:
        return str(STACK)


def build_tools(client: fm.Client, approval_timeout: float) -> dict[str, Any]:
    """The agent's tools. Each is governed: its body runs only after the engine said PERMIT."""

    @client.governed("knowledgebase/search", pass_permit=True)
    def search_kb(query: str, *, permit: fm.Permit) -> list[str]:
        ran.append("knowledgebase/search")
        articles = [f"KB-101 How to {query}", "KB-207 Account recovery checklist"]
        # report what the call cost so the budget reservation settles at the real figure
        settled = client.complete(permit.action_id, {"cost_cents": 2})
        _out(f"    settled {settled.get('settled_cents')}¢ for action {permit.action_id}")
        return articles

    def do_refund(amount: int, card: dict[str, str] | None = None) -> str:
        ran.append(f"refund ${amount}")
        return f"refunded ${amount}" + (f" to card ****{card['number'][-4:]}" if card else "")

    refund = client.governed("refund")(do_refund)
    refund_after_approval = client.governed("refund", on_defer="block", defer_timeout=approval_timeout)(do_refund)

    @client.governed("shell/exec")
    def shell(cmd: str) -> str:
        ran.append("shell/exec")  # the policy denies shell access: this line must never execute
        return f"would have run {cmd!r}"

    return {"search": search_kb, "refund": refund, "refund_wait": refund_after_approval, "shell": shell}


def _attempt(tool: Any, *args: Any, note: str = "") -> tuple[object, fm.ToolDenied | None]:
    """Call a governed tool; print and return (result, None) or (None, the ToolDenied).
    EngineUnavailable propagates: without an engine there is nothing left to test."""
    try:
        result = tool(*args)
    except fm.EngineUnavailable:
        raise
    except fm.ToolDenied as exc:
        where = f" {exc.rule_ref}" if exc.rule_ref else ""
        _out(f"    {exc.effect:<7} {exc.code}{where}: {exc.human_message!r}  (DPR {exc.action_id})")
        return None, exc
    _out(f"    PERMIT  → {result}{note}")
    return result, None


def run(client: fm.Client, approval_timeout: float) -> list[str]:
    """Drive the smoke test; return the unexpected outcomes (empty when all went as the policy says)."""
    tools = build_tools(client, approval_timeout)
    problems: list[str] = []
    card = {"number": "4242424242424242", "cvv": "123"}

    def expect(what: str, denied: fm.ToolDenied | None, effect: str, code: str | None = None) -> None:
        got = "PERMIT" if denied is None else denied.effect
        if got != effect or (denied is not None and code is not None and denied.code != code):
            problems.append(f"{what}: expected {effect} {code or ''}, got {got} {denied.code if denied else ''}")

    _out('[1] knowledgebase/search query="reset password"   (expect PERMIT)')
    _, denied = _attempt(tools["search"], "reset password")
    expect("knowledgebase/search", denied, "PERMIT")

    _out("[2] refund amount=10 card=****4242   (expect PERMIT; card.number and card.cvv are redacted in the DPR)")
    _, denied = _attempt(tools["refund"], 10, card)
    expect("refund $10", denied, "PERMIT")

    _out("[3] refund amount=100   (expect DEFER: a human decides)")
    _, denied = _attempt(tools["refund"], 100)
    expect("refund $100", denied, "DEFER", "POLICY_DEFER")
    approval_id = denied.approval_id if denied is not None else None
    if denied is not None and approval_id is None:
        problems.append("refund $100: the DEFER names no approval")

    if approval_id:
        _out(f"    waiting for an operator: faramesh approvals approve {approval_id} --dir {_stack_arg()}")
        _out(
            "[4] refund amount=100 again, the identical call, waiting for the approval   (expect PERMIT once approved)"
        )
        _, denied = _attempt(tools["refund_wait"], 100, note=f"  (approval {approval_id})")
        expect("refund $100 after approval", denied, "PERMIT")

    _out("[5] refund amount=1000   (expect DENY with the rule's reason)")
    _, denied = _attempt(tools["refund"], 1000)
    expect("refund $1000", denied, "DENY", "POLICY_DENY")

    _out('[6] shell/exec cmd="cat /etc/shadow"   (expect DENY: no rule permits it)')
    _, denied = _attempt(tools["shell"], "cat /etc/shadow")
    expect("shell/exec", denied, "DENY")

    expected_ran = ["knowledgebase/search", "refund $10", "refund $100"]
    if ran != expected_ran:
        problems.append(f"tool bodies that ran: {ran}, expected {expected_ran}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The support-bot smoke test against a running Faramesh engine.")
    parser.add_argument("--socket", default=None, help="engine socket (default: $FARAMESH_SOCKET)")
    parser.add_argument(
        "--approval-timeout", type=float, default=120.0, help="seconds to wait for an operator (default 120)"
    )
    args = parser.parse_args(argv)
    client = fm.Client(args.socket, agent_id=os.environ.get("FARAMESH_AGENT_ID") or AGENT_ID, poll_interval=0.1)
    try:
        state = client.wait_ready(timeout=10)["daemon"]
        _out(
            f"engine READY (policy {str(state.get('policy_version'))[:16]}, mode {state.get('mode')}); agent {AGENT_ID}"
        )
        problems = run(client, args.approval_timeout)
    except fm.EngineUnavailable as exc:
        _out(f"engine unavailable: {exc.human_message}")
        _out(f"tool bodies that ran: {ran or 'none'}")
        return 4
    finally:
        client.close()
    if problems:
        for problem in problems:
            _out(f"UNEXPECTED: {problem}")
        return 1
    _out(f"smoke test passed: tool bodies that ran: {', '.join(ran)}; denied and deferred calls never ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
