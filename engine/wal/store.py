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

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA foreign_keys=ON")
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
            self._ro = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
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

    def _reader(self) -> sqlite3.Connection:
        assert self._ro is not None
        return self._ro

    def head(self) -> StoredRecord | None:
        with self._read_lock:
            row = self._reader().execute("SELECT * FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return StoredRecord(*row) if row else None

    def records(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[StoredRecord]:
        """Stream records in seq order with a connection of its own (safe beside the writer)."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
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
