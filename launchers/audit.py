"""`faramesh audit …` (verify, tail, show, export, verify-bundle, backup) and `faramesh explain`.

They read the WAL `faramesh serve` writes, directly and read-only — the SQLite file (engine/wal/store.py
`SqliteReader`) or, for `runtime { backend = "postgres" }`, the engine's chain in PostgreSQL
(engine/wal/pg_store.py `PgReader`, with `postgres_url` resolved from this environment, then from the
engine's environment file) — so they work while the engine runs and when it is stopped; they never
talk to the engine. `faramesh dev` keeps its WAL in memory: on a dev stack they say so and exit 1.

Nothing heavy is imported at module level (the CLI's `--help` must stay fast), and nothing is
imported from launchers/cli.py at module level either: `python -m faramesh.launchers.cli` runs that
file as `__main__`, and a module-level import of it from here would load it a second time mid-import.
The helpers shared with it (`_stack_dir`, `_emit_json`) are imported inside the commands.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from faramesh.engine.paths import StackPaths
    from faramesh.engine.policy.model import CompiledPolicy
    from faramesh.engine.wal.audit_ops import PinnedKeys, WalReader
    from faramesh.engine.wal.store import StoredRecord

# The exit codes of DESIGN.md §4, as launchers/cli.py names them.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 64


class Format(StrEnum):
    text = "text"
    json = "json"


class Effect(StrEnum):
    permit = "permit"
    defer = "defer"
    deny = "deny"


class ExportAs(StrEnum):
    jsonl = "jsonl"
    json = "json"
    csv = "csv"


DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir", help="Stack directory (default: the nearest directory at or above . holding governance.fms)."
    ),
]
WalOpt = Annotated[
    Path | None,
    typer.Option("--wal", help="Read this SQLite WAL file (e.g. a backup) instead of the stack's own."),
]
ChainOpt = Annotated[
    str | None,
    typer.Option(
        "--chain",
        help="PostgreSQL WAL: the chain (one per engine) to read; default: this stack's own, else the only one.",
    ),
]
KeyOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--key",
        help="Pin a checkpoint-signing public key: a file of ed25519:BASE64 / ecdsa-p256:BASE64 lines or PEM "
        "(Ed25519 or P-256, e.g. from `aws kms get-public-key`) (repeatable).",
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Output format; json is a stable schema (README).")]

audit_app = typer.Typer(
    help="Verify, read, export and back up the WAL of Decision Provenance Records.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


# ------------------------------------------------------------------------------------------- helpers


def _wal_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """A WAL file damaged below the record level (SQLite itself cannot read it), or a PostgreSQL WAL
    whose database stops answering mid-read, is a failed check with a message, never an internal error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            import sqlite3

            from faramesh.engine.wal.store import StoreError

            if isinstance(exc, sqlite3.DatabaseError | StoreError):  # StoreError messages carry no password
                _fail(f"the WAL cannot be read: {exc}")
            raise

    return wrapper


def _emit_json(data: Any) -> None:
    from faramesh.launchers.cli import _emit_json as emit

    emit(data)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    sys.stderr.write(f"faramesh: {message}\n")
    raise typer.Exit(code)


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def _stack(dir: Path | None, wal: Path | None) -> Path | None:
    """The stack: --dir, else the nearest one above `.`; optional when --wal names the file."""
    if dir is not None or wal is None:
        from faramesh.launchers.cli import _stack_dir

        return _stack_dir(dir)
    from faramesh.engine.policy.stack import find_stack_dir

    return find_stack_dir(Path.cwd())


def _paths(stack: Path | None) -> StackPaths | None:
    from faramesh.engine.paths import stack_paths

    return stack_paths(stack) if stack is not None else None


def _environ(paths: StackPaths | None) -> dict[str, str]:
    """What resolves `postgres_url = env("…")` here: this process's environment, over the engine's
    environment file (`apply` keeps the secret references there, root 0600) when it is readable."""
    environ = dict(os.environ)
    if paths is None:
        return environ
    from faramesh.supervisor.service_user import read_env_file

    try:
        saved = read_env_file(paths.env_file(environ))
    except (OSError, UnicodeDecodeError):  # not ours to read (another user's stack): the environment alone
        saved = {}
    return {**saved, **environ}


def _open(stack: Path | None, paths: StackPaths | None, wal: Path | None, chain: str | None = None) -> WalReader:
    from faramesh.engine.wal.audit_ops import AuditError, locate_wal, open_reader

    where = locate_wal(stack, paths, wal, environ=_environ(paths) if wal is None else None)
    if not where.found:
        _fail(str(where.problem))
    if where.note:
        _warn(where.note)
    try:
        reader = open_reader(where, chain)
    except AuditError as exc:
        _fail(str(exc))
    if chain is not None and reader.chain_id != chain:  # a SQLite WAL holds one chain
        reader.close()
        _fail(f"{reader.path} holds chain {reader.chain_id}, not {chain}")
    return reader


