"""WAL stores: one interface, an in-memory store (dev) and SQLite (default).

Stores are synchronous and called from one writer thread: a `Batch` (everything appended in one turn
of the engine loop) is one transaction. A reply is sent only after `commit` returns.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SCHEMA_VERSION = 1
DEFAULT_REPLAY_RETENTION = 7 * 86400  # seconds the redacted args of a request are kept (runtime.replay_retention)
RETENTION_BATCH = 500  # request rows deleted per transaction: short write locks beside the decisions
RETENTION_MAX_BATCHES = 20  # per maintenance call; what is left is taken at the next one


def retention_cutoff(now: float, retention_seconds: float) -> str:
    """The RFC 3339 time (the records' fixed-width text form) before which request args are deleted."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(max(0.0, now - retention_seconds), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class StoreError(Exception):
    code = "WAL_WRITE_FAILURE"


class SchemaTooNew(StoreError):
    code = "WAL_SCHEMA_TOO_NEW"


@dataclass(frozen=True, slots=True)
class StoredRecord:
    seq: int
    id: str
    time: str
    agent_id: str | None
    tool: str | None
    effect: str | None
    code: str | None
    approval_id: str | None
    action_type: str
    body: bytes
    record_hash: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    head_hash: str
    time: str
    kind: str  # periodic | shutdown | recovery
    key_fingerprint: str
    public_key: str
    signature: str


@dataclass
class Batch:
    records: list[StoredRecord] = field(default_factory=list)
    request_args: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, redacted args JCS)
    approvals: list[dict[str, Any]] = field(default_factory=list)  # upserts
    checkpoint: Checkpoint | None = None
    meta: dict[str, str] = field(default_factory=dict)


