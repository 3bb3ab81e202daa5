"""The PostgreSQL WAL store (engine/wal/pg_store.py) against a real cluster started by tests/pg_cluster.py.

Same semantics as the SQLite store: stored canonical bytes come back byte for byte (compared with what
SqliteStore stores for the same batches), a batch is one transaction, the chain verifies through the
audit reader, a newer schema is refused untouched. Fleet properties: two engines on one database keep
separate gap-free chains; a second writer for the same chain is refused; the chain-head
compare-and-set refuses to fork a chain. Faults: a connection killed mid-transaction
(pg_terminate_backend from another session), a server stopped under the store, and a frozen backend
(SIGSTOP) — each a typed `StoreError` (the engine denies with WAL_WRITE_FAILURE), never a hang, never a
partial batch, and the store reconnects afterwards. The URL's password never shows in errors.

Every test works in a schema of its own (`pg_schema`), in the cluster's one test database.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from engine_harness import PYTHON, FakeClock, InProcessEngine, compile_policy, govern, make_stack, short_tmpdir
from faramesh.engine.wal.audit_ops import PinnedKeys, chain_position, export, verify_bundle, verify_wal
from faramesh.engine.wal.dpr import SCHEMA, chain_hash, genesis_hash, record_body
from faramesh.engine.wal.log import rfc3339
from faramesh.engine.wal.signer import checkpoint_message, ephemeral_signer
from faramesh.engine.wal.store import (
    Batch,
    Checkpoint,
    NotAWal,
    SchemaTooNew,
    SqliteReader,
    SqliteStore,
    StoredRecord,
    StoreError,
)
from faramesh.engine.wal.verify import verify_chain

if TYPE_CHECKING:
    from pg_cluster import PgCluster

pytest_plugins = ["pg_cluster"]  # the session's cluster and per-test schemas (fixtures)

if os.environ.get("CI") == "true":  # a missing psycopg fails CI (DESIGN.md §7)
    import faramesh.engine.wal.pg_store as pg
else:
    pg = pytest.importorskip("faramesh.engine.wal.pg_store")

PgStore = pg.PgStore
PgReader = pg.PgReader
T0 = 1_780_315_200.0  # 2026-06-01T12:00:00Z


@pytest.fixture
def tmp() -> Iterator[Path]:
    root = short_tmpdir("fpg")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stores() -> Iterator[list[Any]]:
    """Stores a test opens, closed at its end whatever happened (a held chain lock must not outlive it)."""
    opened: list[Any] = []
    yield opened
    for store in opened:
        store.close()


def open_store(cluster: PgCluster, schema: str, chain: str, opened: list[Any], **kw: Any) -> Any:
    store = PgStore(cluster.url(), chain, kw.pop("sync", "normal"), schema=schema, **kw)
    opened.append(store)
    store.open()
    return store


# ---------------------------------------------------------------- records built as the Wal builds them

ARGS_VARIETY: list[dict[str, Any]] = [
    {"amount": 10},
    {"note": "naïve café ✓ — 日本語", "emoji": "🧾"},
    {"ratio": 0.1, "big": 2**53 - 1, "neg": -1e-7, "f": 1e21},  # floats: the rfc8785 path
    {"nested": {"z": [1, 2, {"é": None}], "a": True}},
    {},
]


def chain_records(chain_id: str, count: int, *, start: int = 1, prev: str | None = None,
                  t0: float = T0) -> list[StoredRecord]:  # fmt: skip
    """`count` records continuing the chain at `start` (after hash `prev`), built like Wal._build."""
    head = prev or genesis_hash(chain_id)
    out = []
    for i in range(count):
        seq = start + i
        record = {
            "id": f"01TEST{chain_id[-4:]:0>4}{seq:016d}",
            "time": rfc3339(t0 + seq),
            "agent_id": ["bot", "other"][seq % 2],
            "tool": ["ticket/read", "refund", "search"][seq % 3],
            "effect": ["PERMIT", "DENY", "DEFER"][seq % 3],
            "code": [None, "POLICY_DENY", "POLICY_DEFER"][seq % 3],
            "approval_id": None,
            "action_type": "tool_call",
            "args": ARGS_VARIETY[seq % len(ARGS_VARIETY)],
            "schema": SCHEMA,
            "chain_id": chain_id,
            "seq": seq,
            "prev_record_hash": head,
        }
        body = record_body(record)
        head = chain_hash(head, body)
        out.append(StoredRecord(seq, record["id"], record["time"], record["agent_id"], record["tool"],
                                record["effect"], record["code"], None, "tool_call", body, head))  # fmt: skip
    return out


def checkpoint_over(chain_id: str, rec: StoredRecord, signer: Any, kind: str = "periodic") -> Checkpoint:
    message = checkpoint_message(chain_id, rec.seq, rec.record_hash)
    return Checkpoint(rec.seq, rec.record_hash, rfc3339(T0 + rec.seq), kind, signer.fingerprint, signer.public_b64,
                      signer.sign(message))  # fmt: skip


def chain_rows(cluster: PgCluster, schema: str, chain: str) -> tuple[int, int, int]:
    """(records, requests, head_seq) of a chain, as another session sees them."""
    admin = cluster.admin()
    records = admin.execute(f"SELECT count(*) FROM {schema}.records WHERE chain_id = %s", (chain,)).fetchone()
    requests = admin.execute(f"SELECT count(*) FROM {schema}.requests WHERE chain_id = %s", (chain,)).fetchone()
    head = admin.execute(f"SELECT head_seq FROM {schema}.chains WHERE chain_id = %s", (chain,)).fetchone()
    assert records and requests and head
    return int(records[0]), int(requests[0]), int(head[0])


def finishes(fn: Callable[[], Any], limit: float = 60.0) -> Any:
    """Run `fn` on a thread and give back what it returned or raised; fail (not hang) if it never returns."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"{fn} did not return within {limit}s: it hangs"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def backend_gone(cluster: PgCluster, pid: int) -> bool:
    for _ in range(500):
        row = cluster.admin().execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row[0] == 0:
            return True
        time.sleep(0.01)
    return False