def _pins(paths: StackPaths | None, keys: list[Path] | None) -> PinnedKeys:
    from faramesh.engine.wal.audit_ops import AuditError, pinned_keys

    try:
        pins = pinned_keys(paths, keys or [])
    except AuditError as exc:
        _fail(str(exc), EXIT_USAGE)
    for w in pins.warnings:
        _warn(w)
    return pins


def _short(h: Any, n: int = 16) -> str:
    return str(h)[:n] if h else "-"


def _describe_keys(pins: PinnedKeys, used: list[str]) -> str:
    if not used:
        return "no checkpoint"
    parts = []
    for fp in used:
        source = pins.sources.get(fp)
        parts.append(f"{fp} ({source})" if source else fp)
    return ", ".join(parts)


def _signing_lines(report: Any, pins: PinnedKeys | None) -> list[str]:
    """Per-key checkpoint counts, signer changes and dev-tagged records (`dev` keeps its WAL in memory, so
    on disk such a record is out of place), as text lines."""
    lines = []
    for fp, count in report.key_counts.items():
        key_id = pins.key_ids.get(fp) if pins is not None else None
        label = f" ({key_id})" if key_id else ""
        lines.append(f"  key {fp}{label}: {count} checkpoint(s)\n")
    for change in report.signer_changes:
        how = "countersigned by the old key" if change["countersigned"] else "NOT countersigned by the old key"
        lines.append(f"signer change at seq {change['seq']}: {change['from']} → {change['to']} ({how})\n")
    if report.dev_records:
        lines.append(
            f"warning: {report.dev_records} record(s) are tagged dev (written by `faramesh dev` or a stub) in a "
            "WAL that `faramesh serve` writes\n"
        )
    return lines


