"""`make demo`: compile the support-bot stack (imports verified offline) and show its decisions.

Later issues move this onto the real daemon (`faramesh dev`) and the OS sandbox.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from faramesh.engine.policy.errors import FarameshError
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.stack import compile_stack

STACK = Path(__file__).resolve().parent

CALLS = [
    ("support-bot", "knowledgebase/search", {"query": "reset password"}),
    ("support-bot", "ticket/read", {"id": 42}),
    ("support-bot", "refund", {"amount": 10, "card": {"number": "4242424242424242", "cvv": "123"}}),
    ("support-bot", "refund", {"amount": 100}),
    ("support-bot", "refund", {"amount": 1000}),
    ("support-bot", "shell/exec", {"cmd": "cat /etc/shadow"}),
    ("support-bot", "shell\u200b/exec", {"cmd": "id"}),
    ("payment-bot", "stripe/refund", {"amount": 300}),
    ("payment-bot", "stripe/charge", {"amount": 5000}),
    ("intruder", "ticket/read", {}),
]


def main() -> int:
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
    for agent, tool, args in CALLS:
        d = evaluate(policy, {"agent_id": agent, "tool_id": tool, "args": args, "time": now})
        shown_args = ",".join(f"{k}={v}" for k, v in args.items() if k != "card")[:16]
        print(f"{agent:<12} {tool.encode('unicode_escape').decode():<22} {shown_args:<16} {d.effect:<7} {d.code:<22} {d.rule_ref or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
