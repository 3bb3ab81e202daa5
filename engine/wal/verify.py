"""`faramesh audit verify` and the engine's start-up check: walk the chain and report the first offender.

Checks, per record: gap-free `seq`; `prev_record_hash` equals the previous record's hash (genesis for
seq 1); `record_hash` = sha256(prev ‖ stored bytes); the stored bytes are canonical (re-encoding the
parsed body gives the same bytes); the indexed columns equal the body. Per checkpoint, checked as the
walk reaches its seq (so the offender reported is the first one in chain order): its head hash equals
the record hash at its seq, and its signature verifies — against the pinned key with its fingerprint
when `pinned_keys` is given (a checkpoint signed by any other key is an offender), else against the
key the checkpoint names (self-consistency only). A checkpoint beyond the last record means records
were cut from the end of the chain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from faramesh.engine.wal.dpr import NonCanonicalArgs, canonical_bytes, genesis_hash
from faramesh.engine.wal.signer import checkpoint_message, fingerprint, verify_signature
from faramesh.engine.wal.store import Checkpoint, StoredRecord

_INDEXED = ("id", "time", "agent_id", "tool", "effect", "code", "approval_id")
PROGRESS_EVERY = 50_000
_INT_LIMIT = 2**53
_CONTAINERS = (dict, list)
_FAST = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER  # strict: an int beyond ±(2^53 - 1) raises


def _no_floats(node: Any) -> bool:
    """True when `node` holds no float (C-level type sets; this runs once per record in `audit verify`)."""
    values = node.values() if type(node) is dict else node
    types = set(map(type, values))
    if float in types:
        return False
    if dict in types or list in types:
        return all(_no_floats(v) for v in (node.values() if type(node) is dict else node) if type(v) in _CONTAINERS)
    return True


def is_canonical(data: Any, body: bytes) -> bool:
    """The stored bytes are exactly the RFC 8785 encoding of what they parse to."""
    # Sorted-key orjson output is JCS when there are no floats, no ints beyond ±2^53 (STRICT_INTEGER
    # refuses them) and only ASCII keys (an all-ASCII body has them); dpr.canonical_bytes relies on the
    # same domain, proved byte-identical to `rfc8785` by a differential test. Otherwise: the reference.
    if body.isascii() and _no_floats(data):
        try:
            return orjson.dumps(data, option=_FAST) == body
        except orjson.JSONEncodeError:
            pass
    try:
        return canonical_bytes(_as_numbers(data)) == body
    except NonCanonicalArgs:
        return False


def _as_numbers(node: Any) -> Any:
    """JCS numbers are IEEE doubles, and JCS prints a double below 1e21 as plain digits: an integer token
    beyond ±2^53 is re-encoded as the nearest double, so the bytes compare equal only when they are
    exactly JCS's spelling of that double."""
    t = type(node)
    if t is int and not -_INT_LIMIT < node < _INT_LIMIT:
        return float(node) if abs(node) < 10**21 else node
    if t is dict:
        return {k: _as_numbers(v) for k, v in node.items()}
    if t is list:
        return [_as_numbers(v) for v in node]
    return node


@dataclass
class VerifyReport:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    checkpoints: int = 0
    signed_through: int = 0
    recovery_signed: list[tuple[int, int]] = field(default_factory=list)  # (from, to) signed late
    keys_used: list[str] = field(default_factory=list)  # fingerprints of the keys that signed
    offender_seq: int | None = None
    offender_id: str | None = None
    offender_kind: str | None = None  # record | checkpoint
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def unsigned(self) -> tuple[int, int] | None:
        """The records after the last verified checkpoint, (from, to), or None when all are signed."""
        if self.last_seq is None or self.last_seq <= self.signed_through:
            return None
        return max(self.signed_through + 1, self.first_seq or 1), self.last_seq

    def to_dict(self) -> dict[str, object]:
        unsigned = self.unsigned if self.ok else None
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "head_hash": self.head_hash,
            "checkpoints": self.checkpoints,
            "signed_through": self.signed_through,
            "unsigned_tail": (unsigned[1] - unsigned[0] + 1) if unsigned else 0,
            "unsigned_range": list(unsigned) if unsigned else None,
            "recovery_signed": [list(r) for r in self.recovery_signed],
            "keys_used": list(self.keys_used),
            "offender": None
            if self.ok
            else {
                "seq": self.offender_seq,
                "id": self.offender_id,
                "kind": self.offender_kind,
                "problem": self.problem,
            },
        }


