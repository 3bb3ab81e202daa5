"""Replay retention: the redacted args kept for replay (`requests` table) are deleted once older than
`runtime { replay_retention }` (default 7d) during WAL maintenance, in small batches with secure_delete;
DPRs are never deleted and the chain still verifies."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import FakeClock, InProcessEngine, compile_policy, govern, make_stack, short_tmpdir, verify_wal_file
from faramesh.engine.wal import store as wal_store
from faramesh.engine.wal.store import DEFAULT_REPLAY_RETENTION, SqliteStore

DAY = 86400

POLICY = """\
runtime {
  backend = "sqlite"
  wal_sync = "normal"
%s
}

agent "bot" {
  default deny
  rules {
    permit search
  }
}
"""


def record(seq: int, stamp: str) -> wal_store.StoredRecord:
    return wal_store.StoredRecord(
        seq, f"id{seq}", stamp, "bot", "search", "PERMIT", "POLICY_PERMIT", None, "tool_call", b"{}", "00" * 32
    )


@pytest.fixture
def tmp() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def rows(path: Path) -> tuple[int, set[int]]:
    """(number of records, seqs that still have stored args), read beside the engine."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        kept = {r[0] for r in conn.execute("SELECT seq FROM requests")}
    finally:
        conn.close()
    return int(records), kept


def seq_of(eng: InProcessEngine, action_id: str) -> int:
    rec = eng.store.record_by_id(action_id)
    assert rec is not None
    return int(rec.seq)


def test_old_request_args_disappear_during_maintenance_newer_stay_and_the_chain_verifies(tmp: Path) -> None:
    policy = compile_policy(make_stack(tmp, POLICY % '  replay_retention = "7d"'))[0]
    clock = FakeClock()
    path = tmp / "wal.sqlite"
    store = SqliteStore(path, "normal")
    store.retention_seconds = float(policy.runtime["replay_retention"])
    eng = InProcessEngine(policy, tmp / "run", store=store, clock=clock, checkpoint_interval=0.2).start()
    try:
        with eng.conn("bot") as bot:
            old = [bot.call(govern("search", {"q": f"old-marker-{i}"}))["action_id"] for i in range(5)]
            clock.advance(3 * DAY)
            middle = [bot.call(govern("search", {"q": f"mid-{i}"}))["action_id"] for i in range(3)]
            clock.advance(5 * DAY)  # the first five are 8 days old now, the middle three 5 days
            new = [bot.call(govern("search", {"q": f"new-{i}"}))["action_id"] for i in range(3)]
        old_seqs = {seq_of(eng, a) for a in old}
        kept_seqs = {seq_of(eng, a) for a in middle + new}
        deadline = time.monotonic() + 10
        while rows(path)[1] & old_seqs and time.monotonic() < deadline:
            time.sleep(0.05)  # maintenance runs once the WAL is idle
        total, kept = rows(path)
        assert not kept & old_seqs
        assert kept_seqs <= kept
        assert total >= 11  # every DPR is still there
        for a in old + middle + new:
            assert eng.store.record_by_id(a) is not None
    finally:
        eng.stop()
    report = verify_wal_file(path)
    assert report.ok, report
    # secure_delete: the deleted args are in no page of the file (the -wal is folded in at close)
    raw = b"".join(p.read_bytes() for p in tmp.glob("wal.sqlite*"))
    assert b"old-marker" not in raw
    assert b"new-0" in raw


def test_deletion_runs_in_small_batches_and_a_backlog_is_worked_off(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal_store, "RETENTION_BATCH", 10)
    monkeypatch.setattr(wal_store, "RETENTION_MAX_BATCHES", 2)
    store = SqliteStore(tmp / "w.sqlite", "normal")
    store.open()
    try:
        t0 = 1_780_315_200.0
        batch = wal_store.Batch()
        for seq in range(1, 61):
            when = t0 if seq <= 50 else t0 + 10 * DAY
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{seq:06d}Z"
            batch.records.append(record(seq, stamp))
            batch.request_args.append((seq, b'{"q":"x"}'))
        store.commit(batch)
        now = t0 + 10 * DAY
        assert store.maintenance(now) is True  # 20 of the 50 old rows: more is left
        assert sum(1 for s in range(1, 61) if store.request_args(s) is not None) == 40
        assert store.maintenance(now) is True
        assert store.maintenance(now) is False  # the last 10 old rows
        assert [s for s in range(1, 61) if store.request_args(s) is not None] == list(range(51, 61))
        assert store.maintenance(now) is False  # nothing to do
        assert sum(1 for _ in store.records()) == 60
    finally:
        store.close()


def test_a_clock_that_went_backwards_never_deletes_a_row_younger_than_the_retention(tmp: Path) -> None:
    store = SqliteStore(tmp / "w.sqlite", "normal")
    store.open()
    try:
        t0 = 1_780_315_200.0
        times = [t0, t0 + 20 * DAY, t0 + 1]  # seq 3 was written after a clock step back
        batch = wal_store.Batch()
        for seq, when in enumerate(times, start=1):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".000000Z"
            batch.records.append(record(seq, stamp))
            batch.request_args.append((seq, b"{}"))
        store.commit(batch)
        store.maintenance(t0 + 21 * DAY)
        assert [s for s in (1, 2, 3) if store.request_args(s) is not None] == [2]
    finally:
        store.close()


def test_the_memory_store_applies_the_retention_too() -> None:
    from faramesh.engine.wal.store import Batch, MemoryStore, StoredRecord

    store = MemoryStore()
    store.retention_seconds = DAY
    store.commit(
        Batch(
            records=[
                StoredRecord(1, "a", "2026-06-01T00:00:00.000000Z", None, None, None, None, None, "tool_call", b"", ""),
                StoredRecord(2, "b", "2026-06-03T00:00:00.000000Z", None, None, None, None, None, "tool_call", b"", ""),
            ],
            request_args=[(1, b"{}"), (2, b"{}")],
        )
    )
    store.maintenance(1_780_444_800.0)  # 2026-06-03T00:00Z
    assert store.request_args(1) is None and store.request_args(2) == b"{}"


@pytest.mark.parametrize(
    ("runtime", "expected"), [("", DEFAULT_REPLAY_RETENTION), ('  replay_retention = "36h"', 36 * 3600)]
)
def test_serve_takes_the_retention_from_the_policy(tmp: Path, runtime: str, expected: float) -> None:
    from faramesh.engine.runner import serve_server, stack_paths

    stack = make_stack(tmp, POLICY % runtime)
    _, pf = compile_policy(stack, tmp / "policy.json")
    paths = stack_paths(stack, env={"FARAMESH_STATE_DIR": str(tmp / "st"), "FARAMESH_RUNTIME_DIR": str(tmp / "rt")})
    server: Any = serve_server(stack, paths, pf)
    assert server.wal.store.retention_seconds == expected
    assert DEFAULT_REPLAY_RETENTION == 7 * DAY


def test_replay_retention_must_be_a_duration(tmp: Path) -> None:
    from faramesh.engine.policy.errors import PolicySchemaError

    with pytest.raises(PolicySchemaError, match="duration"):
        compile_policy(make_stack(tmp, POLICY % '  replay_retention = "a week"'))