class _Progress:
    """`verified N of M records` on stderr, redrawn in place on a terminal, one line each otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        import time

        self.total = total
        self.enabled = enabled
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def line(self, done: int) -> str:
        import time

        rate = done / max(time.monotonic() - self.started, 1e-9)
        pct = f" ({100 * done // self.total}%)" if self.total else ""
        return f"verified {done} of {self.total} records{pct}, {rate:,.0f} records/s"

    def __call__(self, done: int) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + self.line(done) + ("" if self.tty else "\n"))
            sys.stderr.flush()

    def finish(self, done: int) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + self.line(done) + "\n")
            sys.stderr.flush()


# ------------------------------------------------------------------------------------------- verify


@audit_app.command("verify")
@_wal_errors
def audit_verify(
    dir: DirOpt = None,
    wal: WalOpt = None,
    chain_id: ChainOpt = None,
    from_seq: Annotated[
        int | None, typer.Option("--from", min=1, help="First seq to verify, linked to the stored hash before it.")
    ] = None,
    to_seq: Annotated[int | None, typer.Option("--to", min=1, help="Last seq to verify.")] = None,
    require_signed: Annotated[
        bool, typer.Option("--require-signed", help="Fail when records are not yet covered by a signed checkpoint.")
    ] = False,
    key: KeyOpt = None,
    progress: Annotated[
        bool, typer.Option("--progress", help="Report progress on stderr even when it is not a terminal.")
    ] = False,
    format: FormatOpt = Format.text,
) -> None:
    """Check the whole hash chain and every checkpoint signature; exit 1 naming the first offender."""
    from faramesh.engine.wal.audit_ops import verify_wal

    if from_seq is not None and to_seq is not None and to_seq < from_seq:
        _fail(f"--to {to_seq} is before --from {from_seq}", EXIT_USAGE)
    stack = _stack(dir, wal)
    paths = _paths(stack)
    pins = _pins(paths, key)
    with _open(stack, paths, wal, chain_id) as reader:
        total, _, last = reader.bounds()
        span = max(0, min(to_seq or last, last) - (from_seq or 1) + 1)
        meter = _Progress(span, progress or sys.stderr.isatty())
        result = verify_wal(
            reader, pins, from_seq=from_seq, to_seq=to_seq, require_signed=require_signed, progress=meter
        )
        meter.finish(result.report.records)
    report = result.report
    if not pins.keys:
        _warn(
            "no pinned key (this stack's signing key is not readable here and no --key was given): checkpoint "
            "signatures were checked against the keys the WAL itself names, which proves consistency, not origin"
        )
    if format is Format.json:
        _emit_json(result.to_dict(pins))
        raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)
    out = sys.stdout.write
    out(f"WAL {result.path} (chain {result.chain_id or '?'})\n")
    if result.range:
        anchor = f", linked to the stored hash of seq {result.range[0] - 1}" if result.anchor else ""
        out(f"range seq {result.range[0]}–{result.range[1]} of {total}{anchor}\n")
    if not report.ok:
        where = f"seq {report.offender_seq}" if report.offender_seq is not None else "the chain"
        rid = f" (record {report.offender_id})" if report.offender_id else ""
        out(f"checked {report.records} records before the first offender\n")
        out(f"BROKEN at {where}{rid}: {report.problem}\n")
        raise typer.Exit(EXIT_FAILED)
    if report.records:
        out(f"verified {report.records} records (seq {report.first_seq}–{report.last_seq}), ")
        out(f"head {_short(report.head_hash)}\n")
    else:
        out("the chain is empty\n")
    pinned = "pinned" if pins.keys else "NOT pinned"
    out(
        f"checkpoints: {report.checkpoints} verified, signed through seq {report.signed_through}; "
        f"keys ({pinned}): {_describe_keys(pins, report.keys_used)}\n"
    )
    for line in _signing_lines(report, pins):
        out(line)
    for signer in result.wal_signer:
        if signer.get("fingerprint") not in pins.keys:
            out(
                f"the WAL names signer {signer.get('key_id')} ({signer.get('fingerprint')}), which is not pinned here\n"
            )
    for lo, hi in report.recovery_signed:
        out(f"signed late: records {lo}–{hi}, by a recovery checkpoint at seq {hi} ")
        out("(the engine had stopped before signing them)\n")
    if report.unsigned:
        lo, hi = report.unsigned
        out(f"unsigned: records {lo}–{hi} are not yet covered by a checkpoint ")
        out("(a running engine signs within a second)\n")
    out("intact\n")
    raise typer.Exit(EXIT_OK)


# --------------------------------------------------------------------------------------------- tail


def _summary_line(rec: StoredRecord) -> str:
    from faramesh.engine.wal.audit_ops import record_dict

    dpr = record_dict(rec)
    what = rec.tool or dpr.get("policy_version", "")
    kind = "" if rec.action_type == "tool_call" else f"[{rec.action_type}] "
    rule = f"  {dpr['rule_ref']}" if dpr.get("rule_ref") else ""
    return (
        f"{rec.seq:>7}  {rec.time}  {rec.effect or '-':<7} {rec.code or '-':<18} {rec.agent_id or '-'}  "
        f"{kind}{what}  {rec.id}{rule}\n"
    )


@audit_app.command("tail")
@_wal_errors
def audit_tail(
    dir: DirOpt = None,
    wal: WalOpt = None,
    chain_id: ChainOpt = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's records.")] = None,
    effect: Annotated[Effect | None, typer.Option("--effect", case_sensitive=False, help="Only this effect.")] = None,
    tool: Annotated[str | None, typer.Option("--tool", help="Only tools matching this id or glob (refund*).")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many records (the newest).")] = 20,
    format: FormatOpt = Format.text,
) -> None:
    """The newest records, oldest first, optionally filtered."""
    from faramesh.engine.wal.audit_ops import record_dict

    stack = _stack(dir, wal)
    with _open(stack, _paths(stack), wal, chain_id) as reader:
        records = reader.tail(lines, agent_id=agent, effect=effect.value if effect else None, tool_glob=tool)
    if format is Format.json:
        _emit_json({"records": [record_dict(r) for r in records]})
        raise typer.Exit(EXIT_OK)
    for rec in records:
        sys.stdout.write(_summary_line(rec))
    if not records:
        sys.stdout.write("no matching records\n")
    raise typer.Exit(EXIT_OK)


# --------------------------------------------------------------------------------------------- show


def _chain_lines(chain: dict[str, Any]) -> list[str]:
    lines = [
        f"chain     seq {chain['seq']} of {chain['head_seq']} (chain {chain['chain_id']})",
        f"          prev {chain['prev_record_hash']}",
        f"          hash {chain['record_hash']}  "
        + ("(matches the stored bytes)" if chain["record_hash_matches_bytes"] else "(DOES NOT match the stored bytes)"),
    ]
    cp = chain["checkpoint"]
    if cp is None:
        lines.append(
            f"signed    not yet: no checkpoint covers it (the last one is at seq {chain.get('unsigned_after', 0)})"
        )
        return lines
    pinned = "pinned" if cp["key_pinned"] else "not pinned"
    lines.append(
        f"signed    by the {cp['kind']} checkpoint at seq {cp['seq']} "
        f"({cp['time']}, key {cp['key_fingerprint']}, {pinned})"
    )
    proof = chain["proof"] or {}
    if proof.get("ok"):
        how = "a pinned key" if proof.get("pinned") else "the key it names (no key pinned)"
        lines.append(
            f"proof     {proof['records_walked']} record(s) from here link to that checkpoint, whose signature "
            f"verifies against {how}"
        )
    elif proof.get("ok") is None:
        lines.append(f"proof     not checked: {proof.get('problem')}")
    else:
        lines.append(f"proof     FAILS: {proof.get('problem')}")
    return lines


@audit_app.command("show")
@_wal_errors
def audit_show(
    dpr_id: Annotated[str, typer.Argument(metavar="ID", help="The DPR id (the action_id a reply carried).")],
    dir: DirOpt = None,
    wal: WalOpt = None,
    chain_id: ChainOpt = None,
    key: KeyOpt = None,
    format: FormatOpt = Format.text,
) -> None:
    """One DPR in full, its stored (redacted) args and its position in the chain."""
    import json

    from faramesh.engine.wal.audit_ops import chain_position, record_dict, request_args

    stack = _stack(dir, wal)
    paths = _paths(stack)
    pins = _pins(paths, key)
    with _open(stack, paths, wal, chain_id) as reader:
        rec = reader.record_by_id(dpr_id)
        if rec is None:
            _fail(f"no record {dpr_id} in {reader.path}")
        dpr = record_dict(rec)
        args = request_args(reader, rec.seq)
        chain = chain_position(reader, rec, pins)
    if format is Format.json:
        _emit_json({"dpr": dpr, "request_args": args, "chain": chain})
        raise typer.Exit(EXIT_OK)
    sys.stdout.write(f"DPR {rec.id} ({rec.action_type})\n")
    sys.stdout.write(json.dumps(dpr, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if args is not None:
        sys.stdout.write(f"args      {json.dumps(args, sort_keys=True, ensure_ascii=False)}  (as stored: redacted)\n")
    sys.stdout.write("\n".join(_chain_lines(chain)) + "\n")
    raise typer.Exit(EXIT_OK)


# ------------------------------------------------------------------------------------------- export


@audit_app.command("export")
@_wal_errors
def audit_export(
    dir: DirOpt = None,
    wal: WalOpt = None,
    chain_id: ChainOpt = None,
    as_: Annotated[ExportAs, typer.Option("--as", help="jsonl and json are verifiable bundles; csv is a table.")] = (
        ExportAs.jsonl
    ),
    include_public_keys: Annotated[
        bool,
        typer.Option(
            "--include-public-keys", help="Carry the signing public keys (verify-bundle --trust-bundle-keys)."
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write here (default: standard output).")] = None,
) -> None:
    """Export the whole chain: every DPR with its record_hash, and the signed checkpoints."""
    import time

    from faramesh.engine.wal.audit_ops import PinnedKeys, export

    if as_ is ExportAs.csv and include_public_keys:
        _fail("--include-public-keys needs a bundle (--as jsonl or json); csv carries no keys", EXIT_USAGE)
    stack = _stack(dir, wal)
    paths = _paths(stack)
    pins = _pins(paths, []) if include_public_keys else PinnedKeys()

    with _open(stack, paths, wal, chain_id) as reader:
        if out is None:
            sys.stdout.flush()
            summary = export(
                reader,
                as_.value,
                sys.stdout.buffer,
                include_public_keys=include_public_keys,
                pins=pins,
                now=time.time(),
            )
            sys.stdout.buffer.flush()
        else:
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    summary = export(
                        reader, as_.value, fh, include_public_keys=include_public_keys, pins=pins, now=time.time()
                    )
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, out)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                _fail(f"cannot write {out}: {exc.strerror}")
    where = f" to {out}" if out else ""
    keys = f", {summary.public_keys} public key(s)" if include_public_keys else ""
    sys.stderr.write(
        f"exported {summary.records} records and {summary.checkpoints} checkpoints ({as_.value}{keys}){where}; "
        f"head {_short(summary.head_hash)}\n"
    )
    raise typer.Exit(EXIT_OK)


# ------------------------------------------------------------------------------------ verify-bundle


@audit_app.command("verify-bundle")
def audit_verify_bundle(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A bundle from `audit export --as jsonl|json`.")],
    key: KeyOpt = None,
    trust_bundle_keys: Annotated[
        bool,
        typer.Option(
            "--trust-bundle-keys", help="Check signatures against the keys the bundle carries (integrity, not origin)."
        ),
    ] = False,
    require_signed: Annotated[
        bool, typer.Option("--require-signed", help="Fail when records are not covered by a signed checkpoint.")
    ] = False,
    format: FormatOpt = Format.text,
) -> None:
    """Verify an exported bundle offline: the chain, and every checkpoint signature against pinned keys."""
    from faramesh.engine.wal.audit_ops import AuditError, verify_bundle

    if not key and not trust_bundle_keys:
        _fail(
            "verify-bundle checks signatures against keys you pin: pass --key FILE (the engine's public key), or "
            "--trust-bundle-keys to use the keys in the bundle (that proves integrity, not origin: whoever can "
            "edit the bundle can re-sign it)",
            EXIT_USAGE,
        )
    pins = _pins(None, key)
    try:
        result = verify_bundle(file, pins, trust_bundle_keys=trust_bundle_keys, require_signed=require_signed)
    except AuditError as exc:
        _fail(str(exc))
    report = result.report
    if format is Format.json:
        _emit_json(result.to_dict())
        raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)
    out = sys.stdout.write
    out(f"bundle {file} (chain {result.header.get('chain_id')}, exported {result.header.get('exported_at')})\n")
    if not report.ok:
        where = f"seq {report.offender_seq}" if report.offender_seq is not None else "the bundle"
        rid = f" (record {report.offender_id})" if report.offender_id else ""
        out(f"BROKEN at {where}{rid}: {report.problem}\n")
        raise typer.Exit(EXIT_FAILED)
    out(f"verified {report.records} records (seq {report.first_seq}–{report.last_seq}), ")
    out(f"head {_short(report.head_hash)}\n")
    out(
        f"checkpoints: {report.checkpoints} verified, signed through seq {report.signed_through}; "
        f"keys from {', '.join(result.keys_from)}\n"
    )
    for line in _signing_lines(report, pins):
        out(line)
    for lo, hi in report.recovery_signed:
        out(f"signed late: records {lo}–{hi}, by a recovery checkpoint at seq {hi}\n")
    if report.unsigned:
        lo, hi = report.unsigned
        out(f"unsigned: records {lo}–{hi} are not covered by a checkpoint\n")
    out("intact\n")
    raise typer.Exit(EXIT_OK)


# ------------------------------------------------------------------------------------------- backup


@audit_app.command("backup")
@_wal_errors
def audit_backup(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the copy (never overwritten).")],
    dir: DirOpt = None,
    wal: WalOpt = None,
    key: KeyOpt = None,
    format: FormatOpt = Format.text,
) -> None:
    """Copy the WAL with SQLite's online backup (safe while the engine runs), then verify the copy."""
    from faramesh.engine.wal.audit_ops import AuditError, backup

    stack = _stack(dir, wal)
    paths = _paths(stack)
    pins = _pins(paths, key)
    with _open(stack, paths, wal) as reader:
        try:
            result = backup(reader, file, pins)
        except AuditError as exc:
            _fail(str(exc))
    report = result.verification.report
    if format is Format.json:
        _emit_json(
            {
                "backup": str(result.path),
                "bytes": result.bytes,
                "records": result.source_records,
                "verification": result.verification.to_dict(pins),
            }
        )
        raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)
    sys.stdout.write(f"backup {result.path}: {result.source_records} records, {result.bytes} bytes\n")
    if not report.ok:
        where = f"seq {report.offender_seq}" if report.offender_seq is not None else "the chain"
        sys.stdout.write(f"the copy does NOT verify — BROKEN at {where}: {report.problem}\n")
        raise typer.Exit(EXIT_FAILED)
    sys.stdout.write(
        f"the copy verifies: {report.records} records, {report.checkpoints} checkpoints, "
        f"head {_short(report.head_hash)}\n"
    )
    raise typer.Exit(EXIT_OK)


