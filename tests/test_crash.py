"""Crash test: `faramesh serve` (SQLite WAL) under 16 concurrent clients is SIGKILLed at a uniformly drawn
moment, again and again; some rounds kill it *inside* a group commit (the test launcher's commit hook
sleeps in the transaction, after the inserts and before COMMIT). Clients log every action_id they were
answered with, with its effect. After each kill the engine is started again on the same WAL, and:

- it starts (start-up verification and the recovery checkpoint accept what the kill left behind);
- the whole WAL verifies as `faramesh audit verify` does (engine/wal/verify.verify_chain, pinned key);
- every action_id any client was ever answered with is in the WAL, with the effect it was told.

`make test` runs 25 rounds; `make soak` runs 500 (FARAMESH_CRASH_ROUNDS). Every 25 rounds start over with
a fresh stack state, so the full verification stays cheap.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from typing import Any

from engine_harness import (
    Conn,
    EngineDirs,
    EngineProcess,
    compile_policy,
    govern,
    make_stack,
    pinned_key,
    policy_text,
    read_wal,
    short_tmpdir,
)
from faramesh.engine.wal.verify import verify_chain

ROUNDS = int(os.environ.get("FARAMESH_CRASH_ROUNDS", "25"))
EPOCH = 25  # rounds per fresh state dir
CLIENTS = 16
INSIDE_EVERY = 4  # every 4th round kills inside a group commit (7 of 25)
FULL_EVERY = 5  # every 5th round (offset 2) runs wal_sync = "full"
COMMIT_SLEEP = 0.08

CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("bot", "ticket/read", {}),  # PERMIT
    ("bot", "refund", {"amount": 10}),  # PERMIT
    ("bot", "refund", {"amount": 100}),  # DEFER (one pending approval, many DPRs)
    ("bot", "refund", {"amount": 900}),  # DENY
    ("bot", "search", {"q": "x"}),  # PERMIT, then RATE_EXCEEDED
    ("bot", "shell/exec", {}),  # DENY (default)
    ("other", "refund", {"amount": 1}),  # DEFER
    ("other", "ticket/read", {}),  # PERMIT
]


class Round:
    def __init__(self, engine: EngineProcess, rng: random.Random) -> None:
        self.engine = engine
        self.rng = rng
        self.log: list[tuple[str, str]] = []  # (action_id, effect) as answered
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, n: int) -> None:
        rng = random.Random(n * 7919 + self.rng.randrange(1 << 30))
        conns: dict[str, Conn] = {}
        try:
            while not self.stop.is_set():
                agent, tool, args = rng.choice(CALLS)
                conn = conns.get(agent) or conns.setdefault(agent, self.engine.agent(agent, timeout=10))
                reply = conn.call(govern(tool, args))
                if reply.get("action_id"):
                    with self.lock:
                        self.log.append((reply["action_id"], reply["effect"]))
        except (OSError, ConnectionError, ValueError):
            pass  # the engine was killed under us
        finally:
            for c in conns.values():
                c.close()


def check_wal(engine: EngineProcess, answered: dict[str, str], note: str) -> int:
    chain_id, records, checkpoints = read_wal(engine.wal_path)
    report = verify_chain(chain_id, records, checkpoints, pinned_keys=pinned_key(engine.paths.state_dir))
    assert report.ok, (report.to_dict(), note)
    # the recovery checkpoint signed the tail the kill left: after it only this start's own record (the
    # policy version switches between the normal and full builds) may follow, nothing was served yet
    assert checkpoints
    assert all(r.action_type == "policy_activated" for r in records if r.seq > checkpoints[-1].seq)
    effects = {r.id: r.effect for r in records}
    missing = [a for a in answered if a not in effects]
    assert not missing, f"{len(missing)} answered action_ids are not in the WAL, e.g. {missing[:3]} {note}"
    wrong = [(a, e, effects[a]) for a, e in answered.items() if effects[a] != e]
    assert not wrong, f"effects differ from what clients were told: {wrong[:3]} {note}"
    return len(records)


def test_sigkill_under_load_loses_nothing_that_was_answered() -> None:
    seed = int(os.environ.get("FARAMESH_CRASH_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    seed_note = f"(FARAMESH_CRASH_SEED={seed}, {ROUNDS} rounds)"
    stats = {"rounds": 0, "inside_commit": 0, "full_sync": 0, "answered": 0, "records": 0}
    root = short_tmpdir("fmc")
    try:
        stack = make_stack(root)
        normal = root / "normal.json"
        full = root / "full.json"
        compile_policy(stack, normal, policy_text(wal_sync="normal"))
        compile_policy(stack, full, policy_text(wal_sync="full"))
        flag = root / "in-commit"
        dirs: EngineDirs | None = None
        answered: dict[str, str] = {}
        for r in range(ROUNDS):
            if r % EPOCH == 0:
                if dirs is not None:
                    dirs.cleanup()
                dirs = EngineDirs.fresh()
                answered = {}
            assert dirs is not None
            inside = r % INSIDE_EVERY == 0
            sync_full = r % FULL_EVERY == 2
            hooks = {}
            if inside:
                flag.write_bytes(b"out")
                hooks = {"FARAMESH_TEST_COMMIT_SLEEP": str(COMMIT_SLEEP), "FARAMESH_TEST_COMMIT_FLAG": str(flag)}
            engine = EngineProcess(stack, full if sync_full else normal, dirs, hooks=hooks)
            try:
                engine.start(timeout=30)  # start-up verifies what the previous kill left behind
                stats["records"] = check_wal(engine, answered, seed_note)
                rnd = Round(engine, rng)
                threads = [threading.Thread(target=rnd.client, args=(n,), daemon=True) for n in range(CLIENTS)]
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.02, 0.5))  # a uniformly drawn moment
                if inside:
                    deadline = time.monotonic() + 10
                    while flag.read_bytes() != b"in " and time.monotonic() < deadline:
                        time.sleep(0.001)
                engine.kill()
                if inside and flag.read_bytes() == b"in ":
                    stats["inside_commit"] += 1  # died inside the transaction, before COMMIT
                rnd.stop.set()
                for t in threads:
                    t.join(15)
                assert not any(t.is_alive() for t in threads)
            finally:
                engine.ensure_stopped()
            for action_id, effect in rnd.log:
                assert answered.setdefault(action_id, effect) == effect
            stats["answered"] += len(rnd.log)
            stats["rounds"] += 1
            stats["full_sync"] += sync_full
            # after each kill: restart, verify and check every answer (the next round's start does it too)
            if r == ROUNDS - 1 or (r + 1) % EPOCH == 0:
                final = EngineProcess(stack, normal, dirs)
                try:
                    final.start(timeout=30)
                    stats["records"] = check_wal(final, answered, seed_note)
                    assert final.terminate() == 0
                finally:
                    final.ensure_stopped()
        assert dirs is not None
        dirs.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ncrash test: {json.dumps(stats)} {seed_note}")
    assert stats["rounds"] == ROUNDS
    assert ROUNDS >= 25 or "FARAMESH_CRASH_ROUNDS" in os.environ  # `make test` runs at least 25
    assert stats["inside_commit"] >= min(5, ROUNDS // INSIDE_EVERY), stats
    assert stats["answered"] >= 100 * ROUNDS, stats  # the kills really landed under load
