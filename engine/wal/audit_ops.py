"""The logic behind `faramesh audit …` and `explain`: finding a stack's WAL, pinned keys, verification
of a WAL or of an exported bundle, export, backup and the chain position of one record.

Everything reads the WAL through a read-only reader holding one snapshot — `SqliteReader`, or
`PgReader` for `runtime { backend = "postgres" }` (engine/wal/pg_store.py, imported only then, so
psycopg is never loaded for a SQLite stack) — so it works beside a running engine and on a stopped
one. Nothing here prints; the CLI renders what these return.

Bundles (`audit export --as jsonl|json`) carry each DPR as the JSON object whose RFC 8785 bytes were
hashed, with its `record_hash`, and the checkpoints (seq, head hash, kind, key fingerprint, signature)
— public keys only with `--include-public-keys`. `audit verify-bundle` rebuilds each record's
canonical bytes and runs the same chain walk as `audit verify`, offline.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, Self

import orjson
from faramesh.engine.paths import StackPaths
from faramesh.engine.wal.dpr import NonCanonicalArgs, canonical_bytes, chain_hash
from faramesh.engine.wal.store import (
    Checkpoint,
    NotAWal,
    RecordRow,
    RecordStream,
    SqliteReader,
    StoredRecord,
    StoreError,
)
from faramesh.engine.wal.verify import _AS_ROW, VerifyReport, verify_chain

BUNDLE_FORMAT = "faramesh.audit-bundle/v1"
SEGMENT_PROOF_LIMIT = 100_000  # `show`/`explain` re-walk at most this many records up to the checkpoint
CSV_COLUMNS = (
    "seq", "id", "time", "action_type", "agent_id", "tool", "effect", "code", "policy_effect", "policy_code",
    "rule_ref", "mode", "policy_version", "args_digest", "approval_id", "approver", "cost_cents", "latency_us",
    "session_id", "call_id", "prev_record_hash", "record_hash",
)  # fmt: skip


class AuditError(Exception):
    """A condition the CLI reports as a failed check (exit 1), with a message for the operator."""


class WalReader(Protocol):
    """What the audit commands read a WAL through: `SqliteReader` or `PgReader`, one snapshot each."""

    @property
    def chain_id(self) -> str: ...
    @property
    def path(self) -> Path | str: ...  # where it is, for messages (never a secret)
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    def close(self) -> None: ...
    def bounds(self) -> tuple[int, int, int]: ...
    def records(self, from_seq: int = 1, to_seq: int | None = None) -> RecordStream: ...
    def record_at(self, seq: int) -> StoredRecord | None: ...
    def record_by_id(self, record_id: str) -> StoredRecord | None: ...
    def tail(
        self,
        n: int,
        *,
        agent_id: str | None = None,
        effect: str | None = None,
        tool_glob: str | None = None,
        action_type: str | None = None,
    ) -> list[StoredRecord]: ...
    def records_since(
        self,
        since_time: str,
        *,
        agent_id: str | None = None,
        before_seq: int | None = None,
        action_type: str | None = None,
    ) -> Iterator[StoredRecord]: ...
    def tool_calls_since(self, since_time: str) -> Iterator[tuple[StoredRecord, bytes | None]]: ...
    def request_args(self, seq: int) -> bytes | None: ...
    def checkpoints(self) -> list[Checkpoint]: ...
    def checkpoint_covering(self, seq: int) -> Checkpoint | None: ...


# ------------------------------------------------------------------------------------ where the WAL is


@dataclass(frozen=True)
class WalLocation:
    """A SQLite WAL file (`path`), a PostgreSQL WAL (`postgres_url`, resolved from the environment:
    a secret, kept out of repr), or neither and `problem` says why."""

    path: Path | None
    problem: str | None = None  # why there is no WAL to read (then path and postgres_url are None)
    note: str | None = None  # something worth saying even though a WAL was found
    postgres_url: str | None = field(default=None, repr=False)
    chain_id: str | None = None  # the engine's chain in that database (None: the database's only chain)

    @property
    def found(self) -> bool:
        return self.path is not None or self.postgres_url is not None


def installed_runtime(stack: Path, paths: StackPaths) -> dict[str, Any] | None:
    """The `runtime` block of the policy the engine serves (`<state dir>/policy.json`, else the stack's
    applied `.faramesh/policy.json`), read as plain JSON; None when neither is readable."""
    for candidate in (paths.policy_copy, stack / ".faramesh" / "policy.json"):
        try:
            data = json.loads(candidate.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("runtime", {}), dict):
            return dict(data.get("runtime", {}))
    return None


def locate_wal(
    stack: Path | None,
    paths: StackPaths | None,
    explicit: Path | None = None,
    runtime: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> WalLocation:
    """The WAL `faramesh serve` writes for `stack` (SQLite file or PostgreSQL database), or why there
    is none.

    `runtime` overrides the installed policy's runtime block (plan passes the new policy's when
    nothing is installed). `environ` resolves `postgres_url = env("…")` (default: this process's
    environment). A `faramesh dev` engine keeps its WAL in memory: that is said plainly."""
    if explicit is not None:
        if not explicit.is_file():
            return WalLocation(None, f"no WAL file at {explicit}")
        return WalLocation(explicit)
    assert stack is not None and paths is not None
    if runtime is None:
        runtime = installed_runtime(stack, paths) or {}
    backend = str(runtime.get("backend", "sqlite"))
    dev_running = paths.dev_socket.exists()
    dev_note = (
        "a `faramesh dev` engine is running for this stack; its records are in memory and are not in this WAL"
        if dev_running
        else None
    )
    if backend == "memory":
        return WalLocation(
            None,
            f'{stack}: runtime backend = "memory" keeps the WAL in the engine\'s memory; there is nothing on disk to '
            "audit (use the default sqlite backend)",
        )
    if backend == "postgres":
        return _locate_postgres(stack, paths, runtime, os.environ if environ is None else environ, dev_note)
    wal_dir = runtime.get("wal_dir")
    path = paths.wal_path(str(wal_dir) if wal_dir else None)
    if path.is_file():
        return WalLocation(path, note=dev_note)
    if dev_running:
        return WalLocation(
            None,
            f"the engine for {stack} runs as `faramesh dev`, whose WAL is in memory and lost on exit: there is no "
            "WAL on disk to audit. Run `faramesh serve` (or `apply`) for a persistent, verifiable WAL",
        )
    return WalLocation(
        None,
        f"no WAL for {stack} at {path}: the stack has not been run by `faramesh serve` yet "
        "(`faramesh dev` keeps its WAL in memory)",
    )


def _locate_postgres(
    stack: Path, paths: StackPaths, runtime: Mapping[str, Any], environ: Mapping[str, str], note: str | None
) -> WalLocation:
    from faramesh.engine.alerts import MissingEnvironment, resolve_env_refs

    reference = runtime.get("postgres_url")
    if reference is None:
        return WalLocation(None, f'{stack}: runtime backend = "postgres" names no postgres_url')
    try:
        url = resolve_env_refs(reference, environ, "runtime.postgres_url")
    except MissingEnvironment:
        name = reference.get("$env") if isinstance(reference, Mapping) else None
        return WalLocation(
            None,
            f'{stack}: the WAL is in PostgreSQL (runtime.postgres_url = env("{name}")), but {name} is not set '
            "here: export it with the value the engine has to audit this stack",
        )
    if not isinstance(url, str) or not url.strip():
        return WalLocation(None, f"{stack}: runtime.postgres_url is empty")
    chain_id, problem = read_chain_id(paths.state_dir / "chain_id")
    if problem is not None:
        note = "; ".join(n for n in (note, f"{problem}: reading the database's only chain") if n)
    return WalLocation(None, note=note, postgres_url=url, chain_id=chain_id)


def read_chain_id(path: Path) -> tuple[str | None, str | None]:
    """(the engine's PostgreSQL chain id, problem) from `<state dir>/chain_id`, never creating it:
    (None, None) when there is none (the engine never ran here, or the audit runs on another host)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read the engine's chain id {path} ({exc.strerror})"
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    chain_id = raw.decode("utf-8", "replace").strip()
    return (chain_id, None) if chain_id else (None, f"{path} is empty")


def open_reader(where: Path | WalLocation, chain_id: str | None = None) -> WalReader:
    """A reader of a SQLite WAL file, or of the PostgreSQL WAL a location names. `chain_id` picks the
    chain to read in a PostgreSQL database (default: the location's own, else the only one)."""
    location = WalLocation(where) if isinstance(where, Path) else where
    if location.postgres_url is not None:
        return _open_postgres(location.postgres_url, chain_id or location.chain_id)
    if location.path is None:
        raise AuditError(location.problem or "no WAL to read")
    try:
        return SqliteReader(location.path)
    except NotAWal as exc:
        raise AuditError(str(exc)) from None
    except Exception as exc:  # SchemaTooNew and friends carry a message for the operator
        raise AuditError(str(exc)) from None


def _open_postgres(url: str, chain_id: str | None) -> WalReader:
    try:
        from faramesh.engine.wal.pg_store import PgReader
    except ImportError as exc:
        raise AuditError(
            f'this WAL is in PostgreSQL, which needs psycopg ({exc.name or exc}): pip install "faramesh[providers]"'
        ) from None
    try:
        return PgReader(url, chain_id)
    except StoreError as exc:  # its messages name host, database and chain, never the password
        raise AuditError(str(exc)) from None


# -------------------------------------------------------------------------------------------- keys


@dataclass
class PinnedKeys:
    """Public keys trusted to sign checkpoints: fingerprint → base64 key in its stored form (Ed25519 raw,
    P-256 SubjectPublicKeyInfo DER), and where each came from."""

    keys: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    key_ids: dict[str, str] = field(default_factory=dict)  # fingerprint → key id, where known (KMS pins)

    def add(self, public_b64: str, source: str, key_id: str | None = None) -> str:
        from faramesh.engine.wal.signer import key_fingerprint, normalise_public_b64

        stored = normalise_public_b64(public_b64)
        fp = key_fingerprint(stored) if stored is not None else None
        if stored is None or fp is None:
            raise AuditError(f"{source}: not an Ed25519 or NIST P-256 public key")
        self.keys[fp] = stored
        self.sources.setdefault(fp, source)
        if key_id is not None:
            self.key_ids.setdefault(fp, key_id)
        return fp

    def to_list(self) -> list[dict[str, str]]:
        out = []
        for fp, k in self.keys.items():
            entry = {"fingerprint": fp, "public_key": k, "source": self.sources[fp]}
            if fp in self.key_ids:
                entry["key_id"] = self.key_ids[fp]
            out.append(entry)
        return out


def stack_public_key(paths: StackPaths) -> tuple[str | None, str | None]:
    """The public half of the engine's signing key (`<state dir>/signing.key`): (base64, problem)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = paths.signing_key
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read the stack's signing key {path} ({exc.strerror})"
    try:
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(raw) != 32:
        return None, f"the stack's signing key {path} is corrupt ({len(raw)} bytes)"
    public = Ed25519PrivateKey.from_private_bytes(raw).public_key()
    pub_raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(pub_raw).decode(), None


_KEY_LINE = re.compile(r"^(?:ed25519:)?([A-Za-z0-9+/]{42,44}={0,2})$")
_P256_LINE = re.compile(r"^ecdsa-p256:([A-Za-z0-9+/]+={0,2})$")


def parse_key_file(path: Path) -> list[str]:
    """Public keys in a `--key` file, in their stored form: one per line as `ed25519:BASE64` or bare
    base64 of the 32 raw bytes, or `ecdsa-p256:BASE64` of a P-256 SubjectPublicKeyInfo (blank lines and
    `#` comments ignored), or PEM `PUBLIC KEY` blocks (Ed25519 or P-256: what `aws kms get-public-key`
    and Vault Transit give)."""
    from faramesh.engine.providers.signing import UnsupportedKey, checkpoint_public_b64, spki_from_pem
    from faramesh.engine.providers.signing import algorithm_of as algorithm_of_der

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read key file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    keys: list[str] = []
    for block in re.findall(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text, re.S):
        try:
            der = spki_from_pem(block)
            keys.append(checkpoint_public_b64(algorithm_of_der(der), der))
        except UnsupportedKey as exc:
            raise AuditError(f"{path}: a PEM key this build cannot verify with ({exc})") from None
    text = re.sub(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", "", text, flags=re.S)
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        p256 = _P256_LINE.match(line)
        if p256:
            try:
                der = base64.b64decode(p256.group(1), validate=True)
                if algorithm_of_der(der) != "ecdsa-p256-sha256":
                    raise UnsupportedKey("not a P-256 key")
            except (binascii.Error, ValueError):
                raise AuditError(
                    f"{path}:{n}: not a P-256 public key (expected ecdsa-p256:BASE64 of its DER)"
                ) from None
            keys.append(base64.b64encode(der).decode())
            continue
        m = _KEY_LINE.match(line)
        try:
            raw = base64.b64decode(m.group(1), validate=True) if m else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise AuditError(
                f"{path}:{n}: not a public key (expected ed25519:BASE64 of 32 bytes, ecdsa-p256:BASE64 or PEM)"
            )
        keys.append(base64.b64encode(raw).decode())
    if not keys:
        raise AuditError(f"{path}: no public key in it")
    return keys


def pinned_keys(paths: StackPaths | None, key_files: Iterable[Path]) -> PinnedKeys:
    """This stack's own signing key (public half), the KMS keys its engine pinned (`<state dir>/
    checkpoint-keys.json`, written when the engine first fetched each), plus every `--key FILE`."""
    from faramesh.engine.wal.signer import PINS_FILE, read_pins

    pins = PinnedKeys()
    if paths is not None:
        public, problem = stack_public_key(paths)
        if public is not None:
            pins.add(public, f"this stack's signing key, {paths.signing_key}")
        if problem:
            pins.warnings.append(problem)
        pins_file = paths.state_dir / PINS_FILE
        for pin in read_pins(pins_file):
            pins.add(pin.public_key, f"pinned by the engine from {pin.provider or 'a KMS'} ({pins_file})", pin.key_id)
    for path in key_files:
        for public in parse_key_file(path):
            pins.add(public, str(path))
    return pins


def wal_signer_pins(reader: WalReader) -> list[dict[str, Any]]:
    """The pin the WAL itself names (its meta `signing_key`): shown to the operator, never trusted as an
    origin pin (whoever rewrites the WAL can rewrite it)."""
    from faramesh.engine.wal.signer import SignerPin

    meta = getattr(reader, "meta", None)
    pin = SignerPin.from_json(meta.get("signing_key")) if isinstance(meta, dict) else None
    return [pin.public()] if pin is not None else []


# ---------------------------------------------------------------------------------------- verify


@dataclass
class WalVerification:
    report: VerifyReport
    chain_id: str
    path: str
    total_records: int
    range: tuple[int, int] | None  # what was asked for (--from/--to), None for the whole chain
    pinned: bool
    anchor: str | None = None  # for --from > 1: the stored hash of seq from-1 the walk started from

    wal_signer: list[dict[str, Any]] = field(default_factory=list)  # what the WAL meta says signs it

    def to_dict(self, pins: PinnedKeys) -> dict[str, Any]:
        return {
            **self.report.to_dict(),
            "wal_signer": self.wal_signer,
            "wal": self.path,
            "chain_id": self.chain_id,
            "total_records": self.total_records,
            "range": list(self.range) if self.range else None,
            "anchor_hash": self.anchor,
            "keys_pinned": self.pinned,
            "pinned_keys": pins.to_list(),
        }


def verify_wal(
    reader: WalReader,
    pins: PinnedKeys,
    *,
    from_seq: int | None = None,
    to_seq: int | None = None,
    require_signed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> WalVerification:
    """`audit verify`: the whole chain, or seq from..to linked to the stored hash of seq from-1."""
    count, _, last = reader.bounds()
    start = from_seq or 1
    anchor: str | None = None
    report: VerifyReport
    if start > 1:
        before = reader.record_at(start - 1)
        if before is None:
            report = VerifyReport(
                offender_seq=start - 1,
                offender_kind="record",
                problem=f"--from {start}: there is no record at seq {start - 1} to link from",
            )
            return WalVerification(
                report, reader.chain_id, str(reader.path), count, (start, to_seq or last), bool(pins.keys)
            )
        anchor = before.record_hash
    walk = _Readable(reader.records(start, to_seq))
    report = verify_chain(
        reader.chain_id,
        walk,
        reader.checkpoints(),
        start_seq=start,
        start_prev_hash=anchor,
        end_seq=to_seq,
        pinned_keys=pins.keys if pins.keys else None,
        require_signed=require_signed,
        progress=progress,
    )
    if walk.error is not None:  # the walk stopped there: what verify_chain said after it is a consequence
        after = report.last_seq if report.last_seq is not None else start - 1
        report.offender_seq, report.offender_id, report.offender_kind = after + 1, None, "record"
        report.problem = f"the WAL cannot be read after seq {after}: {walk.error}"
    ranged = (start, min(to_seq, last) if to_seq else last) if (from_seq or to_seq) else None
    return WalVerification(
        report, reader.chain_id, str(reader.path), count, ranged, bool(pins.keys), anchor, wal_signer_pins(reader)
    )


class _Readable:
    """Records until the store itself fails (a damaged SQLite page, a lost PostgreSQL connection): the
    error is kept, the walk ends."""

    def __init__(self, records: Iterator[StoredRecord]) -> None:
        self.records = records
        self.error: str | None = None

    def __iter__(self) -> Iterator[StoredRecord]:
        try:
            yield from self.records
        except (sqlite3.DatabaseError, StoreError) as exc:
            self.error = str(exc)

    def rows(self) -> Iterator[RecordRow]:
        """The same walk as plain rows (`StoredRecord` field order), when the reader offers them."""
        rows = getattr(self.records, "rows", None)
        try:
            yield from (rows() if callable(rows) else map(_AS_ROW, self.records))
        except (sqlite3.DatabaseError, StoreError) as exc:
            self.error = str(exc)


# --------------------------------------------------------------------------------- one record's place


def record_dict(rec: StoredRecord) -> dict[str, Any]:
    """The full DPR: the stored body with its record_hash (what an export line holds)."""
    try:
        data = orjson.loads(rec.body)
    except orjson.JSONDecodeError:
        return {"_unparseable_body": rec.body.decode("utf-8", "replace"), "record_hash": rec.record_hash}
    if not isinstance(data, dict):
        return {"_unparseable_body": data, "record_hash": rec.record_hash}
    data["record_hash"] = rec.record_hash
    return data


def request_args(reader: WalReader, seq: int) -> dict[str, Any] | None:
    raw = reader.request_args(seq)
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def chain_position(reader: WalReader, rec: StoredRecord, pins: PinnedKeys) -> dict[str, Any]:
    """Where a record sits and what vouches for it: its own hash over its stored bytes, and — when a
    checkpoint at or after it exists within SEGMENT_PROOF_LIMIT records — the walk from it to that
    checkpoint and the checkpoint's signature (pinned keys when there are any). Records before it are
    not re-verified here (that is `audit verify`)."""
    data = record_dict(rec)
    prev = data.get("prev_record_hash")
    hash_ok = isinstance(prev, str) and _hash_matches(prev, rec)
    _, _, last = reader.bounds()
    cp = reader.checkpoint_covering(rec.seq)
    out: dict[str, Any] = {
        "seq": rec.seq,
        "chain_id": reader.chain_id,
        "head_seq": last,
        "prev_record_hash": prev,
        "record_hash": rec.record_hash,
        "record_hash_matches_bytes": hash_ok,
        "checkpoint": None,
        "proof": None,
    }
    if cp is None:
        previous = reader.checkpoints()
        out["unsigned_after"] = previous[-1].seq if previous else 0
        return out
    out["checkpoint"] = {
        "seq": cp.seq,
        "kind": cp.kind,
        "time": cp.time,
        "key_fingerprint": cp.key_fingerprint,
        "key_pinned": cp.key_fingerprint in pins.keys,
    }
    if not hash_ok or not isinstance(prev, str):
        out["proof"] = {"ok": False, "problem": "the record's hash does not match its stored bytes"}
    elif cp.seq - rec.seq > SEGMENT_PROOF_LIMIT:
        out["proof"] = {
            "ok": None,
            "problem": f"more than {SEGMENT_PROOF_LIMIT} records to the checkpoint; run `audit verify`",
        }
    else:
        report = verify_chain(
            reader.chain_id,
            reader.records(rec.seq, cp.seq),
            [cp],
            start_seq=rec.seq,
            start_prev_hash=prev,
            end_seq=cp.seq,
            pinned_keys=pins.keys if pins.keys else None,
        )
        out["proof"] = {
            "ok": report.ok,
            "problem": report.problem,
            "records_walked": report.records,
            "pinned": bool(pins.keys),
        }
    return out


def _hash_matches(prev: str, rec: StoredRecord) -> bool:
    try:
        return chain_hash(prev, rec.body) == rec.record_hash
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ export


@dataclass
class ExportSummary:
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    public_keys: int = 0


def _checkpoint_out(cp: Checkpoint) -> dict[str, Any]:
    return {
        "seq": cp.seq,
        "head_hash": cp.head_hash,
        "time": cp.time,
        "kind": cp.kind,
        "key_fingerprint": cp.key_fingerprint,
        "signature": cp.signature,
    }


def _bundle_keys(checkpoints: list[Checkpoint], pins: PinnedKeys) -> list[dict[str, str]]:
    keys: dict[str, str] = {}
    for cp in checkpoints:
        keys.setdefault(cp.key_fingerprint, cp.public_key)
    for fp, key in pins.keys.items():
        keys.setdefault(fp, key)
    return [{"fingerprint": fp, "public_key": k} for fp, k in keys.items()]


def export(
    reader: WalReader, as_: str, out: IO[bytes], *, include_public_keys: bool, pins: PinnedKeys, now: float
) -> ExportSummary:
    """Write the whole chain as a jsonl or json bundle, or csv (a flat table: not verifiable)."""
    from faramesh.engine.wal.log import rfc3339

    count, first, last = reader.bounds()
    checkpoints = reader.checkpoints()
    summary = ExportSummary(checkpoints=len(checkpoints))
    head = reader.record_at(last) if count else None
    header: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "chain_id": reader.chain_id,
        "exported_at": rfc3339(now),
        "record_count": count,
        "first_seq": first if count else None,
        "last_seq": last if count else None,
        "head_hash": head.record_hash if head else None,
        "checkpoint_count": len(checkpoints),
    }
    if include_public_keys:
        header["public_keys"] = _bundle_keys(checkpoints, pins)
        summary.public_keys = len(header["public_keys"])
    dumps = orjson.dumps
    sort = orjson.OPT_SORT_KEYS
    if as_ == "csv":
        text = io.TextIOWrapper(out, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        for rec in reader.records():
            dpr = record_dict(rec)
            writer.writerow([_csv_cell(dpr.get(c)) for c in CSV_COLUMNS])
            _count(summary, rec)
        text.flush()
        text.detach()
        return summary
    if as_ == "jsonl":
        out.write(dumps(header, option=sort) + b"\n")
        cps = iter(checkpoints)
        cp = next(cps, None)
        for rec in reader.records():
            out.write(dumps(record_dict(rec), option=sort) + b"\n")
            _count(summary, rec)
            while cp is not None and cp.seq <= rec.seq:
                out.write(dumps({"checkpoint": _checkpoint_out(cp)}, option=sort) + b"\n")
                cp = next(cps, None)
        while cp is not None:  # a checkpoint beyond the last record is evidence too: keep it
            out.write(dumps({"checkpoint": _checkpoint_out(cp)}, option=sort) + b"\n")
            cp = next(cps, None)
        return summary
    # json: one object, streamed — the header fields, the checkpoints, then one record per line
    head_json = dumps({**header, "checkpoints": [_checkpoint_out(c) for c in checkpoints]}, option=sort)
    out.write(head_json[:-1] + b',"records":[\n')
    for i, rec in enumerate(reader.records()):
        out.write((b",\n" if i else b"") + dumps(record_dict(rec), option=sort))
        _count(summary, rec)
    out.write(b"\n]}\n")
    return summary


def _count(summary: ExportSummary, rec: StoredRecord) -> None:
    summary.records += 1
    if summary.first_seq is None:
        summary.first_seq = rec.seq
    summary.last_seq = rec.seq
    summary.head_hash = rec.record_hash


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    text = str(value)
    # Spreadsheet formula injection: a cell an agent controls must not start a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# --------------------------------------------------------------------------------- verify a bundle


@dataclass
class BundleVerification:
    report: VerifyReport
    header: dict[str, Any]
    keys_from: list[str]  # where the keys checked against came from

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.report.to_dict(),
            "chain_id": self.header.get("chain_id"),
            "exported_at": self.header.get("exported_at"),
            "keys_from": self.keys_from,
        }


class _BundleRecords:
    """Bundle DPRs → StoredRecords (canonical bytes rebuilt from the object), checking the header's
    claims as it goes; a malformed line stops the walk with a problem the report names."""

    def __init__(self, items: Iterable[tuple[str, Any]]) -> None:
        self.items = items
        self.problem: tuple[int | None, str | None, str] | None = None
        self.checkpoints: list[Checkpoint] = []

    def __iter__(self) -> Iterator[StoredRecord]:
        for where, item in self.items:
            if isinstance(item, _Damaged):
                self.problem = (None, None, f"{where}: {item.problem}")
                return
            if not isinstance(item, dict):
                self.problem = (None, None, f"{where}: not a JSON object")
                return
            seq, rid, rhash = item.get("seq"), item.get("id"), item.get("record_hash")
            if type(seq) is not int or not isinstance(rid, str) or not isinstance(rhash, str):
                self.problem = (seq if type(seq) is int else None, rid if isinstance(rid, str) else None,
                                f"{where}: a record without an integer seq, an id and a record_hash")  # fmt: skip
                return
            body_fields = {k: v for k, v in item.items() if k != "record_hash"}
            try:
                body = canonical_bytes(body_fields)
            except NonCanonicalArgs:
                self.problem = (seq, rid, f"{where}: the record cannot be canonicalised")
                return
            yield StoredRecord(
                seq=seq,
                id=rid,
                time=item.get("time"),  # type: ignore[arg-type]
                agent_id=item.get("agent_id"),
                tool=item.get("tool"),
                effect=item.get("effect"),
                code=item.get("code"),
                approval_id=item.get("approval_id"),
                action_type=item.get("action_type", "tool_call"),
                body=body,
                record_hash=rhash,
            )


def _checkpoint_in(data: Any, where: str) -> Checkpoint:
    if not isinstance(data, dict):
        raise AuditError(f"{where}: a checkpoint that is not an object")
    try:
        return Checkpoint(
            seq=int(data["seq"]),
            head_hash=str(data["head_hash"]),
            time=str(data.get("time", "")),
            kind=str(data.get("kind", "")),
            key_fingerprint=str(data["key_fingerprint"]),
            public_key="",
            signature=str(data["signature"]),
        )
    except (KeyError, TypeError, ValueError):
        raise AuditError(f"{where}: a checkpoint without seq, head_hash, key_fingerprint and signature") from None


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read {path} ({exc.strerror})") from None


def _jsonl_checkpoints(path: Path) -> list[Checkpoint]:
    """First pass over a jsonl bundle: its checkpoint lines (the records are streamed in a second)."""
    out = []
    with _open(path) as fh:
        for n, line in enumerate(fh, 1):
            if n > 1 and b'"checkpoint"' in line:
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # the second pass names the damaged line
                if isinstance(obj, dict) and set(obj) == {"checkpoint"}:
                    out.append(_checkpoint_in(obj["checkpoint"], f"{path}:{n}"))
    return out


def _jsonl_records(path: Path, checkpoints: int) -> Iterator[tuple[str, Any]]:
    seen = 0
    with _open(path) as fh:
        fh.readline()
        for n, line in enumerate(fh, 2):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield f"{path}:{n}", _Damaged("not JSON (a bundle line was damaged)")
                return
            if isinstance(obj, dict) and set(obj) == {"checkpoint"}:
                seen += 1
                continue
            yield f"{path}:{n}", obj
    if seen != checkpoints:
        yield f"{path}", _Damaged("a checkpoint line is malformed")


@dataclass(frozen=True)
class _Damaged:
    problem: str


def _load_bundle(path: Path) -> tuple[dict[str, Any], Iterable[tuple[str, Any]], list[Checkpoint]]:
    """(header, records as (where, object), checkpoints) of a jsonl or json bundle."""
    with _open(path) as fh:
        first = fh.readline()
    try:
        head = orjson.loads(first)
    except orjson.JSONDecodeError:
        head = None
    if isinstance(head, dict) and head.get("format") == BUNDLE_FORMAT and "records" not in head:
        checkpoints = _jsonl_checkpoints(path)
        return head, _jsonl_records(path, len(checkpoints)), checkpoints
    if first.startswith((b"seq,", b"\xef\xbb\xbfseq,")):
        raise AuditError(f"{path} is a csv export, which cannot be verified; export --as jsonl or json")
    with _open(path) as fh:
        raw = fh.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AuditError(f"{path} is not an audit bundle (neither JSON nor JSON lines)") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT or not isinstance(data.get("records"), list):
        raise AuditError(f"{path} is not an audit bundle (format {BUNDLE_FORMAT!r} with records)")
    cps = data.get("checkpoints", [])
    if not isinstance(cps, list):
        raise AuditError(f"{path}: checkpoints is not a list")
    checkpoints = [_checkpoint_in(c, f"{path}: checkpoint #{i + 1}") for i, c in enumerate(cps)]
    header = {k: v for k, v in data.items() if k not in ("records", "checkpoints")}
    records = [(f"{path}: record #{i + 1}", r) for i, r in enumerate(data["records"])]
    return header, records, checkpoints


def verify_bundle(
    path: Path, pins: PinnedKeys, *, trust_bundle_keys: bool, require_signed: bool = False
) -> BundleVerification:
    header, items, checkpoints = _load_bundle(path)
    chain_id = header.get("chain_id")
    if not isinstance(chain_id, str) or not chain_id:
        raise AuditError(f"{path}: the bundle header has no chain_id")
    keys = dict(pins.keys)
    keys_from = sorted(set(pins.sources.values()))
    if trust_bundle_keys:
        bundle_keys = header.get("public_keys")
        if not isinstance(bundle_keys, list) or not bundle_keys:
            raise AuditError(f"{path} carries no public keys (export it with --include-public-keys, or pin --key)")
        from faramesh.engine.wal.signer import key_fingerprint, normalise_public_b64

        for entry in bundle_keys:
            key = entry.get("public_key") if isinstance(entry, dict) else None
            stored = normalise_public_b64(str(key))
            fp = key_fingerprint(stored) if stored is not None else None
            if stored is None or fp is None:
                raise AuditError(f"{path}: a public key in the bundle is not an Ed25519 or P-256 key")
            keys.setdefault(fp, stored)
        keys_from.append("the bundle itself (--trust-bundle-keys)")
    walker = _BundleRecords(items)
    report = verify_chain(chain_id, walker, checkpoints, pinned_keys=keys, require_signed=require_signed)
    if walker.problem is not None:  # the walk stopped there: anything reported after it is a consequence
        seq, rid, problem = walker.problem
        report.offender_seq, report.offender_id, report.offender_kind, report.problem = seq, rid, "record", problem
    if report.ok:
        claimed = (header.get("record_count"), header.get("last_seq"), header.get("head_hash"))
        actual = (report.records, report.last_seq, report.head_hash if report.records else None)
        if claimed != actual:
            report.offender_seq, report.offender_kind = report.last_seq, "record"
            report.problem = (
                f"the bundle header claims {claimed[0]} records ending at seq {claimed[1]}, "
                f"but it holds {actual[0]} ending at seq {actual[1]} (truncated or spliced)"
            )
    return BundleVerification(report, header, keys_from)


# ------------------------------------------------------------------------------------------ backup


@dataclass
class BackupResult:
    path: Path
    bytes: int
    source_records: int
    verification: WalVerification


def backup(reader: WalReader, dest: Path, pins: PinnedKeys) -> BackupResult:
    """SQLite's online backup of the reader's snapshot to `dest` (never overwritten; 0600; a single
    self-contained file in rollback-journal mode), then a full verification of the copy."""
    if not isinstance(reader, SqliteReader):
        raise AuditError(
            f"{reader.path} is a PostgreSQL WAL: back it up with the database's own tools (pg_dump of the "
            "`faramesh` schema, or your PostgreSQL backups); `audit export` writes a verifiable bundle of it"
        )
    if dest.exists() or dest.is_symlink():
        raise AuditError(f"{dest} already exists; backup never overwrites")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        target = sqlite3.connect(tmp)
        try:
            reader.backup_to(target)
            target.execute("PRAGMA journal_mode=DELETE")
            target.commit()
        finally:
            target.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.link(tmp, dest)  # fails rather than replace a file that appeared meanwhile
    except FileExistsError:
        raise AuditError(f"{dest} already exists; backup never overwrites") from None
    except (OSError, sqlite3.Error) as exc:
        raise AuditError(f"backup to {dest} failed: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    count, _, _ = reader.bounds()
    with open_reader(dest) as copy:
        verification = verify_wal(copy, pins)
        if verification.report.ok and (copy.chain_id != reader.chain_id or verification.total_records != count):
            verification.report.problem = "the copy does not hold the same chain as the source"
    return BackupResult(dest, dest.stat().st_size, count, verification)


# ------------------------------------------------------------------------------------------- misc


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """`24h`, `90m`, `7d`, `1d12h`, `30s`, `2w` → seconds. ValueError otherwise."""
    text = text.strip().lower()
    if not text or _DURATION.sub("", text):
        raise ValueError(f"{text!r} is not a duration such as 30m, 24h, 7d or 1d12h")
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(text))
    if seconds <= 0:
        raise ValueError("the duration must be positive")
    return seconds