class Store(Protocol):
    description: str

    def open(self) -> dict[str, str]: ...
    def commit(self, batch: Batch) -> None: ...
    def head(self) -> StoredRecord | None: ...
    def records(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[StoredRecord]: ...
    def record_by_id(self, record_id: str) -> StoredRecord | None: ...
    def checkpoints(self) -> list[Checkpoint]: ...
    def approvals(self) -> list[dict[str, Any]]: ...
    def request_args(self, seq: int) -> bytes | None: ...
    def close(self) -> None: ...


class MemoryStore:
    description = "memory"

    def __init__(self) -> None:
        self._records: list[StoredRecord] = []
        self._checkpoints: list[Checkpoint] = []
        self._approvals: dict[str, dict[str, Any]] = {}
        self._args: dict[int, bytes] = {}
        self._meta: dict[str, str] = {}
        self._lock = threading.Lock()
        self.fail_next_commit = False  # fault hook for tests
        self.retention_seconds: float = DEFAULT_REPLAY_RETENTION

    def open(self) -> dict[str, str]:
        return dict(self._meta)

    def commit(self, batch: Batch) -> None:
        if self.fail_next_commit:
            raise StoreError("injected commit failure")
        with self._lock:
            self._records.extend(batch.records)
            self._args.update(batch.request_args)
            for a in batch.approvals:
                self._approvals[a["id"]] = {**self._approvals.get(a["id"], {}), **a}
            if batch.checkpoint:
                self._checkpoints.append(batch.checkpoint)
            self._meta.update(batch.meta)

    def head(self) -> StoredRecord | None:
        return self._records[-1] if self._records else None

    def records(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[StoredRecord]:
        with self._lock:
            snapshot = self._records[max(0, from_seq - 1) : to_seq]
        return iter(snapshot)

    def record_by_id(self, record_id: str) -> StoredRecord | None:
        return next((r for r in self._records if r.id == record_id), None)

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._checkpoints)

    def approvals(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self._approvals.values()]

    def request_args(self, seq: int) -> bytes | None:
        return self._args.get(seq)

    def maintenance(self, now: float | None = None) -> bool:
        """Drop request args older than the retention (DPRs stay). False: nothing is left to do."""
        import time as _time

        cutoff = retention_cutoff(_time.time() if now is None else now, self.retention_seconds)
        with self._lock:
            # _args is in seq order and _records[seq - 1] is seq: look at the oldest only, O(deleted).
            while self._args:
                seq = next(iter(self._args))
                if not 0 < seq <= len(self._records) or self._records[seq - 1].time >= cutoff:
                    break
                del self._args[seq]
        return False

    def close(self) -> None:
        pass


_DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS records (
        seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, time TEXT NOT NULL, agent_id TEXT, tool TEXT,
        effect TEXT, code TEXT, approval_id TEXT, action_type TEXT NOT NULL,
        body BLOB NOT NULL, record_hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS records_time ON records (time)",
    "CREATE TABLE IF NOT EXISTS requests (seq INTEGER PRIMARY KEY, args BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        seq INTEGER PRIMARY KEY, head_hash TEXT NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL,
        key_fingerprint TEXT NOT NULL, public_key TEXT NOT NULL, signature TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS approvals (
        id TEXT PRIMARY KEY, status TEXT NOT NULL, agent_id TEXT NOT NULL, tool TEXT NOT NULL,
        args_hmac TEXT NOT NULL, created_at TEXT NOT NULL, expires_at INTEGER NOT NULL,
        resolved_at TEXT, approver TEXT, reason TEXT, action_id TEXT, used_by TEXT, args_digest TEXT)""",
]
_APPROVAL_COLS = (
    "id", "status", "agent_id", "tool", "args_hmac", "created_at", "expires_at",
    "resolved_at", "approver", "reason", "action_id", "used_by", "args_digest",
)  # fmt: skip


class SqliteStore:
    """SQLite in WAL journal mode; `sync` full survives power loss, normal survives kill -9.
    `secure_delete` zeroes freed pages so nothing redacted-away can linger in them."""

    def __init__(self, path: Path, sync: str = "full") -> None:
        self.path = path
        self.sync = sync
        self.description = f"sqlite {path} (synchronous={sync})"
        self._conn: sqlite3.Connection | None = None  # the writer's (one thread)
        self._ro: sqlite3.Connection | None = None  # readers': never sees an open write transaction
        self._read_lock = threading.Lock()
        self.fault_hook: Any = None  # tests: called inside the transaction, may sleep or raise
        self.retention_seconds: float = DEFAULT_REPLAY_RETENTION

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        # No automatic checkpoints: SQLite would run one inside whichever commit crosses 1,000 pages,
        # adding milliseconds to that decision. The WAL calls maintenance() when idle or periodically.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def open(self) -> dict[str, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for ddl in _DDL:
                conn.execute(ddl)
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise SchemaTooNew(
                    f"{self.path} has WAL schema {row[0]}, newer than this engine's {SCHEMA_VERSION}; upgrade faramesh"
                )
            # Forward-only migrations from older schema versions go here, in order.
            conn.execute("COMMIT")
            self._ro = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open WAL {self.path}: {exc}") from None
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def commit(self, batch: Batch) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            r.seq,
                            r.id,
                            r.time,
                            r.agent_id,
                            r.tool,
                            r.effect,
                            r.code,
                            r.approval_id,
                            r.action_type,
                            r.body,
                            r.record_hash,
                        )
                        for r in batch.records
                    ],
                )
                conn.executemany("INSERT INTO requests VALUES (?,?)", batch.request_args)
                for a in batch.approvals:
                    cols = [c for c in _APPROVAL_COLS if c in a]
                    conn.execute(
                        f"INSERT INTO approvals ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
                        f"ON CONFLICT(id) DO UPDATE SET {','.join(f'{c}=excluded.{c}' for c in cols if c != 'id')}",
                        [a[c] for c in cols],
                    )
                if batch.checkpoint is not None:
                    c = batch.checkpoint
                    conn.execute(
                        "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?)",
                        (c.seq, c.head_hash, c.time, c.kind, c.key_fingerprint, c.public_key, c.signature),
                    )
                conn.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", list(batch.meta.items()))
                if self.fault_hook is not None:
                    self.fault_hook()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"WAL commit failed: {exc}") from None

    def maintenance(self, now: float | None = None) -> bool:
        """Housekeeping on the writer's connection, between commits (never inside one):

        1. retention: delete the `requests` rows (redacted args kept for replay) of records older than
           `retention_seconds`, in transactions of RETENTION_BATCH rows (`secure_delete` zeroes the freed
           pages), at most RETENTION_MAX_BATCHES per call. DPRs themselves are never deleted.
        2. fold the -wal file into the database without blocking readers (PASSIVE).

        Returns True when old rows are left for the next call."""
        import time as _time

        conn = self._conn
        if conn is None:
            return False
        more = False
        try:
            cutoff = retention_cutoff(_time.time() if now is None else now, self.retention_seconds)
            # O(log n) through the time index, however many old records (never deleted) there are.
            row = conn.execute(
                "SELECT seq FROM records WHERE time < ? ORDER BY time DESC LIMIT 1", (cutoff,)
            ).fetchone()
            last_old = row[0] if row else None
            if (
                last_old is not None
                and conn.execute("SELECT 1 FROM requests WHERE seq <= ? LIMIT 1", (last_old,)).fetchone()
            ):
                conn.execute("PRAGMA secure_delete=ON")
                for _ in range(RETENTION_MAX_BATCHES):
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        deleted = conn.execute(
                            "DELETE FROM requests WHERE seq IN (SELECT q.seq FROM requests q "
                            "JOIN records r ON r.seq = q.seq WHERE q.seq <= ? AND r.time < ? "
                            "ORDER BY q.seq LIMIT ?)",
                            (last_old, cutoff, RETENTION_BATCH),
                        ).rowcount
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                    if deleted < RETENTION_BATCH:
                        break
                else:
                    more = True
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise StoreError(f"WAL maintenance failed: {exc}") from None
        return more

    def _reader(self) -> sqlite3.Connection:
        assert self._ro is not None
        return self._ro

    def head(self) -> StoredRecord | None:
        with self._read_lock:
            row = self._reader().execute("SELECT * FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return StoredRecord(*row) if row else None

    def records(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[StoredRecord]:
        """Stream records in seq order with a connection of its own (safe beside the writer)."""
        conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            cur = conn.execute(
                "SELECT * FROM records WHERE seq >= ? AND seq <= ? ORDER BY seq",
                (from_seq, to_seq if to_seq is not None else 2**62),
            )
            while rows := cur.fetchmany(4096):
                for row in rows:
                    yield StoredRecord(*row)
        finally:
            conn.close()

    def record_by_id(self, record_id: str) -> StoredRecord | None:
        with self._read_lock:
            row = self._reader().execute("SELECT * FROM records WHERE id = ?", (record_id,)).fetchone()
        return StoredRecord(*row) if row else None

    def checkpoints(self) -> list[Checkpoint]:
        with self._read_lock:
            rows = self._reader().execute("SELECT * FROM checkpoints ORDER BY seq").fetchall()
        return [Checkpoint(*r) for r in rows]

    def approvals(self) -> list[dict[str, Any]]:
        with self._read_lock:
            rows = self._reader().execute(f"SELECT {','.join(_APPROVAL_COLS)} FROM approvals").fetchall()
        return [dict(zip(_APPROVAL_COLS, r, strict=True)) for r in rows]

    def request_args(self, seq: int) -> bytes | None:
        with self._read_lock:
            row = self._reader().execute("SELECT args FROM requests WHERE seq = ?", (seq,)).fetchone()
        return bytes(row[0]) if row else None

    def close(self) -> None:
        for conn in (self._ro, self._conn):
            if conn is not None:
                conn.close()
        self._ro = self._conn = None


# ---- read-only access for the audit commands (`faramesh audit …`, `explain`, `plan --since`)

_RECORD_COLS = "seq, id, time, agent_id, tool, effect, code, approval_id, action_type, body, record_hash"
_CHECKPOINT_COLS = "seq, head_hash, time, kind, key_fingerprint, public_key, signature"


class NotAWal(StoreError):
    code = "WAL_UNREADABLE"


def _blob(value: Any) -> bytes:
    """A body column as bytes, whatever storage class it was written with."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return str(value).encode()


def _text(value: Any) -> Any:
    """A text column as str (or None), whatever storage class a damaged file gives it."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _stored(row: tuple[Any, ...]) -> StoredRecord:
    seq, rid, time, agent_id, tool, effect, code, approval_id, action_type, body, record_hash = row[:11]
    t = _text
    return StoredRecord(
        int(seq), t(rid), t(time), t(agent_id), t(tool), t(effect), t(code), t(approval_id), t(action_type),
        _blob(body), str(t(record_hash)),
    )  # fmt: skip


RecordRow = tuple[int, str, str, str | None, str | None, str | None, str | None, str | None, str, bytes, str]
_FETCH = 8192
_CLEAN = (
    "(typeof(seq) = 'integer' AND typeof(id) = 'text' AND typeof(time) = 'text'"
    + "".join(f" AND typeof({c}) IN ('text', 'null')" for c in ("agent_id", "tool", "effect", "code", "approval_id"))
    + " AND typeof(action_type) = 'text' AND typeof(body) = 'blob' AND typeof(record_hash) = 'text')"
)


def _row(row: tuple[Any, ...]) -> RecordRow:
    """A row `_CLEAN` did not vouch for, normalised exactly as `_stored` does."""
    r = _stored(row)
    return (r.seq, r.id, r.time, r.agent_id, r.tool, r.effect, r.code, r.approval_id, r.action_type, r.body,
            r.record_hash)  # fmt: skip


class RecordStream:
    """An iterator of `StoredRecord`s that can instead hand over its rows as plain tuples (`rows()`,
    field order of `StoredRecord`): one or the other, once."""

    __slots__ = ("_records", "_rows")

    def __init__(self, rows: Iterator[RecordRow]) -> None:
        self._rows: Iterator[RecordRow] | None = rows
        self._records: Iterator[StoredRecord] | None = None

    def rows(self) -> Iterator[RecordRow]:
        rows = self._rows
        if rows is None or self._records is not None:
            raise RuntimeError("this record stream is already being read")
        self._rows = None
        return rows

    def __iter__(self) -> RecordStream:
        return self

    def __next__(self) -> StoredRecord:
        if self._records is None:
            rows = self._rows
            if rows is None:
                raise RuntimeError("this record stream was handed over as rows")
            self._records = (StoredRecord(*row) for row in rows)
        return next(self._records)

    def close(self) -> None:
        for it in (self._rows, self._records):
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _lenient(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _checkpoint(row: tuple[Any, ...]) -> Checkpoint:
    seq, head_hash, time, kind, key_fingerprint, public_key, signature = (_text(v) for v in row[:7])
    return Checkpoint(int(seq), str(head_hash), str(time), str(kind), str(key_fingerprint), str(public_key),
                      str(signature))  # fmt: skip


class SqliteReader:
    """A read-only view of a SQLite WAL: it never writes, never takes a write lock, and reads one
    snapshot (a single read transaction held from open to close), so records and checkpoints are
    consistent with each other even while the engine appends.

    A WAL whose `-wal` file is absent belongs to a stopped engine (a running one always has it open):
    it is opened `immutable`, so reading creates no `-wal`/`-shm` file beside it (which, made by
    another user such as root, could later stop the engine from opening its own WAL). Otherwise it is
    opened `mode=ro` and takes part in SQLite's WAL locking like any reader."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise NotAWal(f"no WAL at {path}")
        wal_file = path.with_name(path.name + "-wal")
        uri = path.resolve().as_uri() + ("?mode=ro" if wal_file.exists() else "?mode=ro&immutable=1")
        try:
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._conn.execute("BEGIN")
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
            self._conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()
            self._conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            self.close()
            raise NotAWal(f"{path} is not a readable Faramesh WAL ({exc})") from None
        self.meta: dict[str, str] = {str(k): str(v) for k, v in rows}
        version = self.meta.get("schema_version", "0")
        if not version.isdigit() or int(version) > SCHEMA_VERSION:
            self.close()
            raise SchemaTooNew(f"{path} has WAL schema {version}, newer than this faramesh's {SCHEMA_VERSION}")
        self.chain_id = self.meta.get("chain_id", "")

    def __enter__(self) -> SqliteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None  # type: ignore[assignment]

    def _all(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "decode" not in str(exc) or self._conn.text_factory is _lenient:
                raise
            self._conn.text_factory = _lenient
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    # records
    def bounds(self) -> tuple[int, int, int]:
        """(count, first seq, last seq); zeros for an empty chain."""
        row = self._one("SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM records")
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def records(self, from_seq: int = 1, to_seq: int | None = None) -> RecordStream:
        """Records in seq order. Text that is not UTF-8 (a damaged file) is read with replacement
        characters rather than stopping the walk, so the check that follows names the record.

        The stream also offers `rows()`: the same records as plain tuples in `StoredRecord` field order
        (what `verify_chain` walks, without building a dataclass per record)."""
        return RecordStream(self._record_rows(from_seq, to_seq))

    def _record_rows(self, from_seq: int, to_seq: int | None) -> Iterator[RecordRow]:
        last = from_seq - 1
        while True:
            try:
                # `clean`: every column already has the Python type `_stored` would give it (SQLite
                # checks that in C), so the row is used as it is; any other row goes through `_stored`.
                cur = self._conn.execute(
                    f"SELECT {_RECORD_COLS}, {_CLEAN} FROM records WHERE seq > ? AND seq <= ? ORDER BY seq",
                    (last, to_seq if to_seq is not None else 2**62),
                )
                fetch = cur.fetchmany
                while rows := fetch(_FETCH):
                    for row in rows:
                        out = row[:11] if row[11] else _row(row)
                        last = out[0]
                        yield out
                return
            except sqlite3.OperationalError as exc:
                if "decode" not in str(exc) or self._conn.text_factory is _lenient:
                    raise
                self._conn.text_factory = _lenient  # for the rest of this reader's life: rare, and slower

    def record_at(self, seq: int) -> StoredRecord | None:
        row = self._one(f"SELECT {_RECORD_COLS} FROM records WHERE seq = ?", (seq,))
        return _stored(row) if row else None

    def record_by_id(self, record_id: str) -> StoredRecord | None:
        row = self._one(f"SELECT {_RECORD_COLS} FROM records WHERE id = ?", (record_id,))
        return _stored(row) if row else None

    def tail(
        self,
        n: int,
        *,
        agent_id: str | None = None,
        effect: str | None = None,
        tool_glob: str | None = None,
        action_type: str | None = None,
    ) -> list[StoredRecord]:
        """The last `n` records matching every filter given, oldest first. `tool_glob`: `*` wildcards,
        case-insensitive (tool ids are canonical and contain no other glob characters)."""
        where: list[str] = []
        params: list[Any] = []
        if agent_id is not None:
            where.append("agent_id = ?")
            params.append(agent_id)
        if effect is not None:
            where.append("effect = ?")
            params.append(effect.upper())
        if tool_glob is not None:
            where.append("lower(tool) GLOB ?")
            params.append(tool_glob.lower().replace("[", "[[]").replace("?", "[?]"))
        if action_type is not None:
            where.append("action_type = ?")
            params.append(action_type)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._all(f"SELECT {_RECORD_COLS} FROM records {clause} ORDER BY seq DESC LIMIT ?", (*params, max(0, n)))
        return [_stored(r) for r in reversed(rows)]

    def records_since(
        self,
        since_time: str,
        *,
        agent_id: str | None = None,
        before_seq: int | None = None,
        action_type: str | None = None,
    ) -> Iterator[StoredRecord]:
        """Records whose `time` (RFC 3339, fixed width, so text order is time order) is ≥ since_time."""
        where: list[str] = ["time >= ?"]
        params: list[Any] = [since_time]
        if agent_id is not None:
            where.append("agent_id = ?")
            params.append(agent_id)
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        if action_type is not None:
            where.append("action_type = ?")
            params.append(action_type)
        cur = self._conn.execute(f"SELECT {_RECORD_COLS} FROM records WHERE {' AND '.join(where)} ORDER BY seq", params)
        while rows := cur.fetchmany(4096):
            for row in rows:
                yield _stored(row)

    def tool_calls_since(self, since_time: str) -> Iterator[tuple[StoredRecord, bytes | None]]:
        """`tool_call` records with `time` ≥ since_time and their stored (redacted) args, in seq order."""
        cols = ", ".join(f"r.{c.strip()}" for c in _RECORD_COLS.split(","))
        cur = self._conn.execute(
            f"SELECT {cols}, q.args FROM records r LEFT JOIN requests q ON q.seq = r.seq "
            "WHERE r.time >= ? AND r.action_type = 'tool_call' ORDER BY r.seq",
            (since_time,),
        )
        while rows := cur.fetchmany(4096):
            for row in rows:
                yield _stored(row[:11]), (_blob(row[11]) if row[11] is not None else None)

    def request_args(self, seq: int) -> bytes | None:
        row = self._one("SELECT args FROM requests WHERE seq = ?", (seq,))
        return _blob(row[0]) if row else None

    # checkpoints
    def checkpoints(self) -> list[Checkpoint]:
        rows = self._all(f"SELECT {_CHECKPOINT_COLS} FROM checkpoints ORDER BY seq")
        return [_checkpoint(r) for r in rows]

    def checkpoint_covering(self, seq: int) -> Checkpoint | None:
        """The first checkpoint at or after `seq`: the one whose signature covers that record."""
        row = self._one(f"SELECT {_CHECKPOINT_COLS} FROM checkpoints WHERE seq >= ? ORDER BY seq LIMIT 1", (seq,))
        return _checkpoint(row) if row else None

    def backup_to(self, target: sqlite3.Connection) -> None:
        """SQLite's online backup of this snapshot into `target` (one step: a consistent copy)."""
        self._conn.backup(target)