# ---------------------------------------------------------------- round trip and one transaction per batch


def test_round_trip_is_byte_identical_to_the_sqlite_store(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any], tmp: Path
) -> None:
    chain = "01CHAINROUNDTRIP0000000001"
    signer = ephemeral_signer()
    records = chain_records(chain, 40)
    approval = {"id": "apr-1", "status": "PENDING", "agent_id": "bot", "tool": "refund", "args_hmac": "ab" * 32,
                "created_at": rfc3339(T0), "expires_at": int(T0) + 3600, "args_digest": "sha256:00"}  # fmt: skip
    batches = [
        Batch(
            records=records[:25],
            request_args=[(r.seq, r.body[:40]) for r in records[:25:5]],
            approvals=[approval],
            checkpoint=checkpoint_over(chain, records[24], signer),
            meta={"policy_version": "v1"},
        ),
        Batch(
            records=records[25:],
            approvals=[{**approval, "status": "APPROVED", "approver": "ops", "resolved_at": rfc3339(T0 + 30)}],
            checkpoint=checkpoint_over(chain, records[-1], signer, "shutdown"),
        ),
    ]
    lite = SqliteStore(tmp / "wal.sqlite", "normal")
    lite.open()
    lite.commit(Batch(meta={"chain_id": chain}))
    store = open_store(pg_cluster, pg_schema, chain, stores)
    for batch in batches:
        lite.commit(batch)
        store.commit(batch)

    assert list(store.records()) == list(lite.records()) == records  # bodies byte for byte, every column
    assert store.head() == lite.head() == records[-1]
    assert store.record_by_id(records[7].id) == records[7]
    assert store.checkpoints() == lite.checkpoints()
    assert store.approvals() == lite.approvals()
    assert [store.request_args(s) for s in range(1, 41)] == [lite.request_args(s) for s in range(1, 41)]
    assert store.request_args(6) == records[5].body[:40] and store.request_args(5) is None
    lite.close()
    with SqliteReader(tmp / "wal.sqlite") as lr, PgReader(pg_cluster.url(), chain, schema=pg_schema) as pr:
        assert list(pr.records().rows()) == list(lr.records().rows())
        assert pr.meta["policy_version"] == lr.meta["policy_version"] == "v1"
        assert pr.bounds() == lr.bounds() == (40, 1, 40)

    # a batch is one transaction: every row it wrote carries the same transaction id
    admin = pg_cluster.admin()
    xids = {
        row[0]
        for table, where in (("records", "seq <= 25"), ("requests", "true"), ("checkpoints", "seq = 25"))
        for row in admin.execute(f"SELECT xmin::text FROM {pg_schema}.{table} WHERE {where}").fetchall()
    }
    assert len(xids) == 1, xids