# ------------------------------------------------------------------------------------------ explain


_PRE_EVALUATION = {
    "IDENTITY_MISMATCH": "the agent_id it claimed is not the socket's agent",
    "INVALID_REQUEST": "the request was invalid",
    "ARGS_NOT_CANONICAL": "its args cannot be canonicalised (RFC 8785)",
}


def _policy_for(
    version: str | None, stack: Path | None, paths: StackPaths | None, policy_file: Path | None
) -> tuple[CompiledPolicy, str, str | None]:
    """(policy, where it came from, warning): the compiled policy whose version the DPR names, else the
    current one with a warning that the policy changed since the decision."""
    import hashlib

    from faramesh.engine.policy.errors import CompiledPolicyError, FarameshError
    from faramesh.engine.policy.model import policy_from_json

    candidates: list[tuple[Path, str]] = []
    if policy_file is not None:
        candidates.append((policy_file, f"--policy {policy_file}"))
    if paths is not None:
        candidates.append((paths.policy_copy, f"the engine's installed copy ({paths.policy_copy})"))
    if stack is not None:
        candidates.append((stack / ".faramesh" / "policy.json", "the applied policy (.faramesh/policy.json)"))
    loaded: list[tuple[CompiledPolicy, str]] = []
    for path, label in candidates:
        try:
            raw = path.read_bytes()
        except OSError:
            if path == policy_file:
                _fail(f"cannot read {path}")
            continue
        try:
            policy = policy_from_json(raw)
        except CompiledPolicyError as exc:
            if path == policy_file:
                _fail(f"{path}: {exc}")
            continue
        if version is not None and (hashlib.sha256(raw).hexdigest() == version or policy.version == version):
            return policy, label, None
        loaded.append((policy, label))
    if loaded:
        policy, label = loaded[0]
    elif stack is not None:
        from faramesh.engine.policy.stack import compile_stack

        try:
            policy = compile_stack(stack).policy
        except FarameshError as exc:
            _fail(f"no compiled policy of version {_short(version)} is installed, and {stack} does not compile: {exc}")
        label = f"the stack's source ({stack}), compiled now"
        if policy.version == version:
            return policy, label, None
    else:
        _fail(f"no compiled policy of version {_short(version)} here; pass --policy FILE or --dir")
    warning = (
        f"the policy changed since this decision: the DPR names version {_short(version)}, which is not installed "
        f"any more; explaining under the current policy {_short(policy.version)} ({label}) — the verdict below may "
        "differ from the record"
    )
    return policy, label, warning