def verify_chain(
    chain_id: str,
    records: Iterable[StoredRecord],
    checkpoints: list[Checkpoint],
    *,
    start_seq: int = 1,
    start_prev_hash: str | None = None,
    end_seq: int | None = None,
    pinned_keys: Mapping[str, str] | None = None,
    require_signed: bool = False,
    progress: Callable[[int], None] | None = None,
    progress_every: int = PROGRESS_EVERY,
) -> VerifyReport:
    """Verify `records` (from `start_seq`, whose predecessor's hash is `start_prev_hash`) in order.

    `checkpoints` may hold the whole chain's: those before `start_seq` only mark where the signed
    range began, and those after `end_seq` (when given) are not checked. `pinned_keys` maps key
    fingerprint → base64 public key."""
    report = VerifyReport()
    prev = start_prev_hash if start_prev_hash is not None else genesis_hash(chain_id)
    expected_seq = start_seq
    ordered = sorted(checkpoints, key=lambda c: c.seq)
    previous_cp = 0
    pending: list[Checkpoint] = []
    for cp in ordered:
        if cp.seq < start_seq:
            previous_cp = cp.seq
        elif end_seq is None or cp.seq <= end_seq:
            pending.append(cp)
    pending.reverse()  # pop() from the end: the next checkpoint in chain order
    report.signed_through = previous_cp
    keys_used: dict[str, None] = {}
    sha256 = hashlib.sha256
    loads = orjson.loads

    def fail(seq: int | None, record_id: str | None, kind: str, problem: str) -> VerifyReport:
        report.offender_seq, report.offender_id, report.offender_kind, report.problem = seq, record_id, kind, problem
        report.keys_used = list(keys_used)
        return report

    def check_checkpoint(cp: Checkpoint, rec: StoredRecord, digest: str) -> str | None:
        nonlocal previous_cp
        if cp.head_hash != digest:
            return f"checkpoint at seq {cp.seq} does not match the chain head there"
        if pinned_keys is not None:
            key = pinned_keys.get(cp.key_fingerprint)
            if key is None:
                return f"checkpoint at seq {cp.seq} is signed by key {cp.key_fingerprint}, which is not pinned"
            if cp.public_key and cp.public_key != key:
                return f"checkpoint at seq {cp.seq} names a public key other than the pinned {cp.key_fingerprint}"
        else:
            key = cp.public_key
            try:
                raw = base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                return f"checkpoint at seq {cp.seq}: its public key is not base64"
            if fingerprint(raw) != cp.key_fingerprint:
                return f"checkpoint at seq {cp.seq}: its public key does not match its fingerprint"
        if not verify_signature(key, checkpoint_message(chain_id, cp.seq, cp.head_hash), cp.signature):
            return f"checkpoint at seq {cp.seq}: signature does not verify"
        if cp.kind == "recovery":
            report.recovery_signed.append((max(previous_cp + 1, start_seq), cp.seq))
        keys_used.setdefault(cp.key_fingerprint)
        report.checkpoints += 1
        report.signed_through = cp.seq
        previous_cp = cp.seq
        return None

    next_cp = pending[-1].seq if pending else None
    last: StoredRecord | None = None
    for rec in records:
        seq = rec.seq
        if seq != expected_seq:
            return fail(seq, rec.id, "record", f"sequence gap: expected seq {expected_seq}, found {seq}")
        body = rec.body
        try:
            data = loads(body)
        except orjson.JSONDecodeError:
            return fail(seq, rec.id, "record", "stored bytes are not JSON")
        if type(data) is not dict:
            return fail(seq, rec.id, "record", "stored bytes are not a JSON object")
        if data.get("prev_record_hash") != prev:
            return fail(seq, rec.id, "record", "prev_record_hash does not link to the previous record")
        if data.get("seq") != seq or data.get("chain_id") != chain_id:
            return fail(seq, rec.id, "record", "seq or chain_id in the body differs from its position")
        try:
            digest = sha256(bytes.fromhex(prev) + body).hexdigest()
        except ValueError:  # only a start_prev_hash taken from a damaged record_hash column
            return fail(seq, rec.id, "record", "the hash it links to is not a SHA-256 hex digest")
        if digest != rec.record_hash:
            return fail(seq, rec.id, "record", "record_hash does not match the stored bytes")
        if not is_canonical(data, body):
            return fail(seq, rec.id, "record", "stored bytes are not canonical (RFC 8785)")
        get = data.get
        if (get("id"), get("time"), get("agent_id"), get("tool"), get("effect"), get("code"), get("approval_id"),
                get("action_type", "tool_call")) != (rec.id, rec.time, rec.agent_id, rec.tool, rec.effect, rec.code,
                                                     rec.approval_id, rec.action_type):  # fmt: skip
            col = next((c for c in _INDEXED if get(c) != getattr(rec, c)), "action_type")
            return fail(seq, rec.id, "record", f"indexed column `{col}` differs from the record body")
        while next_cp is not None and next_cp <= seq:
            cp = pending.pop()
            next_cp = pending[-1].seq if pending else None
            if cp.seq < seq:  # only when checkpoints share a seq or name one outside the records
                return fail(cp.seq, None, "checkpoint", f"checkpoint at seq {cp.seq} has no record to cover")
            problem = check_checkpoint(cp, rec, digest)
            if problem is not None:
                return fail(cp.seq, rec.id, "checkpoint", problem)
        prev = digest
        expected_seq += 1
        report.records += 1
        if report.first_seq is None:
            report.first_seq = seq
        last = rec
        if progress is not None and report.records % progress_every == 0:
            progress(report.records)
    report.last_seq = last.seq if last is not None else None
    report.head_hash = prev
    report.keys_used = list(keys_used)
    if pending:
        cp = pending[-1]
        return fail(
            cp.seq,
            None,
            "checkpoint",
            f"checkpoint at seq {cp.seq} is beyond the last record (seq {report.last_seq or start_seq - 1}): "
            "records were removed from the end of the chain",
        )
    if require_signed and report.unsigned is not None:
        lo, hi = report.unsigned
        return fail(lo, None, "record", f"records {lo}–{hi} are not covered by a signed checkpoint")
    return report