def test_a_fresh_database_records_its_schema_version_and_a_newer_one_is_refused_untouched(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    meta = open_store(pg_cluster, pg_schema, "chain-a", stores).open()  # opening again is idempotent
    assert meta["schema_version"] == str(pg.PG_SCHEMA_VERSION) == "1" and meta["chain_id"] == "chain-a"
    stores[0].close()
    admin = pg_cluster.admin()
    admin.execute(f"UPDATE {pg_schema}.schema_version SET version = 2")
    newer = PgStore(pg_cluster.url(), "chain-b", schema=pg_schema)
    with pytest.raises(SchemaTooNew) as refused:
        newer.open()
    assert refused.value.code == "WAL_SCHEMA_TOO_NEW" and "newer than this engine" in str(refused.value)
    assert admin.execute(f"SELECT version FROM {pg_schema}.schema_version").fetchall() == [(2,)]
    assert admin.execute(f"SELECT chain_id FROM {pg_schema}.chains").fetchall() == [("chain-a",)]  # untouched
    assert newer.writer_backend_pid is None  # nothing left open
    with pytest.raises(SchemaTooNew):
        PgReader(pg_cluster.url(), "chain-a", schema=pg_schema)


def test_a_wal_cut_or_extended_behind_the_engines_back_is_refused_at_open(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    store = open_store(pg_cluster, pg_schema, "chain-cut", stores)
    store.commit(Batch(records=chain_records("chain-cut", 5)))
    store.close()
    pg_cluster.admin().execute(f"DELETE FROM {pg_schema}.records WHERE seq = 5")
    with pytest.raises(pg.ChainDiverged) as refused:
        open_store(pg_cluster, pg_schema, "chain-cut", stores)
    assert "head is seq 5 but the last stored record is seq 4" in str(refused.value)


def test_wal_sync_maps_to_synchronous_commit(pg_cluster: PgCluster, pg_schema: str, stores: list[Any]) -> None:
    full = open_store(pg_cluster, pg_schema, "chain-full", stores, sync="full")
    normal = open_store(pg_cluster, pg_schema, "chain-normal", stores, sync="normal")
    assert full.session_settings["synchronous_commit"] == "on"
    assert normal.session_settings["synchronous_commit"] == "off"
    assert "synchronous_commit=on" in full.description
    with pytest.raises(StoreError):
        PgStore(pg_cluster.url(), "c", "fast")


# ---------------------------------------------------------------- the engine on PostgreSQL, audited through the reader


def test_the_engine_on_postgres_denies_when_its_connection_is_killed_and_the_audit_reader_verifies(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any], tmp: Path
) -> None:
    policy = compile_policy(make_stack(tmp))[0]
    chain = "01ENGINECHAIN0000000000001"
    url = pg_cluster.url()
    clock = FakeClock()
    store = PgStore(url, chain, "normal", schema=pg_schema)
    stores.append(store)
    eng = InProcessEngine(policy, tmp / "run", store=store, clock=clock).start()
    killed: list[int] = []

    def kill_writer() -> None:  # inside the transaction, after the batch's rows were sent
        pid = store.writer_backend_pid
        killed.append(pid)
        pg_cluster.admin().execute("SELECT pg_terminate_backend(%s)", (pid,))

    try:
        with eng.conn("bot") as bot, eng.conn("operator") as op:
            assert bot.call(govern("ticket/read"))["effect"] == "PERMIT"
            deferred = bot.call(govern("refund", {"amount": 100}))
            assert deferred["effect"] == "DEFER"
            assert bot.call(govern("refund", {"amount": 900}))["effect"] == "DENY"
            before = chain_rows(pg_cluster, pg_schema, chain)
            store.fault_hook = kill_writer
            reply = bot.call(govern("refund", {"amount": 200}))
            store.fault_hook = None
            assert reply["effect"] == "DENY" and reply["structured_denial"]["code"] == "WAL_WRITE_FAILURE", reply
            assert "defer_token" not in reply
            assert chain_rows(pg_cluster, pg_schema, chain) == before  # nothing of the batch is visible
            status = op.call({"type": "status"})["daemon"]
            assert status["degraded"] is True and "57P01" in status["last_error"]
            healed = bot.call(govern("ticket/read"))  # the store reconnected (and took its chain lock again)
            assert healed["effect"] == "PERMIT" and healed["action_id"]
            assert store.writer_backend_pid not in (None, killed[0])
        first_signer = eng.wal.signer
    finally:
        eng.stop()
    # a restart on the same chain replays it: the pending approval is still pending
    clock.advance(5)
    again = PgStore(url, chain, "normal", schema=pg_schema)
    stores.append(again)
    eng = InProcessEngine(policy, tmp / "run2", store=again, clock=clock).start()
    try:
        assert eng.server.status()["approvals"]["pending"] == 1
        signer = eng.wal.signer
        with eng.conn("bot") as bot:
            bot.call(govern("search"))
    finally:
        eng.stop()

    pins = PinnedKeys()
    pins.add(first_signer.public_b64, "the first engine's key")
    pins.add(signer.public_b64, "the restarted engine's key")
    with PgReader(url, chain, schema=pg_schema) as reader:
        result = verify_wal(reader, pins)
        assert result.report.ok and len(result.report.keys_used) == 2, result.report.to_dict()
        count, first, last = reader.bounds()
        assert result.total_records == count == last and first == 1 and result.report.unsigned is None
        assert result.chain_id == chain and chain in result.path and url not in result.path
        denied = reader.tail(10, agent_id="bot", effect="deny")
        assert [r.tool for r in denied] == ["refund"] and denied[0].code == "POLICY_DENY"
        assert {r.tool for r in reader.tail(50, tool_glob="TICKET/*")} == {"ticket/read"}
        assert reader.tail(50, tool_glob="ticket_read") == []  # `_` is no wildcard
        rec = reader.record_by_id(healed["action_id"])
        assert rec is not None and rec.effect == "PERMIT"
        position = chain_position(reader, rec, pins)
        assert position["record_hash_matches_bytes"] and position["checkpoint"] is not None
        assert position["proof"]["ok"] is True, position
        out = io.BytesIO()
        summary = export(reader, "jsonl", out, include_public_keys=True, pins=pins, now=T0)
        assert summary.records == count
    bundle = tmp / "bundle.jsonl"
    bundle.write_bytes(out.getvalue())
    checked = verify_bundle(bundle, PinnedKeys(), trust_bundle_keys=True)
    assert checked.report.ok and checked.report.records == count, checked.report.to_dict()
    assert orjson.loads(out.getvalue().split(b"\n", 1)[0])["chain_id"] == chain


def test_the_reader_needs_a_chain_when_the_database_holds_several(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    with pytest.raises(NotAWal):
        PgReader(pg_cluster.url(), schema=pg_schema)  # nothing there yet
    only = open_store(pg_cluster, pg_schema, "only", stores)
    records = chain_records("only", 4)
    only.commit(Batch(records=records[:2]))
    with PgReader(pg_cluster.url(), schema=pg_schema) as reader:
        assert reader.chain_id == "only" and reader.bounds() == (2, 1, 2)
        only.commit(Batch(records=records[2:]))  # the engine appends while the audit reads: one snapshot
        assert reader.bounds() == (2, 1, 2) and len(list(reader.records())) == 2
    with PgReader(pg_cluster.url(), schema=pg_schema) as reader:
        assert reader.bounds() == (4, 1, 4)
    open_store(pg_cluster, pg_schema, "second", stores)
    with pytest.raises(pg.ChainAmbiguous) as ambiguous:
        PgReader(pg_cluster.url(), schema=pg_schema)
    assert "only" in str(ambiguous.value) and "second" in str(ambiguous.value)
    with pytest.raises(NotAWal):
        PgReader(pg_cluster.url(), "third", schema=pg_schema)


# ---------------------------------------------------------------- fleet: several engines, one database


def test_two_engines_interleave_on_one_database_each_with_its_own_gap_free_chain(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    signer = ephemeral_signer()
    chains = {"host-a/01AAAA": 0, "host-b/01BBBB": 0}
    batches: dict[str, int] = {}
    built = {c: chain_records(c, 120) for c in chains}
    handles = {c: open_store(pg_cluster, pg_schema, c, stores) for c in chains}
    barrier = threading.Barrier(len(chains))

    def writer(chain: str) -> None:
        store, records = handles[chain], built[chain]
        barrier.wait()
        at = 0
        for size in [1, 3, 7, 2, 5] * 8:
            batch = records[at : at + size]
            if not batch:
                break
            store.commit(Batch(records=batch, checkpoint=checkpoint_over(chain, batch[-1], signer)))
            at += len(batch)
            batches[chain] = batches.get(chain, 0) + 1
        chains[chain] = at

    threads = [threading.Thread(target=writer, args=(c,)) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(n == 120 for n in chains.values()), chains
    xids = (
        pg_cluster.admin()
        .execute(f"SELECT chain_id, count(DISTINCT xmin::text) FROM {pg_schema}.records GROUP BY chain_id ORDER BY 1")
        .fetchall()
    )
    assert xids == [(c, batches[c]) for c in sorted(chains)] and batches[next(iter(chains))] == 34  # one per batch
    pins = {signer.fingerprint: signer.public_b64}
    for chain in chains:
        with PgReader(pg_cluster.url(), chain, schema=pg_schema) as reader:
            assert list(reader.records()) == built[chain]
            report = verify_chain(chain, reader.records(), reader.checkpoints(), pinned_keys=pins, require_signed=True)
            assert report.ok and report.records == 120 and report.checkpoints == 34, report.to_dict()


def test_a_second_writer_for_the_same_chain_is_refused(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    first = open_store(pg_cluster, pg_schema, "shared-id", stores)
    second = PgStore(pg_cluster.url(), "shared-id", schema=pg_schema, lock_wait=0.3)
    stores.append(second)
    with pytest.raises(pg.ChainLocked) as refused:
        second.open()
    assert refused.value.code == "WAL_CHAIN_LOCKED" and "shared-id" in str(refused.value)
    assert isinstance(refused.value, StoreError)
    open_store(pg_cluster, pg_schema, "other-id", stores)  # another chain in the same database is fine
    first.close()  # the lock goes with the session
    second.open()
    second.commit(Batch(records=chain_records("shared-id", 1)))


def test_a_writer_that_lost_its_session_cannot_fork_the_chain(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    """Engine A's session dies; a misconfigured engine B with the same chain id takes over and appends.
    A must neither write beside B (lock) nor, once B is gone, append at its stale head (compare-and-set)."""
    records = chain_records("dup", 6)
    a = open_store(pg_cluster, pg_schema, "dup", stores, lock_wait=0.3)
    a.commit(Batch(records=records[:3]))
    pid = a.writer_backend_pid
    pg_cluster.admin().execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert backend_gone(pg_cluster, pid)
    b = open_store(pg_cluster, pg_schema, "dup", stores)
    b.commit(Batch(records=records[3:5]))
    stale = chain_records("dup", 1, start=4, prev=records[2].record_hash, t0=T0 + 100)  # A's idea of seq 4
    with pytest.raises(pg.ChainLocked):
        a.commit(Batch(records=stale))
    b.close()
    with pytest.raises(pg.ChainDiverged) as diverged:
        a.commit(Batch(records=stale))
    assert diverged.value.code == "WAL_CHAIN_DIVERGED" and "ends at seq 5" in str(diverged.value)
    beyond = chain_records("dup", 2, start=7, prev=records[5].record_hash)  # would leave seq 6 out: a gap
    with pytest.raises(pg.ChainDiverged):
        a.commit(Batch(records=beyond))
    with pytest.raises(StoreError):
        a.commit(Batch(records=[records[5], beyond[1]]))  # a gap inside one batch
    assert chain_rows(pg_cluster, pg_schema, "dup")[0] == 5
    with PgReader(pg_cluster.url(), "dup", schema=pg_schema) as reader:
        assert verify_chain("dup", reader.records(), []).ok


# ---------------------------------------------------------------- faults


def test_a_connection_killed_mid_transaction_fails_the_append_shows_nothing_and_reconnects(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    store = open_store(pg_cluster, pg_schema, "killed", stores)
    records = chain_records("killed", 8)
    store.commit(Batch(records=records[:4]))
    victim = store.writer_backend_pid

    def terminate() -> None:
        pg_cluster.admin().execute("SELECT pg_terminate_backend(%s)", (victim,))

    store.fault_hook = terminate
    batch = Batch(records=records[4:], request_args=[(5, b'{"a":1}')], meta={"k": "v"})
    with pytest.raises(StoreError) as failed:
        store.commit(batch)
    assert failed.value.code == "WAL_UNAVAILABLE" and "57P01" in str(failed.value)
    assert chain_rows(pg_cluster, pg_schema, "killed") == (4, 0, 4)
    store.fault_hook = None
    store.commit(batch)  # the same batch again, on a new session
    assert store.writer_backend_pid not in (None, victim)
    assert chain_rows(pg_cluster, pg_schema, "killed") == (8, 1, 8)
    assert list(store.records()) == records and store.open()["k"] == "v"


def test_a_stopped_server_is_a_typed_error_not_a_hang_and_the_store_recovers(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    store = open_store(pg_cluster, pg_schema, "stopped", stores)
    records = chain_records("stopped", 4)
    store.commit(Batch(records=records[:2]))
    pg_cluster.stop("fast")
    try:
        for call in (lambda: store.commit(Batch(records=records[2:])), store.head, store.checkpoints):
            with pytest.raises(pg.StoreUnavailable) as down:
                finishes(call)
            assert down.value.code == "WAL_UNAVAILABLE"
        with pytest.raises(pg.StoreUnavailable) as refused:
            finishes(lambda: PgStore(pg_cluster.url(), "other", schema=pg_schema).open())
        assert "cannot connect" in str(refused.value)
        with pytest.raises(pg.StoreUnavailable):
            finishes(lambda: PgReader(pg_cluster.url(), "stopped", schema=pg_schema))
    finally:
        pg_cluster.start()
    assert store.head() == records[1]
    store.commit(Batch(records=records[2:]))
    assert list(store.records()) == records


def resume(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it resumed already and has exited
            os.kill(pid, signal.SIGCONT)


def freeze_inside_commit(store: Any, frozen: list[int]) -> Callable[[], None]:
    def hook() -> None:  # after the batch's rows were sent: the backend stops before it reads COMMIT
        pid = store.writer_backend_pid
        frozen.append(pid)
        os.kill(pid, signal.SIGSTOP)

    return hook


def test_a_frozen_server_times_out_and_a_commit_whose_answer_was_lost_is_found_committed(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    store = open_store(pg_cluster, pg_schema, "frozen", stores, op_timeout=1.0)
    records = chain_records("frozen", 3)
    frozen: list[int] = []
    store.fault_hook = freeze_inside_commit(store, frozen)
    settled: list[int] = []

    def wake() -> None:  # the client gave up waiting (watchdog); now the server wakes and commits
        settled.append(frozen[0])
        resume(frozen)

    store.in_doubt_hook = wake
    try:
        finishes(lambda: store.commit(Batch(records=records)))  # no error: it did commit
    finally:
        resume(frozen)
    assert settled == frozen  # the answer was lost and the outcome was looked up
    assert chain_rows(pg_cluster, pg_schema, "frozen") == (3, 0, 3)
    assert store.writer_backend_pid not in (None, frozen[0])
    store.fault_hook = store.in_doubt_hook = None
    more = chain_records("frozen", 1, start=4, prev=records[-1].record_hash)
    store.commit(Batch(records=more))
    assert list(store.records()) == records + more


def test_a_commit_whose_outcome_cannot_be_known_fails_and_the_chain_is_never_forked(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    store = open_store(pg_cluster, pg_schema, "doubt", stores, op_timeout=1.0, lock_wait=0.3)
    records = chain_records("doubt", 3)
    frozen: list[int] = []
    store.fault_hook = freeze_inside_commit(store, frozen)
    try:
        with pytest.raises(pg.StoreUnavailable) as unknown:
            finishes(lambda: store.commit(Batch(records=records)))
        assert "outcome unknown" in str(unknown.value)
    finally:
        resume(frozen)  # the server resumes and commits what it had been sent
    assert backend_gone(pg_cluster, frozen[0])
    store.fault_hook = None
    assert chain_rows(pg_cluster, pg_schema, "doubt") == (3, 0, 3)
    # the engine rolled its head back and builds its next batch from seq 1 again: refused, not forked
    retry = chain_records("doubt", 1, t0=T0 + 50)
    with pytest.raises(pg.ChainDiverged):
        store.commit(Batch(records=retry))
    store.close()
    restarted = open_store(pg_cluster, pg_schema, "doubt", stores)  # a restart adopts the stored head
    assert restarted.head() == records[-1]
    assert verify_chain("doubt", restarted.records(), []).ok


def test_the_password_never_appears_in_errors_or_descriptions(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    sentinel = "S3ntinel-pw-d0-not-leak"
    wrong = PgStore(pg_cluster.url(password=sentinel), "c", schema=pg_schema, connect_timeout=3)
    with pytest.raises(pg.StoreUnavailable) as refused:
        wrong.open()
    assert "password authentication failed" in str(refused.value)
    store = open_store(pg_cluster, pg_schema, "c", stores)
    for text in (str(refused.value), wrong.description, store.description, repr(store)):
        assert sentinel not in text and pg_cluster.password not in text
    with pytest.raises(StoreError) as bad_db:
        PgStore(pg_cluster.url("no_such_db"), "c", schema=pg_schema).open()
    assert "no_such_db" in str(bad_db.value) and pg_cluster.password not in str(bad_db.value)
    with pytest.raises(StoreError):
        PgStore(pg_cluster.url(), "c", schema="Robert'); DROP TABLE x;--")


def test_maintenance_drops_old_request_args_of_its_own_chain_only(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    mine = open_store(pg_cluster, pg_schema, "mine", stores)
    theirs = open_store(pg_cluster, pg_schema, "theirs", stores)
    for store, chain in ((mine, "mine"), (theirs, "theirs")):
        recs = chain_records(chain, 10)
        store.commit(Batch(records=recs, request_args=[(r.seq, b"{}") for r in recs]))
    mine.retention_seconds = 100
    assert mine.maintenance(now=T0 + 105) is False  # records 1..4 are older than 100 s at T0 + 105
    assert [mine.request_args(s) is not None for s in range(1, 11)] == [False] * 4 + [True] * 6
    assert chain_rows(pg_cluster, pg_schema, "theirs") == (10, 10, 10)
    assert chain_rows(pg_cluster, pg_schema, "mine")[0] == 10  # DPRs are never deleted


def test_the_chain_id_file_is_created_once_and_kept(tmp: Path) -> None:
    ids = iter(["first", "second"])
    path = tmp / "chain_id"
    assert pg.load_or_create_chain_id(path, lambda: next(ids)) == "first"
    assert pg.load_or_create_chain_id(path, lambda: next(ids)) == "first"
    assert path.stat().st_mode & 0o777 == 0o600
    (tmp / "link").symlink_to(path)
    with pytest.raises(OSError):
        pg.load_or_create_chain_id(tmp / "link", lambda: "x")


def test_the_engine_does_not_import_psycopg_unless_postgres_is_selected() -> None:
    code = (
        "import sys\n"
        "import faramesh.engine.runner, faramesh.engine.server, faramesh.engine.wal.audit_ops\n"
        "import faramesh.launchers.audit\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'psycopg'], 'psycopg imported eagerly'\n"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_a_role_without_database_create_privilege_runs_in_a_schema_the_dba_made_for_it(
    pg_cluster: PgCluster, pg_schema: str, stores: list[Any]
) -> None:
    admin = pg_cluster.admin()
    role, password = f"eng_{pg_schema}", "role-pw-0123456789"
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        url = pg_cluster.url(user=role, password=password)
        with pytest.raises(StoreError) as denied:  # it may not create a schema in this database
            PgStore(url, "least", schema=pg_schema).open()
        assert "permission denied" in str(denied.value) and password not in str(denied.value)
        admin.execute(f"CREATE SCHEMA {pg_schema} AUTHORIZATION {role}")
        store = PgStore(url, "least", schema=pg_schema)
        stores.append(store)
        assert store.open()["schema_version"] == "1"
        store.commit(Batch(records=chain_records("least", 3)))
        store.close()
        with PgReader(url, schema=pg_schema) as reader:
            assert reader.bounds() == (3, 1, 3)
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {pg_schema} CASCADE")
        admin.execute(f"DROP ROLE {role}")
