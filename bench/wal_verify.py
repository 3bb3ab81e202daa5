"""`audit verify` speed: build an N-record SQLite WAL fast, then time verify_chain over all of it.

Generation. Record *shapes* come from the engine itself: a few hundred decisions are run through
`EngineState.govern` (the production pipeline) on the bench stack's policy, and their DPR drafts
are the templates. Each of the N records is a template with a fresh id (ULID), time, epoch_ms and
call_id, chained exactly as `Wal._build` chains them (schema, chain_id, seq, prev_record_hash,
canonical bytes, record_hash = sha256(prev ‖ bytes)), with the redacted args row and a signed
checkpoint every 1,000 records (the engine's cadence), committed in 1,000-record transactions on a
writer thread while the next batch is built. The first batch is built twice — by `Wal._build` and
by the fast path — and must match byte for byte, so the fast path cannot drift from the engine's
format. A shutdown checkpoint signs the tail. The generator's connection runs with
`synchronous=OFF` (the file is only read back, never crash-tested), which halves generation time.

Verification. `verify_chain(chain_id, store.records(), store.checkpoints(), pinned_keys=…,
require_signed=True)`: every check `faramesh audit verify --require-signed` does — seq contiguity,
prev links, record_hash over the stored bytes, canonical bytes, indexed columns equal to the body,
every checkpoint's head hash, fingerprint and signature against the pinned key — streaming the
records from SQLite as the CLI does (page cache warm: the file was just written).

    .venv/bin/python bench/wal_verify.py [--records N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from faramesh.engine.pipeline import EngineState, Peer
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.policy.parser import parse_fpl
from faramesh.engine.wal.dpr import SCHEMA
from faramesh.engine.wal.log import Wal, _Pending, rfc3339
from faramesh.engine.wal.signer import ephemeral_signer
from faramesh.engine.wal.store import Batch, SqliteStore, StoredRecord
from faramesh.engine.wal.verify import verify_chain

BATCH = 1000
TEMPLATES = 512
RATE = 8000.0  # records per simulated second: the timeline of a busy engine


@dataclass(frozen=True)
class VerifyResult:
    records: int
    checkpoints: int
    gen_s: float
    verify_s: float
    read_only_s: float
    db_bytes: int
    ok: bool
    problem: str | None
    filesystem: str
    reader: str

    @property
    def per_s(self) -> float:
        return self.records / self.verify_s

    @property
    def read_per_s(self) -> float:
        return self.records / self.read_only_s


_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _B32 for b in _B32]


def _ulid(ms: int, rnd: int) -> str:
    """Crockford base32 of (48-bit ms ‖ 80 random bits), as python-ulid's str(ULID) spells it:
    26 chars × 5 bits = 130 bits, so the first char carries the top 3 bits, then 12 ten-bit pairs,
    then the lowest 5 bits."""
    v = (ms << 80) | rnd
    return (
        _B32[v >> 125]
        + "".join([_PAIRS[(v >> s) & 1023] for s in (115, 105, 95, 85, 75, 65, 55, 45, 35, 25, 15, 5)])
        + _B32[v & 31]
    )


def _ulid_ok() -> bool:
    from ulid import ULID

    rng = random.Random(1)
    for _ in range(100):
        ms, rnd = rng.getrandbits(48), rng.getrandbits(80)
        if _ulid(ms, rnd) != str(ULID.from_bytes(ms.to_bytes(6, "big") + rnd.to_bytes(10, "big"))):
            return False
    return True


def templates(policy: CompiledPolicy, socket_path: str, count: int = TEMPLATES) -> list[tuple[dict[str, Any], bytes]]:
    """DPR drafts from the production pipeline, on the bench traffic mix."""
    from wire_client import line_maker

    state = EngineState(policy, hmac_key=b"\x07" * 32, dev=False)
    peer = Peer("agent", "support-bot", 0, 4242, socket_path)
    make = line_maker(0, seed=11)
    now = time.time()
    out = []
    for _ in range(count):
        fields = orjson.loads(make())
        verdict = state.govern(
            fields,
            peer,
            now=now,
            new_id=lambda: "01" + "0" * 24,
            timestamp=rfc3339(now),
            started_ns=time.perf_counter_ns(),
            clock_ns=time.perf_counter_ns,
        )
        verdict.record["epoch_ms"] = int(now * 1000)
        out.append((verdict.record, verdict.args_bytes or b"{}"))
    return out


class _Timeline:
    """A simulated clock: RATE records per second ending now, with cheap RFC 3339 strings."""

    def __init__(self, records: int) -> None:
        self.t0 = time.time() - records / RATE
        self._sec = -1
        self._prefix = ""

    def at(self, i: int) -> tuple[float, int, str]:
        t = self.t0 + i / RATE
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._prefix = rfc3339(sec)[:-8]  # "YYYY-MM-DDTHH:MM:SS."
        us = int((t - sec) * 1_000_000)
        return t, int(t * 1000), f"{self._prefix}{us:06d}Z"


def _draft(
    tpl: list[tuple[dict[str, Any], bytes]], i: int, clock: _Timeline, rng: random.Random
) -> tuple[dict[str, Any], bytes]:
    record, args = tpl[i % len(tpl)]
    _t, ms, stamp = clock.at(i)
    rec = dict(record)
    rec["id"] = _ulid(ms, rng.getrandbits(80))
    rec["time"] = stamp
    rec["epoch_ms"] = ms
    rec["call_id"] = f"c{i}"
    return rec, args


def generate(path: Path, records: int, policy: CompiledPolicy) -> tuple[str, dict[str, str]]:
    """Write `records` chained DPRs to a fresh SQLite WAL at `path`; returns (chain_id, pinned keys)."""
    if not _ulid_ok():
        raise AssertionError("bench ULID encoder differs from python-ulid")
    store = SqliteStore(path, "normal")
    signer = ephemeral_signer()
    clock = _Timeline(records)
    now = [clock.t0]
    wal = Wal(store, signer, clock=lambda: now[0])
    wal.open()
    conn = getattr(store, "_conn", None)
    if conn is not None:  # a bench-only shortcut: the generated file is verified, never crash-tested
        conn.execute("PRAGMA synchronous=OFF")
    tpl = templates(policy, str(path.parent / "agents" / "0123456789abcdef" / "agent.sock"))
    rng = random.Random(5)
    dumps, sort_keys, sha256, fromhex = orjson.dumps, orjson.OPT_SORT_KEYS, hashlib.sha256, bytes.fromhex
    chain_id = wal.chain_id

    work: queue.Queue[Batch | None] = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def writer() -> None:
        while (batch := work.get()) is not None:
            if failure:
                continue
            try:
                store.commit(batch)
            except BaseException as exc:  # surfaced after join
                failure.append(exc)

    thread = threading.Thread(target=writer, name="bench-wal-writer", daemon=True)
    thread.start()
    try:
        # Batch 0 through the engine's own builder: the reference bytes.
        first = min(BATCH, records)
        drafts = [_draft(tpl, i, clock, rng) for i in range(first)]
        now[0] = clock.at(first - 1)[0]
        ref_batch, _ = wal._build([_Pending(r, a, [], None) for r, a in drafts])  # type: ignore[arg-type]
        # The same batch through the fast path below, from the same start: must be identical.
        head = wal._rollback[1]
        fast = []
        for seq, (draft, _args) in enumerate(drafts, start=1):
            rec = dict(draft)
            rec["schema"], rec["chain_id"], rec["seq"], rec["prev_record_hash"] = SCHEMA, chain_id, seq, head
            body = dumps(rec, option=sort_keys)
            head = sha256(fromhex(head) + body).hexdigest()
            fast.append((body, head))
        if fast != [(r.body, r.record_hash) for r in ref_batch.records]:
            raise AssertionError("the bench's fast record builder differs from Wal._build")
        work.put(ref_batch)
        if ref_batch.checkpoint is not None:
            wal.signed_seq = ref_batch.checkpoint.seq
        seq, head = wal.seq, wal.head_hash
        for start in range(first, records, BATCH):
            batch = Batch()
            recs, req = batch.records, batch.request_args
            for i in range(start, min(start + BATCH, records)):
                rec, args = _draft(tpl, i, clock, rng)
                seq += 1
                rec["schema"], rec["chain_id"], rec["seq"], rec["prev_record_hash"] = SCHEMA, chain_id, seq, head
                body = dumps(rec, option=sort_keys)
                head = sha256(fromhex(head) + body).hexdigest()
                recs.append(
                    StoredRecord(
                        seq, rec["id"], rec["time"], rec["agent_id"], rec.get("tool"), rec.get("effect"),
                        rec.get("code"), rec.get("approval_id"), rec["action_type"], body, head,
                    )
                )  # fmt: skip
                req.append((seq, args))
            wal.seq, wal.head_hash = seq, head
            now[0] = clock.at(min(start + BATCH, records) - 1)[0]
            batch.checkpoint = wal._checkpoint("periodic")  # every 1,000 records, as the engine does
            wal.signed_seq = seq
            work.put(batch)
    finally:
        work.put(None)
        thread.join()
    if failure:
        raise failure[0]
    wal.write_checkpoint_sync("shutdown")
    store.close()
    return chain_id, {signer.fingerprint: signer.public_b64}


def run(records: int, directory: Path, policy: CompiledPolicy) -> VerifyResult:
    from fsync import filesystem_of

    path = directory / "verify-bench.sqlite"
    t0 = time.perf_counter()
    chain_id, pinned = generate(path, records, policy)
    gen_s = time.perf_counter() - t0

    # Read as `faramesh audit verify` does: through the read-only SqliteReader when this build has
    # it (one snapshot, no write lock), else through the engine's SqliteStore.
    from faramesh.engine.wal import store as store_mod

    reader_cls = getattr(store_mod, "SqliteReader", None)
    if reader_cls is not None:
        source: Any = reader_cls(path)
        reader = "SqliteReader"
    else:
        source = SqliteStore(path, "normal")
        source.open()
        reader = "SqliteStore"
    try:
        checkpoints = source.checkpoints()
        t0 = time.perf_counter()
        report = verify_chain(chain_id, source.records(1), checkpoints, pinned_keys=pinned, require_signed=True)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        for _ in source.records(1):
            n += 1
        read_s = time.perf_counter() - t0
    finally:
        source.close()
    size = sum(p.stat().st_size for p in directory.glob("verify-bench.sqlite*"))
    ok = report.ok and report.records == records and n == records
    problem = report.problem or (None if ok else f"verified {report.records} of {records} records")
    return VerifyResult(
        records, report.checkpoints, gen_s, verify_s, read_s, size, ok, problem, filesystem_of(directory), reader
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the WAL (default: a temp dir)")
    opts = ap.parse_args(argv)
    from engine_bench import BENCH_FPL

    policy = compile_files(parse_fpl(BENCH_FPL, "governance.fms"), {"governance.fms": "bench"}, env={})
    base = Path(tempfile.mkdtemp(prefix="fm-verify-", dir=opts.dir))
    try:
        r = run(opts.records, base, policy)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{r.records:,} records ({r.db_bytes / 1e6:,.0f} MB, {r.checkpoints:,} checkpoints, {r.filesystem}):"
        f" generated in {r.gen_s:.1f} s; verify_chain {r.verify_s:.1f} s = {r.per_s:,.0f} records/s"
        f" (SQLite read alone via {r.reader} {r.read_per_s:,.0f}/s);"
        f" {'intact' if r.ok else 'FAILED: ' + str(r.problem)}"
    )
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
