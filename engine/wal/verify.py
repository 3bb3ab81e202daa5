"""`faramesh audit verify` and the engine's start-up check: walk the chain and report the first offender.

Checks, per record: gap-free `seq`; `prev_record_hash` equals the previous record's hash (genesis for
seq 1); `record_hash` = sha256(prev ‖ stored bytes); the stored bytes are canonical (re-encoding the
parsed body gives the same bytes); the indexed columns equal the body. Per checkpoint: its head hash
equals the record hash at its seq, and its signature verifies — against pinned keys when given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
from faramesh.engine.wal.dpr import canonical_bytes, genesis_hash
from faramesh.engine.wal.signer import checkpoint_message, fingerprint, verify_signature
from faramesh.engine.wal.store import Checkpoint, StoredRecord

_INDEXED = ("id", "time", "agent_id", "tool", "effect", "code", "approval_id")


@dataclass
class VerifyReport:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    checkpoints: int = 0
    signed_through: int = 0
    recovery_signed: list[tuple[int, int]] = field(default_factory=list)  # (from, to) signed late
    offender_seq: int | None = None
    offender_id: str | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "head_hash": self.head_hash,
            "checkpoints": self.checkpoints,
            "signed_through": self.signed_through,
            "unsigned_tail": (self.last_seq or 0) - self.signed_through if self.ok else None,
            "recovery_signed": [list(r) for r in self.recovery_signed],
            "offender": None
            if self.ok
            else {"seq": self.offender_seq, "id": self.offender_id, "problem": self.problem},
        }


def verify_chain(
    chain_id: str,
    records: Iterable[StoredRecord],
    checkpoints: list[Checkpoint],
    *,
    start_seq: int = 1,
    start_prev_hash: str | None = None,
    pinned_keys: dict[str, str] | None = None,
    require_signed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify records from `start_seq` (whose predecessor hash is `start_prev_hash`) to the end."""
    report = VerifyReport()
    prev = start_prev_hash if start_prev_hash is not None else genesis_hash(chain_id)
    expected_seq = start_seq
    by_seq = {c.seq: c for c in checkpoints}
    hashes_at: dict[int, str] = {}
    sha256 = hashlib.sha256
    loads = orjson.loads

    def fail(rec: StoredRecord | None, problem: str) -> VerifyReport:
        report.offender_seq = rec.seq if rec else None
        report.offender_id = rec.id if rec else None
        report.problem = problem
        return report

    for rec in records:
        if rec.seq != expected_seq:
            return fail(rec, f"sequence gap: expected seq {expected_seq}, found {rec.seq}")
        body = rec.body
        try:
            data = loads(body)
        except orjson.JSONDecodeError:
            return fail(rec, "stored bytes are not JSON")
        if data.get("prev_record_hash") != prev:
            return fail(rec, "prev_record_hash does not link to the previous record")
        if data.get("seq") != rec.seq or data.get("chain_id") != chain_id:
            return fail(rec, "seq or chain_id in the body differs from its position")
        digest = sha256(bytes.fromhex(prev) + body).hexdigest()
        if digest != rec.record_hash:
            return fail(rec, "record_hash does not match the stored bytes")
        if canonical_bytes(data) != body:
            return fail(rec, "stored bytes are not canonical (RFC 8785)")
        for col in _INDEXED:
            if data.get(col) != getattr(rec, col):
                return fail(rec, f"indexed column `{col}` differs from the record body")
        if data.get("action_type", "tool_call") != rec.action_type:
            return fail(rec, "indexed column `action_type` differs from the record body")
        if rec.seq in by_seq:
            hashes_at[rec.seq] = digest
        prev = digest
        expected_seq += 1
        report.records += 1
        if report.first_seq is None:
            report.first_seq = rec.seq
        report.last_seq = rec.seq
        if progress is not None and report.records % 50_000 == 0:
            progress(report.records)
    report.head_hash = prev
    previous_cp = start_seq - 1
    for cp in checkpoints:
        if cp.seq < start_seq:
            previous_cp = cp.seq
            continue
        if cp.seq > (report.last_seq or 0):
            return fail(None, f"checkpoint at seq {cp.seq} is beyond the last record")
        if hashes_at.get(cp.seq) != cp.head_hash:
            return fail(None, f"checkpoint at seq {cp.seq} does not match the chain head there")
        if fingerprint(_b64(cp.public_key)) != cp.key_fingerprint:
            return fail(None, f"checkpoint at seq {cp.seq}: public key does not match its fingerprint")
        if pinned_keys is not None and pinned_keys.get(cp.key_fingerprint) != cp.public_key:
            return fail(None, f"checkpoint at seq {cp.seq} is signed by an unpinned key {cp.key_fingerprint}")
        if not verify_signature(cp.public_key, checkpoint_message(chain_id, cp.seq, cp.head_hash), cp.signature):
            return fail(None, f"checkpoint at seq {cp.seq}: signature does not verify")
        if cp.kind == "recovery":
            report.recovery_signed.append((previous_cp + 1, cp.seq))
        report.checkpoints += 1
        report.signed_through = cp.seq
        previous_cp = cp.seq
    if require_signed and (report.last_seq or 0) > report.signed_through:
        return fail(None, f"records after seq {report.signed_through} are not covered by a signed checkpoint")
    return report


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)