def _state_before(reader: WalReader, policy: CompiledPolicy, agent_id: str, seq: int, when: float) -> Any:
    """Rate buckets and budget usage as the engine had them just before `seq`, rebuilt from the WAL the
    way the engine rebuilds them at start-up (EngineState.replay over the agent's earlier records)."""
    from types import MappingProxyType

    from faramesh.engine.pipeline import EngineState
    from faramesh.engine.policy.limits import StateSnapshot, period_bounds
    from faramesh.engine.wal.log import decode_body, rfc3339

    agent = policy.agents.get(agent_id)
    since = when - 2 * 86400
    if agent is not None:
        for budget in agent.budgets:
            since = min(since, period_bounds(budget.period, when)[0])

    def bodies() -> Any:
        for rec in reader.records_since(rfc3339(max(0.0, since)), agent_id=agent_id, before_seq=seq):
            try:
                yield decode_body(rec.body)
            except ValueError:
                continue

    state = EngineState(policy, hmac_key=bytes(32), dev=False)
    state.replay(bodies(), [], when)
    return StateSnapshot(MappingProxyType(dict(state.rate)), MappingProxyType(dict(state.budgets)))


@_wal_errors
def explain(
    dpr_id: Annotated[str, typer.Argument(metavar="DPR_ID", help="The DPR id (the action_id a reply carried).")],
    dir: DirOpt = None,
    wal: WalOpt = None,
    chain_id: ChainOpt = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="A compiled policy to explain with (default: the DPR's version).")
    ] = None,
    key: KeyOpt = None,
    format: FormatOpt = Format.text,
) -> None:
    """Why a decision came out as it did: every rule tried, rate and budget state, chain position."""
    import json

    from faramesh.engine.policy.replay import trace
    from faramesh.engine.wal.audit_ops import chain_position, record_dict, request_args

    stack = _stack(dir, wal)
    paths = _paths(stack)
    pins = _pins(paths, key)
    with _open(stack, paths, wal, chain_id) as reader:
        rec = reader.record_by_id(dpr_id)
        if rec is None:
            _fail(f"no record {dpr_id} in {reader.path}")
        dpr = record_dict(rec)
        args = request_args(reader, rec.seq)
        chain = chain_position(reader, rec, pins)
        pre = _PRE_EVALUATION.get(str(dpr.get("policy_code") or dpr.get("code")))
        if rec.action_type != "tool_call" or pre is not None or not isinstance(dpr.get("agent_id"), str):
            why = (
                f"this record is a {rec.action_type}, not a decision on a tool call"
                + (f" (it settles {dpr['settles']})" if dpr.get("settles") else "")
                + (f" (approval {dpr['approval_id']})" if rec.action_type == "approval_resolved" else "")
                if rec.action_type != "tool_call"
                else f"no rule was tried: {pre or 'the record names no agent'} ({dpr.get('code')})"
            )
            if format is Format.json:
                _emit_json({"dpr": dpr, "explanation": None, "reason": why, "chain": chain})
            else:
                sys.stdout.write(f"DPR {rec.id}: {why}\n" + "\n".join(_chain_lines(chain)) + "\n")
            raise typer.Exit(EXIT_OK)
        version = dpr.get("policy_version")
        compiled, source, warning = _policy_for(version if isinstance(version, str) else None, stack, paths, policy)
        epoch_ms = dpr.get("epoch_ms")
        when = epoch_ms / 1000 if isinstance(epoch_ms, int) else None
        agent_id = str(dpr["agent_id"])
        state = _state_before(reader, compiled, agent_id, rec.seq, when) if when is not None else None
        from types import MappingProxyType

        from faramesh.engine.policy.limits import StateSnapshot, recorded_fleet_usage

        fleet = recorded_fleet_usage(dpr)
        if state is not None and fleet:  # a fleet budget's usage came from the database: the DPR kept it
            state = StateSnapshot(state.rate, MappingProxyType({**state.budgets, **fleet}))
    from faramesh.engine.policy.limits import EMPTY_STATE

    request = {"agent_id": agent_id, "tool_id": dpr.get("tool"), "args": args or {}, "time": when, "principal": {}}
    result = trace(compiled, request, state or EMPTY_STATE)
    expected = _expected_effect(dpr)
    agrees = result.decision.effect == expected and (
        dpr.get("approval_id") is not None or result.decision.rule_ref == dpr.get("rule_ref")
    )
    if warning:
        _warn(warning)
    if format is Format.json:
        _emit_json(
            {
                "dpr": dpr,
                "request_args": args,
                "policy": {"version": compiled.version, "source": source, "matches_dpr": warning is None},
                "explanation": result.to_dict(),
                "recorded": {
                    "effect": dpr.get("effect"),
                    "code": dpr.get("code"),
                    "policy_effect": dpr.get("policy_effect"),
                    "policy_code": dpr.get("policy_code"),
                    "rule_ref": dpr.get("rule_ref"),
                    "approval_id": dpr.get("approval_id"),
                    "approver": dpr.get("approver"),
                    "cost_cents": dpr.get("cost_cents"),
                },
                "agrees_with_record": agrees,
                "notes": _notes(result, args),
                "chain": chain,
            }
        )
        raise typer.Exit(EXIT_OK)
    out = sys.stdout.write
    out(f"DPR {rec.id}  seq {rec.seq}\n")
    out(
        f"call      agent {agent_id}  tool {dpr.get('tool')}  at {dpr.get('time')}"
        f"  (session {dpr.get('session_id') or '-'}, call {dpr.get('call_id') or '-'})\n"
    )
    recorded = f"{dpr.get('effect')} {dpr.get('code')}"
    said = (dpr.get("policy_effect"), dpr.get("policy_code"))
    if said[0] and said != (dpr.get("effect"), dpr.get("code")):
        recorded += f" (policy said {dpr.get('policy_effect')} {dpr.get('policy_code')}; mode {dpr.get('mode')})"
    out(f"recorded  {recorded} by {dpr.get('rule_ref') or 'no rule'}\n")
    if dpr.get("approval_id"):
        who = f" approved by {dpr.get('approver')}" if dpr.get("approver") else ""
        out(f"approval  {dpr['approval_id']}{who}\n")
    out(f"args      {json.dumps(args, sort_keys=True, ensure_ascii=False) if args is not None else '(none stored)'}\n")
    out(f"policy    {_short(compiled.version)} — {source}\n")
    if result.problem:
        out(f"rules     none tried: {result.problem}\n")
    else:
        out(f'rules of agent "{agent_id}", tried in order (first match wins; a matching deny! wins over all):\n')
        width = max((len(_rule_label(t)) for t in result.rules), default=0)
        for t in result.rules:
            out(f"  {t.index:>3}. {_rule_label(t):<{width}}  {t.ref:<20} {_trial_text(t)}\n")
        default = f"default {result.default or 'deny (none declared)'}"
        used = "← decided: no rule matched" if result.default_used else "not used"
        out(f"  {'':>3}  {default}  {result.default_ref or ''}  {used}\n")
    if result.limits:
        consulted = result.rule_decision is not None and result.rule_decision.effect != "DENY"
        suffix = "" if consulted else " — not consulted: the rules denied"
        out(f"limits    state rebuilt from the WAL records before this one{suffix}\n")
        for lim in result.limits:
            out(f"  {_limit_text(lim)}\n")
    d = result.decision
    verdict = "agrees with the record" if agrees else "DIFFERS from the record"
    out(f"verdict   re-evaluated: {d.effect} {d.code} by {d.rule_ref or 'no rule'} — {verdict}\n")
    for note in _notes(result, args):
        out(f"note      {note}\n")
    out("\n".join(_chain_lines(chain)) + "\n")
    raise typer.Exit(EXIT_OK)


