"""Sentinel scan: a raw card number and CVV sent in redacted fields (`redact refund args: ["card.number",
"card.cvv"]`) through `faramesh serve` with SQLite — permits, defers with approvals, denies, odd tool ids,
JSON-RPC, the operator socket, a clean restart and a SIGKILL — appear nowhere in the raw bytes of any file
under the stack, state, runtime and WAL directories (SQLite `-wal`/`-shm` included) or the engine's log.
A non-redacted marker sent beside them must be found, which proves the scan reads where args land."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from engine_harness import EngineDirs, EngineProcess, compile_policy, govern, make_stack, policy_text, short_tmpdir


def luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def every_file(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                if stat.S_ISREG(path.lstat().st_mode):  # sockets left by the SIGKILL hold no bytes
                    yield path


def forms(value: str) -> list[bytes]:
    """The byte forms a leak could take: ASCII, UTF-16 (LE/BE) and, for card numbers, grouped digits."""
    out = [value.encode(), value.encode("utf-16-le"), value.encode("utf-16-be")]
    if len(value) == 16:
        out += [
            " ".join(value[i : i + 4] for i in range(0, 16, 4)).encode(),
            "-".join(value[i : i + 4] for i in range(0, 16, 4)).encode(),
        ]
    return out


def test_redacted_card_data_reaches_no_file() -> None:
    rng = random.Random()
    card = luhn_card(rng)
    cvv = f"{rng.randrange(1000, 10000)}"
    marker = f"VISIBLE-{rng.randrange(10**12):012d}"
    root = short_tmpdir("fmsent")
    wal_dir = root / "waldir"
    text = policy_text().replace("runtime {\n", f'runtime {{\n  wal_dir = "{wal_dir}"\n', 1)
    stack = make_stack(root, text)
    _, pf = compile_policy(stack, root / "policy.json")
    assert pf is not None
    dirs = EngineDirs.fresh()
    log = root / "engine.log"

    def args(amount: int) -> dict[str, object]:
        return {"amount": amount, "memo": marker, "card": {"number": card, "cvv": cvv, "exp": "12/30"}}

    eng = EngineProcess(stack, pf, dirs, log_path=log)
    try:
        eng.start()
        with eng.agent("bot") as bot, eng.operator() as op:
            assert bot.call(govern("refund", args(10)))["effect"] == "PERMIT"
            assert bot.call(govern("REFUND", args(11)))["effect"] == "PERMIT"
            assert bot.call(govern("refund", args(900)))["effect"] == "DENY"
            rpc = bot.call(
                {"jsonrpc": "2.0", "id": 1, "method": "govern", "params": {"tool": "refund", "args": args(12)}}
            )
            assert rpc["result"]["effect"] == "PERMIT"
            # defer → approve → the identical retry is permitted; defer → deny with a reason
            apr = bot.call(govern("refund", args(100)))["defer_token"]
            op.call({"type": "approve", "approval_id": apr, "approver": "op"})
            assert bot.call(govern("refund", args(100)))["effect"] == "PERMIT"
            apr2 = bot.call(govern("refund", args(101)))["defer_token"]
            op.call({"type": "deny", "approval_id": apr2, "reason": "no"})
            assert bot.call(govern("refund", args(101)))["effect"] == "DENY"
            # calls the policy cannot attribute to a redacted tool, and bad input carrying the card
            assert bot.call(govern("refund ", args(10)))["effect"] == "DENY"  # not a canonical tool id
            assert (
                bot.call(govern("refund", args(10), agent_id="other"))["structured_denial"]["code"]
                == "IDENTITY_MISMATCH"
            )
            assert op.call(govern("refund", args(13), agent_id="bot"))["effect"] == "PERMIT"
            assert op.call(govern("refund", args(13), agent_id="ghost"))["effect"] == "DENY"  # unknown agent
            assert "error" in bot.call(
                json.dumps({"type": "govern", "tool_id": "refund", "args": args(1)})[:-3].encode() + b"\n"
            )
            assert "error" in bot.call({"type": card, "args": args(1)})
            for i in range(150):  # plenty of other traffic: pages get written, rewritten and checkpointed
                bot.call(
                    govern(["ticket/read", "search", "refund"][i % 3], args(14 + i % 5) if i % 3 == 2 else {"i": i})
                )
        assert eng.terminate() == 0
        eng.start()  # replay reads everything back
        with eng.agent("bot") as bot:
            for i in range(30):
                bot.call(govern("refund", args(15 + i % 3)))
            apr3 = bot.call(govern("refund", args(102)))["defer_token"]
            assert apr3.startswith("apr-")
        eng.kill()  # SIGKILL: leaves the SQLite -wal and -shm files behind
    finally:
        eng.ensure_stopped()
    try:
        files = list(every_file(stack, dirs.state_root, dirs.runtime_root, wal_dir, log.parent))
        names = {p.name for p in files}
        sqlite_name = eng.wal_path.name
        assert eng.wal_path.parent == wal_dir
        assert {sqlite_name, sqlite_name + "-wal", sqlite_name + "-shm", "engine.log"} <= names, names
        leaks = []
        seen_marker = False
        cvv_patterns = [
            re.compile(rb'"' + cvv.encode() + rb'"'),
            re.compile(rb"cvv.{0,64}?" + cvv.encode(), re.I | re.S),
        ]
        for path in files:
            raw = path.read_bytes()
            seen_marker |= marker.encode() in raw
            for needle in forms(card):
                if needle in raw:
                    leaks.append(f"{path}: card number")
            for pattern in cvv_patterns:
                if pattern.search(raw) or pattern.search(raw.decode("utf-16-le", "ignore").encode()):
                    leaks.append(f"{path}: cvv")
        assert not leaks, leaks
        # the non-redacted field beside the card was persisted (the redacted args are kept for replay),
        # so the scan did read the bytes where args land
        assert seen_marker
    finally:
        dirs.cleanup()
        shutil.rmtree(root, ignore_errors=True)
