"""`faramesh audit verify` and the engine's start-up check: walk the chain and report the first offender.

Checks, per record: gap-free `seq`; `prev_record_hash` equals the previous record's hash (genesis for
seq 1); `record_hash` = sha256(prev ‖ stored bytes); the stored bytes are canonical (re-encoding the
parsed body gives the same bytes); the indexed columns equal the body. Per checkpoint, checked as the
walk reaches its seq (so the offender reported is the first one in chain order): its head hash equals
the record hash at its seq, and its signature verifies — against the pinned key with its fingerprint
when `pinned_keys` is given (a checkpoint signed by any other key is an offender), else against the
key the checkpoint names (self-consistency only). Keys are Ed25519 (the local signer, Vault Transit) or
ECDSA P-256 (AWS KMS, Vault Transit). A checkpoint beyond the last record means records were cut from
the end of the chain.

Signer changes: a `provider_change` record (change `checkpoint_signer`) at seq N hands the chain from
one key to another. The checkpoint at N should be signed by the old key (the hand-over is then
countersigned); every checkpoint after N must be signed by the new key, so a key retired by the change
— typically a local key a host compromise could read — cannot sign history written after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from faramesh.engine.wal.dpr import NonCanonicalArgs, canonical_bytes, genesis_hash
from faramesh.engine.wal.signer import checkpoint_message, key_fingerprint, verify_checkpoint_signature
from faramesh.engine.wal.store import Checkpoint, RecordRow, StoredRecord

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


_PICK = operator.itemgetter(
    "prev_record_hash",
    "seq",
    "chain_id",
    "id",
    "time",
    "agent_id",
    "tool",
    "effect",
    "code",
    "approval_id",
    "action_type",
)
_AS_ROW = operator.attrgetter(
    "seq", "id", "time", "agent_id", "tool", "effect", "code", "approval_id", "action_type", "body", "record_hash"
)


def _rows_of(records: Iterable[StoredRecord]) -> Iterator[RecordRow]:
    """The records as tuples in `StoredRecord` field order: straight from a reader that offers them
    (`SqliteReader.records()`), else taken from each `StoredRecord`."""
    rows = getattr(records, "rows", None)
    if callable(rows):
        return cast("Iterator[RecordRow]", rows())
    return map(_AS_ROW, records)


def _record_problem(data: dict[str, Any], row: RecordRow, prev: str, chain_id: str) -> str | None:
    """The record checks one by one, in order: the first that fails, or None when all pass."""
    seq, rid, time, agent_id, tool, effect, code, approval_id, action_type, body, record_hash = row
    get = data.get
    if get("prev_record_hash") != prev:
        return "prev_record_hash does not link to the previous record"
    if get("seq") != seq or get("chain_id") != chain_id:
        return "seq or chain_id in the body differs from its position"
    try:
        digest = hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()
    except ValueError:  # only a start_prev_hash taken from a damaged record_hash column
        return "the hash it links to is not a SHA-256 hex digest"
    if digest != record_hash:
        return "record_hash does not match the stored bytes"
    if not is_canonical(data, body):
        return "stored bytes are not canonical (RFC 8785)"
    columns = (rid, time, agent_id, tool, effect, code, approval_id, action_type)
    if (*(get(c) for c in _INDEXED), get("action_type", "tool_call")) != columns:
        col = next((c for c, v in zip(_INDEXED, columns, strict=False) if get(c) != v), "action_type")
        return f"indexed column `{col}` differs from the record body"
    return None


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
    key_counts: dict[str, int] = field(default_factory=dict)  # fingerprint → checkpoints it signed
    signer_changes: list[dict[str, Any]] = field(default_factory=list)  # {seq, from, to, countersigned}
    dev_records: int = 0  # records tagged `dev` (written by `faramesh dev`, or a stub): odd in a served WAL
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
            "key_counts": dict(self.key_counts),
            "signer_changes": [dict(c) for c in self.signer_changes],
            "dev_records": self.dev_records,
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
    keys_used: dict[str, int] = {}
    # The key every checkpoint must be signed by, once a signer change names one: (seq of the change, key).
    expected: tuple[int, str] | None = None
    change_at: dict[int, dict[str, Any]] = {}

    def fail(seq: int | None, record_id: str | None, kind: str, problem: str) -> VerifyReport:
        report.records = expected_seq - start_seq  # the walk stops at the first offender: all before it passed
        report.first_seq = start_seq if report.records else None
        report.offender_seq, report.offender_id, report.offender_kind, report.problem = seq, record_id, kind, problem
        report.keys_used = list(keys_used)
        report.key_counts = dict(keys_used)
        return report

    def check_checkpoint(cp: Checkpoint, digest: str) -> str | None:
        nonlocal previous_cp
        if cp.head_hash != digest:
            return f"checkpoint at seq {cp.seq} does not match the chain head there"
        change = change_at.get(cp.seq)
        if expected is not None and change is None and cp.key_fingerprint != expected[1]:
            return (
                f"checkpoint at seq {cp.seq} is signed by key {cp.key_fingerprint}, but the chain's signer changed "
                f"to {expected[1]} at seq {expected[0]}"
            )
        if pinned_keys is not None:
            key = pinned_keys.get(cp.key_fingerprint)
            if key is None:
                return f"checkpoint at seq {cp.seq} is signed by key {cp.key_fingerprint}, which is not pinned"
            if cp.public_key and cp.public_key != key:
                return f"checkpoint at seq {cp.seq} names a public key other than the pinned {cp.key_fingerprint}"
        else:
            key = cp.public_key
            try:
                base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                return f"checkpoint at seq {cp.seq}: its public key is not base64"
            if key_fingerprint(key) != cp.key_fingerprint:
                return f"checkpoint at seq {cp.seq}: its public key does not match its fingerprint"
        message = checkpoint_message(chain_id, cp.seq, cp.head_hash)
        if not verify_checkpoint_signature(cp.key_fingerprint, key, message, cp.signature):
            return f"checkpoint at seq {cp.seq}: signature does not verify"
        if change is not None:  # the hand-over itself: the old key countersigns, or (old key gone) the new
            if cp.key_fingerprint not in (change["from"], change["to"]):
                return (
                    f"checkpoint at seq {cp.seq} (a signer change from {change['from']} to {change['to']}) is signed "
                    f"by key {cp.key_fingerprint}"
                )
            change["countersigned"] = cp.key_fingerprint == change["from"]
        if cp.kind == "recovery":
            report.recovery_signed.append((max(previous_cp + 1, start_seq), cp.seq))
        keys_used[cp.key_fingerprint] = keys_used.get(cp.key_fingerprint, 0) + 1
        report.checkpoints += 1
        report.signed_through = cp.seq
        previous_cp = cp.seq
        return None

    def note_change(seq: int, data: dict[str, Any]) -> None:
        nonlocal expected
        if data.get("change") != "checkpoint_signer":
            return
        old, new = data.get("from"), data.get("to")
        old_fp = old.get("fingerprint") if isinstance(old, dict) else None
        new_fp = new.get("fingerprint") if isinstance(new, dict) else None
        if not isinstance(new_fp, str):
            return
        entry = {"seq": seq, "from": old_fp, "to": new_fp, "countersigned": False}
        change_at[seq] = entry
        report.signer_changes.append(entry)
        expected = (seq, new_fp)

    # The walk. Per record, one pass: every field the checks read is picked from the body at once and
    # compared with what it must be as one tuple, beside the hash and the canonical-bytes check; only
    # when any of them fails (or a field is absent) does `_record_problem` redo the checks one by one,
    # in the documented order, to name the first that fails.
    rows = _rows_of(records)
    sha256 = hashlib.sha256
    loads = orjson.loads
    dumps = orjson.dumps
    decode_error = orjson.JSONDecodeError
    encode_error = orjson.JSONEncodeError
    pick = _PICK
    no_floats = _no_floats
    fast = _FAST
    try:
        prev_raw: bytes | None = bytes.fromhex(prev)
    except ValueError:  # only a start_prev_hash taken from a damaged record_hash column
        prev_raw = None
    next_cp = pending[-1].seq if pending else None
    every = progress_every if progress is not None and progress_every > 0 else 0
    next_progress = start_seq + every - 1 if every else None
    big = 2**63
    next_event = min(next_cp if next_cp is not None else big, next_progress if next_progress is not None else big)
    for row in rows:
        seq, rid, time, agent_id, tool, effect, code, approval_id, action_type, body, record_hash = row
        if seq != expected_seq:
            return fail(seq, rid, "record", f"sequence gap: expected seq {expected_seq}, found {seq}")
        try:
            data = loads(body)
        except decode_error:
            return fail(seq, rid, "record", "stored bytes are not JSON")
        if type(data) is not dict:
            return fail(seq, rid, "record", "stored bytes are not a JSON object")
        try:
            fields = pick(data)
        except KeyError:
            fields = None
        if prev_raw is None:  # a start_prev_hash that is not hex: the checks one by one name the problem
            problem = _record_problem(data, row, prev, chain_id)
            return fail(seq, rid, "record", problem or "the hash it links to is not a SHA-256 hex digest")
        h = sha256(prev_raw)
        h.update(body)
        digest = h.hexdigest()
        if body.isascii() and no_floats(data):
            try:
                canonical = dumps(data, option=fast) == body
            except encode_error:
                canonical = is_canonical(data, body)
        else:
            canonical = is_canonical(data, body)
        if (
            not canonical
            or digest != record_hash
            or fields != (prev, seq, chain_id, rid, time, agent_id, tool, effect, code, approval_id, action_type)
        ):
            problem = _record_problem(data, row, prev, chain_id)
            if problem is not None:
                return fail(seq, rid, "record", problem)
            digest = record_hash  # every check passed one by one: a field was absent (read as null)
        if action_type == "provider_change":
            note_change(seq, data)
        if data.get("dev") is True:
            report.dev_records += 1
        if seq >= next_event:
            while next_cp is not None and next_cp <= seq:
                cp = pending.pop()
                next_cp = pending[-1].seq if pending else None
                if cp.seq < seq:  # only when checkpoints share a seq or name one outside the records
                    return fail(cp.seq, None, "checkpoint", f"checkpoint at seq {cp.seq} has no record to cover")
                problem = check_checkpoint(cp, digest)
                if problem is not None:
                    return fail(cp.seq, rid, "checkpoint", problem)
            if next_progress is not None and seq >= next_progress:
                assert progress is not None
                progress(seq - start_seq + 1)
                next_progress += every
            next_event = min(next_cp if next_cp is not None else big, next_progress or big)
        prev = digest
        prev_raw = bytes.fromhex(digest)
        expected_seq += 1
    report.records = expected_seq - start_seq
    report.first_seq = start_seq if report.records else None
    report.last_seq = expected_seq - 1 if report.records else None
    report.head_hash = prev
    report.keys_used = list(keys_used)
    report.key_counts = dict(keys_used)
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