def _expected_effect(dpr: dict[str, Any]) -> str | None:
    """What evaluation alone (no approval state) should give for this record."""
    if dpr.get("approval_id") is not None:
        return "DEFER"  # the rules deferred; an approval then permitted, or an operator denied
    return dpr.get("policy_effect") or dpr.get("effect")


def _rule_label(t: Any) -> str:
    text = f"{t.effect}{'!' if t.strict else ''} {t.pattern}"
    return text + (f" if {t.condition}" if t.condition else "")


def _trial_text(t: Any) -> str:
    if t.outcome == "glob mismatch":
        return "glob does not match"
    cond = "" if t.condition is None else (", condition held" if t.condition_held else ", condition false")
    tail = {
        "decided": "  ← decided",
        "not reached": " (matches too, but an earlier rule won)",
        "overridden": " (matched, but a later deny! wins)",
        "condition false": "",
    }[t.outcome]
    return f"glob matches{cond}{tail}"


def _limit_text(lim: Any) -> str:
    d = lim.detail
    verdict = "allowed" if lim.allowed else "EXCEEDED"
    if lim.kind == "rate_limit":
        tokens = f"{d['tokens']:g} of {d['capacity']} tokens left" if "tokens" in d else "state unknown"
        return f"{lim.text} ({lim.ref}): {tokens} → {verdict}"
    if "projected_cents" in d:
        used = f"{d['spent_cents'] + d['reserved_cents']}c used, {d['calls']} call{'' if d['calls'] == 1 else 's'}"
        maxima = (
            f"max {d['max_cents']}c" if d["max_cents"] is not None else "",
            f"max {d['max_calls']} calls" if d["max_calls"] is not None else "",
        )
        limit = " / ".join(x for x in maxima if x)
        return (
            f"{lim.text} ({lim.ref}): {used}; this call ~{d['estimate_cents']}c; {limit} → {verdict} "
            f"(on_exceed {d['on_exceed']})"
        )
    return f"{lim.text} ({lim.ref})"


