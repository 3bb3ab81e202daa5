"""The WAL behind the engine (engine/wal/log.py, the commit/open paths of engine/wal/store.py, start-up in
engine/server.py): WAL-first replies, group commit, replay after restart, refusing a broken chain,
recovery checkpoints, schema versions, and budget reservations with settlement and expiry."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import (
    PYTHON,
    EngineDirs,
    EngineProcess,
    FakeClock,
    InProcessEngine,
    compile_policy,
    govern,
    make_stack,
    pinned_key,
    policy_text,
    read_wal,
    short_tmpdir,
    verify_wal_file,
)
from faramesh.engine.wal.store import Batch, MemoryStore, SchemaTooNew, SqliteStore


@pytest.fixture
def tmp() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack(tmp: Path) -> Path:
    return make_stack(tmp)


@pytest.fixture
def policy(stack: Path) -> Any:
    return compile_policy(stack)[0]


class CountingStore(SqliteStore):
    """Counts transactions and remembers what each committed (to prove group commit and WAL-first)."""

    def __init__(self, path: Path, sync: str = "normal") -> None:
        super().__init__(path, sync)
        self.batches: list[int] = []
        self.committed: set[str] = set()
        self._count_lock = threading.Lock()

    def commit(self, batch: Batch) -> None:
        super().commit(batch)
        with self._count_lock:
            if batch.records:
                self.batches.append(len(batch.records))
            self.committed.update(r.id for r in batch.records)


def faramesh_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "faramesh.launchers.main", *args], capture_output=True, text=True, env=env, timeout=60
    )


# ---------------------------------------------------------------- WAL-first


def test_a_failed_commit_denies_with_wal_write_failure_and_status_is_degraded(
    tmp: Path, stack: Path, policy: Any
) -> None:
    store = SqliteStore(tmp / "wal.sqlite", "normal")
    failing = [False]

    def fault() -> None:  # inside the transaction, after the decision's rows were inserted
        if failing[0]:
            raise sqlite3.OperationalError("disk I/O error (injected)")

    store.fault_hook = fault
    eng = InProcessEngine(policy, tmp / "run", store=store).start()
    try:
        with eng.conn("bot") as bot, eng.conn("operator") as op:
            ok = bot.call(govern("ticket/read"))
            assert ok["effect"] == "PERMIT"
            seq_before = eng.wal.seq
            failing[0] = True
            for tool, args in (("ticket/read", {}), ("refund", {"amount": 1}), ("refund", {"amount": 100})):
                reply = bot.call(govern(tool, args, call_id="c"))
                # the policy's answer (permit, defer) is never what the client sees
                assert reply["effect"] == "DENY" and reply["action_id"] is None, reply
                assert reply["structured_denial"]["code"] == "WAL_WRITE_FAILURE"
                assert "defer_token" not in reply
            rpc = bot.call({"jsonrpc": "2.0", "id": 1, "method": "govern", "params": {"tool": "ticket/read"}})
            assert rpc["result"]["effect"] == "DENY"
            assert rpc["result"]["structured_denial"]["code"] == "WAL_WRITE_FAILURE"
            status = op.call({"type": "status"})["daemon"]
            assert status["degraded"] is True and "injected" in status["last_error"]
            assert status["state"] == "READY" and status["wal"]["seq"] == seq_before  # the head did not move
            cli = faramesh_cli("status", "--dir", str(stack), "--socket", str(eng.sockets["operator"]))
            assert cli.returncode == 3, cli.stdout + cli.stderr
            assert "degraded" in cli.stdout
            assert not eng.store.approvals()  # the defer's approval was not persisted, and not kept either
            assert not eng.state.approvals
            failing[0] = False
            healed = bot.call(govern("refund", {"amount": 100}))
            assert healed["effect"] == "DEFER" and healed["action_id"]
    finally:
        eng.stop()
    _, records, _ = read_wal(tmp / "wal.sqlite")
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert verify_wal_file(tmp / "wal.sqlite").ok
    assert {r.id for r in records} >= {ok["action_id"], healed["action_id"]}


def test_a_failed_commit_spends_no_approval_rate_token_or_budget(tmp: Path, policy: Any) -> None:
    """What a never-recorded decision changed is undone: an approved call whose permit could not be
    recorded may be retried, and rate tokens / budget reservations are given back."""
    store = MemoryStore()
    eng = InProcessEngine(policy, tmp / "run", store=store, clock=FakeClock()).start()
    try:
        with eng.conn("bot") as bot, eng.conn("operator") as op, eng.conn("spender") as spender:
            apr = bot.call(govern("refund", {"amount": 200}))["defer_token"]
            op.call({"type": "approve", "approval_id": apr})
            for _ in range(3):
                assert bot.call(govern("search"))["effect"] == "PERMIT"
            store.fail_next_commit = True
            assert bot.call(govern("refund", {"amount": 200}))["structured_denial"]["code"] == "WAL_WRITE_FAILURE"
            for _ in range(5):
                assert bot.call(govern("search"))["structured_denial"]["code"] == "WAL_WRITE_FAILURE"
            llm = {"model": "gpt-4o", "max_tokens": 10000}  # a 10-cent estimate against a $1 budget
            for _ in range(15):
                assert spender.call(govern("llm/chat", llm))["structured_denial"]["code"] == "WAL_WRITE_FAILURE"
            store.fail_next_commit = False
            permit = bot.call(govern("refund", {"amount": 200}))
            assert permit["effect"] == "PERMIT" and eng.state.approvals[apr].used_by == permit["action_id"]
            assert [bot.call(govern("search"))["effect"] for _ in range(3)] == ["PERMIT", "PERMIT", "DENY"]
            assert sum(spender.call(govern("llm/chat", llm))["effect"] == "PERMIT" for _ in range(12)) == 10
    finally:
        eng.stop()


def test_wal_write_failure_over_serve_makes_faramesh_status_exit_3(tmp: Path, stack: Path) -> None:
    _, pf = compile_policy(stack, tmp / "p.json")
    assert pf is not None
    dirs = EngineDirs.fresh()
    fault = tmp / "fail-now"
    eng = EngineProcess(stack, pf, dirs, hooks={"FARAMESH_TEST_FAULT_FILE": str(fault)})
    try:
        eng.start()
        status = faramesh_cli("status", "--dir", str(stack), env=eng.env)
        assert status.returncode == 0, status.stdout + status.stderr
        fault.touch()
        with eng.agent("bot") as bot:
            reply = bot.call(govern("ticket/read"))
        assert reply["effect"] == "DENY" and reply["structured_denial"]["code"] == "WAL_WRITE_FAILURE"
        status = faramesh_cli("status", "--dir", str(stack), "--format", "json", env=eng.env)
        assert status.returncode == 3, status.stdout + status.stderr
        assert json.loads(status.stdout)["daemon"]["degraded"] is True
        fault.unlink()
        with eng.agent("bot") as bot:
            assert bot.call(govern("ticket/read"))["effect"] == "PERMIT"
        assert eng.terminate() == 0
        report = verify_wal_file(eng.wal_path, pinned_key(eng.paths.state_dir))
        assert report.ok, report.to_dict()
    finally:
        eng.ensure_stopped()
        dirs.cleanup()


# ---------------------------------------------------------------- group commit


def test_group_commit_groups_concurrent_decisions_and_replies_follow_their_commit(tmp: Path, policy: Any) -> None:
    store = CountingStore(tmp / "wal.sqlite", "full")
    eng = InProcessEngine(policy, tmp / "run", store=store).start()
    early: list[str] = []
    effects: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with eng.conn("bot") as c:
            for i in range(25):
                tool, args = [("ticket/read", {}), ("refund", {"amount": 10}), ("refund", {"amount": 900})][i % 3]
                reply = c.call(govern(tool, args, call_id=f"{n}-{i}"))
                with lock:
                    effects.append(reply["effect"])
                    if reply["action_id"] not in store.committed:
                        early.append(reply["action_id"])  # a reply before its transaction committed

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        eng.stop()
    records = sum(store.batches)
    assert len(effects) == 800 and set(effects) == {"PERMIT", "DENY"}
    assert not early
    assert records >= 800
    # everything appended in one turn of the loop is one transaction: far fewer commits than records
    assert len(store.batches) * 4 <= records, (len(store.batches), records)
    assert max(store.batches) >= 8
    assert verify_wal_file(tmp / "wal.sqlite").ok


# ---------------------------------------------------------------- replay after restart


def restartable(policy: Any, tmp: Path, clock: FakeClock, store_path: Path) -> InProcessEngine:
    return InProcessEngine(policy, tmp / "run", store=SqliteStore(store_path, "normal"), clock=clock).start()


def test_rate_buckets_are_replayed_after_a_restart(tmp: Path, policy: Any) -> None:
    clock = FakeClock()
    path = tmp / "wal.sqlite"
    eng = restartable(policy, tmp, clock, path)
    try:
        with eng.conn("bot") as bot:  # `rate_limit "search": 5 per minute`
            assert [bot.call(govern("search"))["effect"] for _ in range(3)] == ["PERMIT"] * 3
            assert bot.call(govern("refund", {"amount": 900}))["effect"] == "DENY"
    finally:
        eng.stop()
    clock.advance(1)
    eng = restartable(policy, tmp, clock, path)
    try:
        with eng.conn("bot") as bot:
            assert [bot.call(govern("search"))["effect"] for _ in range(2)] == ["PERMIT"] * 2
            limited = bot.call(govern("search"))
            assert limited["effect"] == "DENY"
            denial = limited["structured_denial"]
            assert denial["code"] == "RATE_EXCEEDED" and denial["resolution"]["type"] == "retry_after"
            assert 0 < denial["resolution"]["retry_after_seconds"] <= 12
            clock.advance(denial["resolution"]["retry_after_seconds"])
            assert bot.call(govern("search"))["effect"] == "PERMIT"
    finally:
        eng.stop()


def test_budgets_settlements_approvals_and_policy_versions_are_replayed(tmp: Path, stack: Path, policy: Any) -> None:
    clock = FakeClock()
    path = tmp / "wal.sqlite"
    llm = {"model": "gpt-4o", "max_tokens": 10000}  # estimate 10 cents; the budget is $1
    eng = restartable(policy, tmp, clock, path)
    first_applied = eng.server.applied_at
    try:
        with eng.conn("spender") as spender, eng.conn("bot") as bot:
            ids = [spender.call(govern("llm/chat", llm))["action_id"] for _ in range(4)]
            settled = spender.call({"type": "complete", "action_id": ids[0], "usage": {"cost_cents": 3}})
            assert settled == {"action_id": ids[0], "settled_cents": 3}
            pending = bot.call(govern("refund", {"amount": 300}))["defer_token"]
        before = eng.server.status()
    finally:
        eng.stop()
    budget = before["budgets"][0]
    assert (budget["spent_cents"], budget["reserved_cents"], budget["calls"]) == (3, 30, 4)
    clock.advance(5)
    eng = restartable(policy, tmp, clock, path)
    try:
        after = eng.server.status()
        replayed = after["budgets"][0]
        # reservations are replayed as spent at their estimate; the settlement corrects its one
        assert replayed["spent_cents"] + replayed["reserved_cents"] == 33, replayed
        assert after["approvals"]["pending"] == 1 and eng.state.approvals[pending].status == "PENDING"
        assert after["daemon"]["applied_at"] == first_applied  # the same policy version: still applied then
        with eng.conn("spender") as spender:
            effects = [spender.call(govern("llm/chat", llm))["effect"] for _ in range(8)]
        assert effects == ["PERMIT"] * 6 + ["DENY"] * 2  # 33 + 6 × 10 = 93; a seventh would make 103
    finally:
        eng.stop()
    _, records, _ = read_wal(path)
    assert sum(r.action_type == "policy_activated" for r in records) == 1
    # a new policy version at the next start is recorded, with the version it replaced
    new_policy = compile_policy(stack, text=policy_text() + '\nagent "late" {\n  default deny\n}\n')[0]
    clock.advance(5)
    eng = InProcessEngine(new_policy, tmp / "run", store=SqliteStore(path, "normal"), clock=clock).start()
    try:
        assert eng.server.applied_at != first_applied
    finally:
        eng.stop()
    _, records, _ = read_wal(path)
    activations = [json.loads(r.body) for r in records if r.action_type == "policy_activated"]
    assert [a["policy_version"] for a in activations] == [policy.version, new_policy.version]
    assert activations[1]["previous_policy_version"] == policy.version
    assert verify_wal_file(path).ok


# ---------------------------------------------------------------- start-up verification


def stopped_engine_with_records(tmp: Path, stack: Path, hooks: dict[str, str] | None = None) -> EngineProcess:
    _, pf = compile_policy(stack, tmp / "p.json")
    assert pf is not None
    eng = EngineProcess(stack, pf, EngineDirs.fresh(), hooks=hooks)
    eng.start()
    with eng.agent("bot") as bot:
        for i in range(12):
            bot.call(govern(["ticket/read", "refund"][i % 2], {"amount": 900}))
    return eng


def test_start_up_refuses_a_broken_chain_naming_the_first_bad_record(tmp: Path, stack: Path) -> None:
    eng = stopped_engine_with_records(tmp, stack)
    try:
        assert eng.terminate() == 0
        _, records, _ = read_wal(eng.wal_path)
        victim = records[6]
        body = json.loads(victim.body)
        body["effect"] = "PERMIT" if body["effect"] != "PERMIT" else "DENY"
        with sqlite3.connect(eng.wal_path) as conn:  # tamper with the stored bytes of one record
            conn.execute("UPDATE records SET body = ? WHERE seq = ?", (json.dumps(body).encode(), victim.seq))
            conn.execute("DELETE FROM checkpoints WHERE seq >= ?", (victim.seq,))
        eng.start(wait_ready=False)
        code = eng.wait(20)
        assert code == 1, eng.log()
        assert f"seq {victim.seq}" in eng.log() and victim.id in eng.log()
        assert not eng.paths.operator_socket.exists()
        # a forged checkpoint over the tampered tail does not make start-up skip it
        _, _, checkpoints = read_wal(eng.wal_path)
        forged = checkpoints[-1]
        with sqlite3.connect(eng.wal_path) as conn:
            conn.execute(
                "INSERT INTO checkpoints VALUES (?,?,?,?,?,?,?)",
                (records[-1].seq, records[-1].record_hash, forged.time, "periodic", forged.key_fingerprint,
                 forged.public_key, forged.signature),
            )  # fmt: skip
        eng.start(wait_ready=False)
        assert eng.wait(20) == 1
        assert eng.log().count(f"WAL chain broken at seq {victim.seq} (record {victim.id})") == 2
    finally:
        eng.ensure_stopped()
        eng.dirs.cleanup()


def test_start_up_refuses_a_wal_whose_signed_tail_was_cut(tmp: Path, stack: Path) -> None:
    eng = stopped_engine_with_records(tmp, stack)
    try:
        assert eng.terminate() == 0
        _, records, checkpoints = read_wal(eng.wal_path)
        assert checkpoints[-1].seq == records[-1].seq
        with sqlite3.connect(eng.wal_path) as conn:
            conn.execute("DELETE FROM records WHERE seq > ?", (records[-4].seq,))
        eng.start(wait_ready=False)
        assert eng.wait(20) == 1
        assert f"checkpoint covers seq {records[-1].seq}" in eng.log()
    finally:
        eng.ensure_stopped()
        eng.dirs.cleanup()


def test_a_recovery_checkpoint_signs_the_tail_after_an_unclean_stop(tmp: Path, stack: Path) -> None:
    eng = stopped_engine_with_records(tmp, stack, hooks={"FARAMESH_TEST_CHECKPOINT_INTERVAL": "3600"})
    try:
        eng.kill()  # SIGKILL: no shutdown checkpoint
        _, records, checkpoints = read_wal(eng.wal_path)
        assert checkpoints[-1].seq < records[-1].seq  # an unsigned tail
        eng.start()
        status = eng.status()
        assert status is not None and status["daemon"]["wal"]["signed_through"] == records[-1].seq
        _, _, checkpoints = read_wal(eng.wal_path)
        assert checkpoints[-1].kind == "recovery" and checkpoints[-1].seq == records[-1].seq
        report = verify_wal_file(eng.wal_path, pinned_key(eng.paths.state_dir))
        assert report.ok and report.recovery_signed, report.to_dict()
        assert report.recovery_signed[-1][1] == records[-1].seq
        assert eng.terminate() == 0
    finally:
        eng.ensure_stopped()
        eng.dirs.cleanup()


def test_a_newer_schema_version_is_refused(tmp: Path, stack: Path) -> None:
    eng = stopped_engine_with_records(tmp, stack)
    try:
        assert eng.terminate() == 0
        with sqlite3.connect(eng.wal_path) as conn:
            conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        with pytest.raises(SchemaTooNew):
            SqliteStore(eng.wal_path).open()
        eng.start(wait_ready=False)
        assert eng.wait(20) == 1
        assert "newer than this engine" in eng.log()
        with sqlite3.connect(eng.wal_path) as conn:  # refused without being touched
            assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    finally:
        eng.ensure_stopped()
        eng.dirs.cleanup()


def test_fresh_store_records_its_schema_version(tmp: Path) -> None:
    store = SqliteStore(tmp / "new.sqlite")
    meta = store.open()
    store.close()
    assert meta["schema_version"] == "1"


# ---------------------------------------------------------------- budget reservations


def test_budget_reservation_settlement_and_expiry(tmp: Path, policy: Any) -> None:
    clock = FakeClock()
    eng = InProcessEngine(policy, tmp / "run", clock=clock).start()
    llm = {"model": "gpt-4o", "max_tokens": 10000}  # 10 cents reserved per permit; the budget is $1
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def caller() -> None:
        with eng.conn("spender") as c:
            for _ in range(2):
                reply = c.call(govern("llm/chat", llm))
                with lock:
                    results.append(reply)

    try:
        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # concurrent calls cannot overspend: exactly 10 reservations fit
        permits = [r for r in results if r["effect"] == "PERMIT"]
        denied = [r for r in results if r["effect"] == "DENY"]
        assert len(permits) == 10 and len(denied) == 6
        d = denied[0]["structured_denial"]
        assert d["code"] == "BUDGET_EXCEEDED" and d["resolution"]["type"] == "budget_reset"
        assert d["resolution"]["resets_at"] == 1_780_358_400  # the next UTC midnight
        with eng.conn("spender") as spender, eng.conn("bot") as bot:
            a, b, c = (p["action_id"] for p in permits[:3])
            # only its own agent may settle a reservation
            assert "error" in bot.call({"type": "complete", "action_id": a, "usage": {"cost_cents": 1}})
            assert spender.call({"type": "complete", "action_id": a, "usage": {"cost_cents": 1}})["settled_cents"] == 1
            again = spender.call({"type": "complete", "action_id": a, "usage": {"cost_cents": 1}})
            assert again["error"]["code"] == "INVALID_REQUEST"  # settled once
            # usage in tokens is priced from the table: 1,000 output tokens of gpt-4o = 1 cent
            usage = {"model": "gpt-4o", "input_tokens": 0, "output_tokens": 1000}
            assert spender.call({"type": "complete", "action_id": b, "usage": usage})["settled_cents"] == 1
            # spent 2 + reserved 80: one more 10-cent call fits, the next does not
            assert spender.call(govern("llm/chat", llm))["effect"] == "PERMIT"
            assert spender.call(govern("llm/chat", llm))["effect"] == "DENY"
            usage_now = eng.state.budgets[("spender", "daily")]
            assert (usage_now.spent_cents, usage_now.reserved_cents) == (2, 90)
            # after the TTL an unsettled reservation is settled at its estimate
            clock.advance(3601)
            assert spender.call(govern("llm/chat", llm))["effect"] == "DENY"
            usage_now = eng.state.budgets[("spender", "daily")]
            assert (usage_now.spent_cents, usage_now.reserved_cents) == (92, 0)
            late = spender.call({"type": "complete", "action_id": c, "usage": {"cost_cents": 0}})
            assert late["error"]["code"] == "INVALID_REQUEST"
            # a settlement is a DPR
            settlements = [json.loads(r.body) for r in eng.store.records() if r.action_type == "settlement"]
            assert [(s["settles"], s["cost_delta_cents"]) for s in settlements] == [(a, -9), (b, -9)]
            # the next UTC day, the budget starts over
            clock.advance(86400)
            assert spender.call(govern("llm/chat", llm))["effect"] == "PERMIT"
    finally:
        eng.stop()


def test_group_commit_through_serve_with_wal_sync_full(tmp: Path, stack: Path) -> None:
    """Through `faramesh serve` (SQLite, wal_sync full, 16 concurrent clients): the test launcher logs the
    number of records of every committed transaction; many decisions share each one."""
    _, pf = compile_policy(stack, tmp / "p.json", text=policy_text(wal_sync="full"))
    assert pf is not None
    dirs = EngineDirs.fresh()
    commit_log = tmp / "commits"
    eng = EngineProcess(stack, pf, dirs, hooks={"FARAMESH_TEST_COMMIT_LOG": str(commit_log)})
    try:
        eng.start()

        def client() -> None:
            with eng.agent("bot") as c:
                for _ in range(40):
                    assert c.call(govern("ticket/read"))["effect"] == "PERMIT"

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert eng.terminate() == 0
        sizes = [int(n) for n in commit_log.read_text().split()]
        _, records, _ = read_wal(eng.wal_path)
        assert sum(sizes) == len(records) and len([r for r in records if r.action_type == "tool_call"]) == 640
        assert len(sizes) * 3 <= len(records), f"{len(sizes)} transactions for {len(records)} records"
        assert verify_wal_file(eng.wal_path, pinned_key(eng.paths.state_dir)).ok
    finally:
        eng.ensure_stopped()
        dirs.cleanup()