def _notes(result: Any, args: dict[str, Any] | None) -> list[str]:
    notes = []
    if result.redacted_paths:
        notes.append(
            "args are stored redacted: " + ", ".join(result.redacted_paths) + ' evaluated as the string "[REDACTED]"'
        )
    if args is None:
        notes.append("no args were stored for this request: conditions saw {}")
    notes.append("the principal a request carried is not recorded: conditions on principal saw {}")
    return notes


# ------------------------------------------------------------------------------------- plan --since


def plan_replay(stack: Path, new: CompiledPolicy, base: dict[str, Any] | None, since: str) -> dict[str, Any]:
    """`faramesh plan --since`: the recorded tool calls of the window, re-evaluated under the new policy
    against the old (the policy plan compares with, else the engine's installed copy, else the
    decisions as recorded). A missing WAL is not an error: the result says why nothing was replayed."""
    import time

    import orjson
    from faramesh.engine.policy.errors import CompiledPolicyError
    from faramesh.engine.policy.model import policy_from_dict, policy_from_json, thaw
    from faramesh.engine.policy.replay import RecordedRequest, replay
    from faramesh.engine.wal.audit_ops import AuditError, installed_runtime, locate_wal, open_reader, parse_duration
    from faramesh.engine.wal.log import rfc3339

    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", EXIT_USAGE)
    paths = _paths(stack)
    assert paths is not None
    start = rfc3339(time.time() - seconds)
    out: dict[str, Any] = {"since": since, "from_time": start, "wal": None, "note": None}
    where = locate_wal(
        stack, paths, None, runtime=installed_runtime(stack, paths) or thaw(new.runtime), environ=_environ(paths)
    )
    if not where.found:
        out["note"] = where.problem
        return out
    old, baseline = None, "the decisions as recorded"
    if base is not None:
        old = policy_from_dict(base)
        baseline = f"the last applied policy ({_short(old.version)})"
    else:
        try:
            old = policy_from_json(paths.policy_copy.read_bytes())
            baseline = f"the engine's installed policy ({_short(old.version)})"
        except (OSError, CompiledPolicyError):
            old = None
    try:
        reader = open_reader(where)
    except AuditError as exc:
        out["note"] = str(exc)
        return out
    no_args = 0

    def requests() -> Any:
        nonlocal no_args
        for rec, raw in reader.tool_calls_since(start):
            try:
                dpr = orjson.loads(rec.body)
                args = orjson.loads(raw) if raw is not None else None
            except orjson.JSONDecodeError:
                args = None
            if not isinstance(args, dict) or not isinstance(dpr, dict) or not rec.agent_id or not rec.tool:
                no_args += 1  # refused before evaluation (identity, invalid or non-canonical args)
                continue
            epoch_ms = dpr.get("epoch_ms")
            yield RecordedRequest(
                id=rec.id,
                agent_id=rec.agent_id,
                tool=rec.tool,
                args=args,
                time=epoch_ms / 1000 if isinstance(epoch_ms, int) else None,
                policy_effect=dpr.get("policy_effect") or dpr.get("effect"),
                policy_code=dpr.get("policy_code") or dpr.get("code"),
                approval_id=dpr.get("approval_id"),
            )

    import sqlite3

    from faramesh.engine.wal.store import StoreError

    try:
        with reader:
            report = replay(requests(), new, old)
    except (sqlite3.DatabaseError, StoreError) as exc:
        out["note"] = f"the WAL cannot be read: {exc}"
        return out
    out.update(report.to_dict())
    out["wal"] = str(reader.path)
    out["baseline_text"] = baseline
    out["not_evaluated"] = no_args
    return out


def plan_replay_text(replay: dict[str, Any]) -> str:
    if replay["wal"] is None:
        return f"replay: nothing to replay — {replay['note']}\n"
    lines = [
        f"replay: {replay['requests']} recorded request(s) since {replay['from_time']} (--since {replay['since']}) "
        f"from {replay['wal']}",
        f"  each re-evaluated under the new policy against {replay['baseline_text']}",
    ]
    for t in replay["transitions"]:
        calls = f"{t['calls']} call{'s' if t['calls'] != 1 else ''}"
        lines.append(f"  {t['from'].lower()}→{t['to'].lower()} {calls}  (e.g. {', '.join(t['examples'])})")
    lines.append(f"  {replay['unchanged']} unchanged" if replay["transitions"] else "  no decision changes")
    if replay["skipped"]:
        lines.append(f"  {replay['skipped']} not compared: a rate limit or budget decided them, not the rules")
    if replay["not_evaluated"]:
        lines.append(f"  {replay['not_evaluated']} not replayed: refused before evaluation (no args stored)")
    if replay["with_redacted_fields"]:
        lines.append(
            f"  note: args are stored redacted; {replay['with_redacted_fields']} request(s) had masked fields, "
            'which evaluate as the string "[REDACTED]"'
        )
    lines.append("  (rate limits and budgets are evaluated from a fresh state; `faramesh explain <id>` shows one call)")
    return "\n".join(lines) + "\n"
