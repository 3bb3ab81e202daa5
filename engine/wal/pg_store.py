"""The PostgreSQL WAL store (fleet: several engines, one database) and its read-only audit reader.

Same interface and guarantees as `SqliteStore`/`SqliteReader` (engine/wal/store.py): one `Batch` is one
transaction, a reply follows its COMMIT, the stored canonical bytes come back byte for byte, schema
versions only move forward and a newer one is refused. This module imports psycopg at import time, so
the engine imports it only when the policy says `runtime { backend = "postgres" }`.

Fleet layout: every engine instance owns one chain (`chain_id`); all tables are keyed by it, so several
engines share a database and each keeps its own gap-free chain (`PRIMARY KEY (chain_id, seq)`).

- **One writer per chain.** The writer session holds a session-level advisory lock derived from
  (schema, chain_id) for its whole life; a second engine with the same chain id is refused
  (`WAL_CHAIN_LOCKED`). The lock is the session's: if the connection dies, the lock goes with it and is
  taken again on reconnect.
- **Fencing.** `chains.head_seq` is advanced by a compare-and-set in the same transaction as the
  records, so a batch is appended exactly at the head the writer believes in or not at all
  (`WAL_CHAIN_DIVERGED`): no gap, no fork, even if a lock were lost and another writer slipped in.
- **Durability.** `wal_sync = "full"` → `synchronous_commit = on` (the server flushes, and waits for
  synchronous standbys, before COMMIT returns); `"normal"` → `off` (a kill -9 of the engine loses
  nothing that was answered, a crash of the database server may lose the last few hundred ms).
- **No hang.** Connects are bounded by `connect_timeout`; every statement by a client-side deadline (a
  watchdog shuts the socket down, which also covers a frozen server that still ACKs TCP) and by
  `statement_timeout`, `lock_timeout` and TCP keepalives/`tcp_user_timeout`. The server is told to
  drop a vanished engine's session quickly (server-side keepalives), which releases its chain lock.
- **A lost COMMIT acknowledgment** is settled before the commit is reported failed: the store
  reconnects, takes the chain lock again — which proves the old session (and its transaction) is over —
  and looks for the batch's last record. Present: the commit succeeded. Absent: it failed. Unknown
  (database unreachable): reported as failed, and if it in fact committed, the next commit's
  compare-and-set refuses to fork the chain until the engine restarts and re-verifies.

Fleet budgets (`budget … { scope = "fleet" }`) live in the same database and schema: `FleetBudgets`, at
the end of this module, grants or refuses each reservation in one transaction on a session of its own.

Errors are `StoreError` subclasses with stable codes; their messages never carry the URL's password.
PostgreSQL 12 or newer (`tcp_user_timeout`). The role needs CREATE on the schema at the first start (or
a DBA runs that start), then SELECT/INSERT/UPDATE on the tables and DELETE on `requests` (retention);
records are only ever inserted.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import math
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from faramesh.engine.policy.limits import (
    EXPIRED,
    GRANTED,
    REFUSED,
    SETTLED,
    UNAVAILABLE,
    UNKNOWN,
    FleetClaim,
    FleetOutcome,
    FleetSettlement,
    FleetUsage,
)
from faramesh.engine.wal.store import (
    _APPROVAL_COLS,
    DEFAULT_REPLAY_RETENTION,
    RETENTION_BATCH,
    RETENTION_MAX_BATCHES,
    Batch,
    Checkpoint,
    NotAWal,
    RecordRow,
    RecordStream,
    SchemaTooNew,
    StoredRecord,
    StoreError,
    retention_cutoff,
)
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

PG_SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "faramesh"
CONNECT_TIMEOUT_S = 5.0
OP_TIMEOUT_S = 10.0
LOCK_WAIT_S = 5.0  # how long a (re)connecting writer waits for its chain lock
PAGE = 4096
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SYNC = {"full": "on", "normal": "off"}

Conn = psycopg.Connection[TupleRow]
_T = TypeVar("_T")


class StoreUnavailable(StoreError):
    """The database cannot be reached, the connection was lost, or an operation ran past its deadline."""

    code = "WAL_UNAVAILABLE"


class ChainLocked(StoreError):
    """Another session (another engine with the same chain id) holds this chain's writer lock."""

    code = "WAL_CHAIN_LOCKED"


class ChainDiverged(StoreError):
    """The chain in the database does not end where this writer expects: never append (fork) there."""

    code = "WAL_CHAIN_DIVERGED"


class ChainAmbiguous(NotAWal):
    """A reader was not told which chain to read and the database holds several."""

    code = "WAL_CHAIN_AMBIGUOUS"


# Forward-only migrations: MIGRATIONS[v] takes the schema from version v to v + 1. `{s}` is the schema.
MIGRATIONS: dict[int, list[str]] = {}

_DDL = [
    "CREATE TABLE IF NOT EXISTS {s}.schema_version ("
    " singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), version integer NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {s}.chains ("
    " chain_id text PRIMARY KEY, head_seq bigint NOT NULL DEFAULT 0 CHECK (head_seq >= 0),"
    " head_hash text NOT NULL DEFAULT '', created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS {s}.meta ("
    " chain_id text NOT NULL, key text NOT NULL, value text NOT NULL, PRIMARY KEY (chain_id, key))",
    "CREATE TABLE IF NOT EXISTS {s}.records ("
    " chain_id text NOT NULL, seq bigint NOT NULL CHECK (seq > 0), id text NOT NULL, time text NOT NULL,"
    " agent_id text, tool text, effect text, code text, approval_id text, action_type text NOT NULL,"
    " body bytea NOT NULL, record_hash text NOT NULL,"
    " PRIMARY KEY (chain_id, seq), UNIQUE (chain_id, id))",
    "CREATE INDEX IF NOT EXISTS records_time ON {s}.records (chain_id, time)",
    "CREATE TABLE IF NOT EXISTS {s}.requests ("
    " chain_id text NOT NULL, seq bigint NOT NULL, args bytea NOT NULL, PRIMARY KEY (chain_id, seq))",
    "CREATE TABLE IF NOT EXISTS {s}.checkpoints ("
    " chain_id text NOT NULL, seq bigint NOT NULL, head_hash text NOT NULL, time text NOT NULL,"
    " kind text NOT NULL, key_fingerprint text NOT NULL, public_key text NOT NULL, signature text NOT NULL,"
    " PRIMARY KEY (chain_id, seq))",
    "CREATE TABLE IF NOT EXISTS {s}.approvals ("
    " chain_id text NOT NULL, id text NOT NULL, status text NOT NULL, agent_id text NOT NULL,"
    " tool text NOT NULL, args_hmac text NOT NULL, created_at text NOT NULL, expires_at bigint NOT NULL,"
    " resolved_at text, approver text, reason text, action_id text, used_by text, args_digest text,"
    " PRIMARY KEY (chain_id, id))",
]
_RECORD_COLS = "seq, id, time, agent_id, tool, effect, code, approval_id, action_type, body, record_hash"
_CHECKPOINT_COLS = "seq, head_hash, time, kind, key_fingerprint, public_key, signature"


def _lock_key(domain: str, *parts: str) -> int:
    """A signed 64-bit advisory-lock key, domain-separated so it cannot collide with another use."""
    digest = hashlib.sha256("\x00".join(("faramesh.wal", domain, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def load_or_create_chain_id(path: Path, make_id: Callable[[], str]) -> str:
    """This host's chain id for a stack (kept in its state dir beside the signing key): created once
    (O_EXCL, 0600, never through a symlink) so a restarted engine continues its own chain."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        chain_id = make_id()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another process created it meanwhile: use theirs
            return load_or_create_chain_id(path, make_id)
        try:
            os.write(fd, chain_id.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return chain_id
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    chain_id = raw.decode("utf-8", "replace").strip()
    if not chain_id:
        raise StoreError(f"{path} is empty: it should hold this engine's WAL chain id")
    return chain_id


# ------------------------------------------------------------------------------------ the watchdog


@dataclass(eq=False)
class _Arm:
    deadline: float
    conn: Conn
    fired: bool = False


class _Watchdog:
    """Client-side deadlines: a thread that shuts down the socket of a connection whose guarded call
    runs past its deadline. libpq then sees the connection closed and the call raises at once, even
    when the server is frozen (SIGSTOP, a wedged host) and its kernel keeps the TCP session alive,
    which neither `statement_timeout` nor keepalives can catch. Severing happens under the lock that
    disarming takes, so a connection is never touched after its owner left the guard (and may close it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: set[_Arm] = set()
        self._wakes_at = math.inf
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, conn: Conn, deadline: float) -> Iterator[_Arm]:
        arm = _Arm(deadline, conn)
        with self._cond:
            self._armed.add(arm)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wal-pg-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wakes_at:  # deadlines mostly grow: the thread is rarely woken
                self._cond.notify()
        try:
            yield arm
        finally:
            with self._cond:
                self._armed.discard(arm)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for arm in [a for a in self._armed if a.deadline <= now]:
                    self._armed.discard(arm)
                    arm.fired = True
                    _sever(arm.conn)
                self._wakes_at = min((a.deadline for a in self._armed), default=math.inf)
                self._cond.wait(None if self._wakes_at == math.inf else self._wakes_at - now)


def _sever(conn: Conn) -> None:
    try:
        fd = conn.fileno()
    except (psycopg.Error, ValueError):
        return
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


_WATCHDOG = _Watchdog()


def _broken(conn: Conn) -> bool:
    return conn.closed or conn.broken


def _stale(conn: Conn) -> bool:
    """An idle session whose socket has something to read was ended by the server (terminated, server
    shut down: a FATAL message or EOF is waiting). Found before a batch starts, it costs one reconnect
    instead of a failed batch, and a commit never begins on a session that is already gone."""
    if _broken(conn):
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _close(conn: Conn | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


# ------------------------------------------------------------------------------------ connections


class _Database:
    """Where and how to connect; turns psycopg errors into typed `StoreError`s without the password."""

    def __init__(
        self,
        url: str,
        schema: str,
        *,
        application_name: str,
        connect_timeout: float,
        op_timeout: float,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise StoreError(f"schema {schema!r} is not a plain lower-case SQL identifier")
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error:
            raise StoreError("postgres_url is not a valid PostgreSQL URL or connection string") from None
        self.url = url
        self.schema = schema
        self.s = f'"{schema}"'
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self.application_name = application_name[:63]
        self._secret = str(params.get("password") or "")
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        port = str(params.get("port") or "5432")
        dbname = str(params.get("dbname") or params.get("user") or "")
        self.where = f"postgresql://{host}:{port}/{dbname} (schema {schema})"

    def sql(self, text: str) -> str:
        return text.replace("{s}", self.s)

    def deadline(self) -> float:
        return time.monotonic() + self.op_timeout

    def clean(self, exc: BaseException) -> str:
        """One line of the error, with the password (should a message ever echo it) masked."""
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        text = lines[0] if lines else type(exc).__name__
        if isinstance(exc, psycopg.Error) and exc.sqlstate:
            text = f"{text} [{exc.sqlstate}]"
        return text.replace(self._secret, "***") if self._secret else text

    def failure(
        self, what: str, exc: BaseException, *, timed_out: bool = False, conn: Conn | None = None
    ) -> StoreError:
        if timed_out:
            return StoreUnavailable(f"{what}: no answer from {self.where} within {self.op_timeout:g}s")
        lost = isinstance(exc, psycopg.OperationalError) or (conn is not None and _broken(conn))
        cls = StoreUnavailable if lost else StoreError
        return cls(f"{what} ({self.where}): {self.clean(exc)}")

    def connect(self, *, autocommit: bool, settings: dict[str, str], deadline: float) -> tuple[Conn, dict[str, str]]:
        """A connection with `settings` applied for the session; returns what the server confirmed."""
        remaining = max(0.0, deadline - time.monotonic())
        timeout = max(2, math.ceil(min(self.connect_timeout, remaining or self.connect_timeout)))
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=autocommit,
                connect_timeout=timeout,
                application_name=self.application_name,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=3,
                keepalives_count=3,
                tcp_user_timeout=int(self.op_timeout * 1000),
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to the PostgreSQL WAL at {self.where}: {self.clean(exc)}") from None
        names = list(settings)
        try:
            with _WATCHDOG.guard(conn, deadline) as arm:
                query = "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in names)
                params: list[str] = []
                for name in names:
                    params += [name, settings[name]]
                row = conn.execute(query, params).fetchone()
                if not autocommit:
                    conn.commit()
        except psycopg.Error as exc:
            _close(conn)
            raise self.failure("cannot set up the WAL session", exc, timed_out=arm.fired, conn=conn) from None
        assert row is not None
        return conn, dict(zip(names, (str(v) for v in row), strict=True))

    @property
    def op_ms(self) -> str:
        return str(max(1, int(self.op_timeout * 1000)))

    def session_settings(self, *, read_only: bool) -> dict[str, str]:
        settings = {
            "statement_timeout": self.op_ms,
            "lock_timeout": self.op_ms,
            # the server drops a vanished engine's session (and so its chain lock) within ~20 s
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "3",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": self.op_ms,
        }
        if read_only:
            settings["default_transaction_read_only"] = "on"
        return settings


# ------------------------------------------------------------------------------------ the store


def _has_content(batch: Batch) -> bool:
    return bool(batch.records or batch.request_args or batch.approvals or batch.checkpoint or batch.meta)


class PgStore:
    """The engine's WAL in PostgreSQL: the `Store` interface of engine/wal/store.py for one chain."""

    def __init__(
        self,
        url: str,
        chain_id: str,
        sync: str = "full",
        *,
        schema: str = DEFAULT_SCHEMA,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        op_timeout: float = OP_TIMEOUT_S,
        lock_wait: float = LOCK_WAIT_S,
    ) -> None:
        if sync not in _SYNC:
            raise StoreError(f'wal_sync must be "full" or "normal", not {sync!r}')
        if not chain_id or len(chain_id) > 200 or not chain_id.isprintable():
            raise StoreError("the chain id must be 1-200 printable characters")
        self.chain_id = chain_id
        self.sync = sync
        self.lock_wait = lock_wait
        self.db = _Database(
            url,
            schema,
            application_name=f"faramesh-wal {chain_id}",
            connect_timeout=connect_timeout,
            op_timeout=op_timeout,
        )
        self.description = f"postgres {self.db.where} chain {chain_id} (synchronous_commit={_SYNC[sync]})"
        self.retention_seconds: float = DEFAULT_REPLAY_RETENTION
        self.fault_hook: Callable[[], None] | None = None  # tests: runs inside the transaction, before COMMIT
        self.in_doubt_hook: Callable[[], None] | None = None  # tests: runs before an in-doubt commit is settled
        self.session_settings: dict[str, str] = {}  # what the server confirmed for the writer session
        self._lock_key = _lock_key("chain", schema, chain_id)
        self._ddl_key = _lock_key("ddl", schema)
        self._writer_conn: Conn | None = None
        self._reader_conn: Conn | None = None
        self._read_lock = threading.Lock()
        sql = self.db.sql
        self._sql = {
            "cas": sql("UPDATE {s}.chains SET head_seq = %s, head_hash = %s WHERE chain_id = %s AND head_seq = %s"),
            "record": sql(f"INSERT INTO {{s}}.records (chain_id, {_RECORD_COLS}) VALUES ({', '.join(['%s'] * 12)})"),
            "request": sql("INSERT INTO {s}.requests (chain_id, seq, args) VALUES (%s, %s, %s)"),
            "checkpoint": sql(
                f"INSERT INTO {{s}}.checkpoints (chain_id, {_CHECKPOINT_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (chain_id, seq) DO UPDATE SET head_hash = excluded.head_hash, time = excluded.time, "
                "kind = excluded.kind, key_fingerprint = excluded.key_fingerprint, "
                "public_key = excluded.public_key, signature = excluded.signature"
            ),
            "meta": sql(
                "INSERT INTO {s}.meta (chain_id, key, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (chain_id, key) DO UPDATE SET value = excluded.value"
            ),
        }

    # ---- connections
    @property
    def writer_backend_pid(self) -> int | None:
        """The server process of the writer session (what holds the chain lock), for operators and tests."""
        conn = self._writer_conn
        return None if conn is None or _broken(conn) else conn.info.backend_pid

    def _writer(self, deadline: float) -> Conn:
        """The writer session, reconnected when lost; holding it means holding the chain lock."""
        conn = self._writer_conn
        if conn is not None and not _stale(conn):
            return conn
        self._discard_writer()
        settings = {
            **self.db.session_settings(read_only=False),
            "synchronous_commit": _SYNC[self.sync],
            "idle_in_transaction_session_timeout": str(int(max(60.0, 6 * self.db.op_timeout) * 1000)),
            "lock_timeout": str(max(1, int(self.lock_wait * 1000))),  # for the chain lock; then op_timeout
        }
        conn, confirmed = self.db.connect(autocommit=False, settings=settings, deadline=deadline)
        arm: _Arm | None = None
        try:
            with _WATCHDOG.guard(conn, max(deadline, time.monotonic() + self.lock_wait + 1)) as arm:
                # Blocking, bounded by lock_timeout: right after a connection loss the old session may
                # still be exiting (it releases the lock as it goes), so a short wait is expected.
                conn.execute("SELECT pg_advisory_lock(%s)", (self._lock_key,))
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (self.db.op_ms,))
                conn.commit()
        except psycopg.errors.LockNotAvailable:
            _close(conn)
            raise ChainLocked(
                f"chain {self.chain_id} in {self.db.where} is held by another session (another engine with this "
                f"chain id?); waited {self.lock_wait:g}s for its writer lock"
            ) from None
        except psycopg.Error as exc:
            _close(conn)
            raise self.db.failure("cannot take the chain's writer lock", exc, timed_out=bool(arm and arm.fired),
                                  conn=conn) from None  # fmt: skip
        confirmed["lock_timeout"] = self.db.op_ms
        self.session_settings = confirmed
        self._writer_conn = conn
        return conn

    def _discard_writer(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        _close(conn)

    def _reader(self, deadline: float) -> Conn:
        conn = self._reader_conn
        if conn is not None and not _stale(conn):
            return conn
        _close(conn)
        self._reader_conn = None
        conn, _ = self.db.connect(autocommit=True, settings=self.db.session_settings(read_only=True), deadline=deadline)
        self._reader_conn = conn
        return conn

    def _rollback(self, conn: Conn) -> None:
        if _broken(conn):
            return
        try:
            conn.rollback()
        except psycopg.Error:
            _close(conn)

    # ---- open
    def open(self) -> dict[str, str]:
        deadline = self.db.deadline()
        conn = self._writer(deadline)
        arm: _Arm | None = None
        try:
            with _WATCHDOG.guard(conn, deadline) as arm:
                try:
                    meta = self._open_in_transaction(conn)
                    conn.commit()
                except BaseException:
                    self._rollback(conn)
                    raise
        except psycopg.Error as exc:
            self.close()
            raise self.db.failure("cannot open the PostgreSQL WAL", exc, timed_out=bool(arm and arm.fired),
                                  conn=conn) from None  # fmt: skip
        except StoreError:
            self.close()
            raise
        with self._read_lock:
            self._reader(deadline)
        return meta

    def _open_in_transaction(self, conn: Conn) -> dict[str, str]:
        db = self.db
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._ddl_key,))  # concurrent first starts
        exists = conn.execute("SELECT to_regclass(%s)", (f"{db.s}.schema_version",)).fetchone()
        version: int | None = None
        if exists is not None and exists[0] is not None:
            row = conn.execute(db.sql("SELECT version FROM {s}.schema_version")).fetchone()
            version = int(row[0]) if row else None
        if version is not None and version > PG_SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{db.where} has WAL schema {version}, newer than this engine's {PG_SCHEMA_VERSION}; upgrade faramesh"
            )
        if version is None:
            # Only when absent: CREATE SCHEMA checks the database-level CREATE privilege even with IF NOT
            # EXISTS, and a DBA may have created the schema for a role that lacks it.
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (db.schema,)).fetchone() is None:
                conn.execute(db.sql("CREATE SCHEMA {s}"))
            for ddl in _DDL:
                conn.execute(db.sql(ddl))
            conn.execute(
                db.sql("INSERT INTO {s}.schema_version (version) VALUES (%s) ON CONFLICT DO NOTHING"),
                (PG_SCHEMA_VERSION,),
            )
        else:
            for step in range(version, PG_SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(db.sql(statement))
                conn.execute(db.sql("UPDATE {s}.schema_version SET version = %s"), (step + 1,))
        conn.execute(db.sql("INSERT INTO {s}.chains (chain_id) VALUES (%s) ON CONFLICT DO NOTHING"), (self.chain_id,))
        conn.execute(
            db.sql("INSERT INTO {s}.meta VALUES (%s, 'chain_id', %s) ON CONFLICT DO NOTHING"),
            (self.chain_id, self.chain_id),
        )
        head = conn.execute(
            db.sql("SELECT head_seq, head_hash FROM {s}.chains WHERE chain_id = %s"), (self.chain_id,)
        ).fetchone()
        last = conn.execute(
            db.sql("SELECT seq, record_hash FROM {s}.records WHERE chain_id = %s ORDER BY seq DESC LIMIT 1"),
            (self.chain_id,),
        ).fetchone()
        assert head is not None
        actual = (int(last[0]), str(last[1])) if last else (0, "")
        if (int(head[0]), str(head[1])) != actual:
            raise ChainDiverged(
                f"chain {self.chain_id} in {db.where}: its head is seq {head[0]} but the last stored record is seq "
                f"{actual[0]}{' with another hash' if head[0] == actual[0] else ''}: records were removed or "
                "written behind the engine's back"
            )
        rows = conn.execute(db.sql("SELECT key, value FROM {s}.meta WHERE chain_id = %s"), (self.chain_id,)).fetchall()
        meta = {str(k): str(v) for k, v in rows}
        meta["schema_version"] = str(PG_SCHEMA_VERSION)
        return meta

    # ---- commit
    def commit(self, batch: Batch) -> None:
        if not _has_content(batch):
            return
        if batch.records:
            seqs = [r.seq for r in batch.records]
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                raise StoreError(f"a batch must hold consecutive seqs, got {seqs[0]}..{seqs[-1]} with a gap")
        deadline = self.db.deadline()
        conn = self._writer(deadline)
        sent = False
        arm: _Arm | None = None
        try:
            with _WATCHDOG.guard(conn, deadline) as arm:
                try:
                    self._write(conn, batch)
                    if self.fault_hook is not None:
                        self.fault_hook()
                    sent = True
                    conn.commit()
                except BaseException:
                    if not sent:
                        self._rollback(conn)
                    raise
        except psycopg.Error as exc:
            fired = bool(arm and arm.fired)
            lost = _broken(conn) or fired
            if lost:
                self._discard_writer()
            if sent and lost:  # COMMIT was sent and no answer came back: did it happen?
                outcome = self._settle_in_doubt(batch)
                if outcome is True:
                    return
                if outcome is None:
                    raise StoreUnavailable(
                        f"WAL commit outcome unknown ({self.db.where}): {self.db.clean(exc)}; the database could "
                        "not be asked whether it committed (if it did, the next commit refuses to fork the chain)"
                    ) from None
            raise self.db.failure("WAL commit failed", exc, timed_out=fired, conn=conn) from None

    def _write(self, conn: Conn, batch: Batch) -> None:
        """The batch's statements, pipelined (one round trip), the chain-head compare-and-set first."""
        q = self._sql
        chain = self.chain_id
        cas = None
        try:
            with conn.pipeline():
                cur = conn.cursor()
                if batch.records:
                    first, last = batch.records[0], batch.records[-1]
                    cas = conn.execute(q["cas"], (last.seq, last.record_hash, chain, first.seq - 1))
                    cur.executemany(
                        q["record"],
                        [
                            (chain, r.seq, r.id, r.time, r.agent_id, r.tool, r.effect, r.code, r.approval_id,
                             r.action_type, r.body, r.record_hash)
                            for r in batch.records
                        ],
                    )  # fmt: skip
                if batch.request_args:
                    cur.executemany(q["request"], [(chain, seq, args) for seq, args in batch.request_args])
                for a in batch.approvals:
                    cols = [c for c in _APPROVAL_COLS if c in a]
                    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id") or "id = excluded.id"
                    conn.execute(
                        self.db.sql(
                            f"INSERT INTO {{s}}.approvals (chain_id, {', '.join(cols)}) "
                            f"VALUES ({', '.join(['%s'] * (len(cols) + 1))}) "
                            f"ON CONFLICT (chain_id, id) DO UPDATE SET {updates}"
                        ),
                        [chain, *(a[c] for c in cols)],
                    )
                if batch.checkpoint is not None:
                    c = batch.checkpoint
                    conn.execute(
                        q["checkpoint"],
                        (chain, c.seq, c.head_hash, c.time, c.kind, c.key_fingerprint, c.public_key, c.signature),
                    )
                if batch.meta:
                    cur.executemany(q["meta"], [(chain, k, v) for k, v in batch.meta.items()])
        except psycopg.errors.UniqueViolation:
            if batch.records:  # most likely the head moved (the compare-and-set skipped): say so
                self._rollback(conn)
                raise self._diverged(conn, batch.records[0].seq - 1) from None
            raise
        if cas is not None and cas.rowcount != 1:
            self._rollback(conn)
            raise self._diverged(conn, batch.records[0].seq - 1)

    def _diverged(self, conn: Conn, expected: int) -> ChainDiverged:
        row = None
        with contextlib.suppress(psycopg.Error):
            row = conn.execute(
                self.db.sql("SELECT head_seq FROM {s}.chains WHERE chain_id = %s"), (self.chain_id,)
            ).fetchone()
            conn.rollback()
        there = f"seq {row[0]}" if row else "an unknown seq"
        return ChainDiverged(
            f"chain {self.chain_id} in {self.db.where} ends at {there}, but this engine's head is seq {expected}: "
            "another writer appended, or a commit reported as failed did reach the database. Nothing was "
            "written; restart the engine to re-verify and adopt the stored head"
        )

    def _settle_in_doubt(self, batch: Batch) -> bool | None:
        """After a connection loss during COMMIT: True if the batch is stored, False if not, None when the
        database cannot say. Taking the chain lock on a new session proves the old session has ended,
        so its transaction is settled one way or the other."""
        if self.in_doubt_hook is not None:
            self.in_doubt_hook()
        deadline = time.monotonic() + self.lock_wait + self.db.op_timeout
        try:
            conn = self._writer(deadline)
        except StoreError:
            return None
        db = self.db
        arm: _Arm | None = None
        try:
            with _WATCHDOG.guard(conn, deadline) as arm:
                if batch.records:
                    last = batch.records[-1]
                    row = conn.execute(
                        db.sql("SELECT record_hash FROM {s}.records WHERE chain_id = %s AND seq = %s"),
                        (self.chain_id, last.seq),
                    ).fetchone()
                    found = row is not None and row[0] == last.record_hash
                elif batch.checkpoint is not None:
                    cp = batch.checkpoint
                    row = conn.execute(
                        db.sql("SELECT signature FROM {s}.checkpoints WHERE chain_id = %s AND seq = %s"),
                        (self.chain_id, cp.seq),
                    ).fetchone()
                    found = row is not None and row[0] == cp.signature
                else:  # approvals/meta only: upserts, harmless to repeat; report the failure
                    found = False
                conn.rollback()
        except psycopg.Error:
            if _broken(conn) or (arm is not None and arm.fired):
                self._discard_writer()
            return None
        return found

    # ---- housekeeping
    def maintenance(self, now: float | None = None) -> bool:
        """Retention: delete this chain's `requests` rows (redacted args kept for replay) of records
        older than `retention_seconds`, RETENTION_BATCH rows per transaction, at most
        RETENTION_MAX_BATCHES per call (short row locks beside the decisions). DPRs are never deleted;
        autovacuum reclaims the space. Returns True when old rows are left for the next call."""
        cutoff = retention_cutoff(time.time() if now is None else now, self.retention_seconds)
        db = self.db
        delete = db.sql(
            "DELETE FROM {s}.requests WHERE chain_id = %(c)s AND seq IN (SELECT q.seq FROM {s}.requests q "
            "JOIN {s}.records r ON r.chain_id = q.chain_id AND r.seq = q.seq "
            "WHERE q.chain_id = %(c)s AND r.time < %(cut)s ORDER BY q.seq LIMIT %(n)s)"
        )
        for _ in range(RETENTION_MAX_BATCHES):
            deadline = db.deadline()
            conn = self._writer(deadline)
            arm: _Arm | None = None
            try:
                with _WATCHDOG.guard(conn, deadline) as arm:
                    try:
                        deleted = conn.execute(
                            delete, {"c": self.chain_id, "cut": cutoff, "n": RETENTION_BATCH}
                        ).rowcount
                        conn.commit()
                    except BaseException:
                        self._rollback(conn)
                        raise
            except psycopg.Error as exc:
                if _broken(conn) or (arm is not None and arm.fired):
                    self._discard_writer()
                raise db.failure("WAL maintenance failed", exc, timed_out=bool(arm and arm.fired), conn=conn) from None
            if deleted < RETENTION_BATCH:
                return False
        return True

    # ---- reads (their own session: never inside the writer's open transaction)
    def _query(self, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> list[TupleRow]:
        deadline = self.db.deadline()
        with self._read_lock:
            conn = self._reader(deadline)
            arm: _Arm | None = None
            try:
                with _WATCHDOG.guard(conn, deadline) as arm:
                    return conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                fired = bool(arm and arm.fired)
                if _broken(conn) or fired:
                    _close(conn)
                    self._reader_conn = None
                raise self.db.failure("WAL read failed", exc, timed_out=fired, conn=conn) from None

    def head(self) -> StoredRecord | None:
        rows = self._query(
            self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records WHERE chain_id = %s ORDER BY seq DESC LIMIT 1"),
            (self.chain_id,),
        )
        return StoredRecord(*rows[0]) if rows else None

    def records(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[StoredRecord]:
        """Records in seq order, a page at a time (keyset: records never change once written)."""
        sql = self.db.sql(
            f"SELECT {_RECORD_COLS} FROM {{s}}.records WHERE chain_id = %s AND seq >= %s AND seq <= %s "
            f"ORDER BY seq LIMIT {PAGE}"
        )
        start, end = from_seq, to_seq if to_seq is not None else 2**62
        while True:
            rows = self._query(sql, (self.chain_id, start, end))
            for row in rows:
                yield StoredRecord(*row)
            if len(rows) < PAGE:
                return
            start = int(rows[-1][0]) + 1

    def record_by_id(self, record_id: str) -> StoredRecord | None:
        rows = self._query(
            self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records WHERE chain_id = %s AND id = %s"),
            (self.chain_id, record_id),
        )
        return StoredRecord(*rows[0]) if rows else None

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._query(
            self.db.sql(f"SELECT {_CHECKPOINT_COLS} FROM {{s}}.checkpoints WHERE chain_id = %s ORDER BY seq"),
            (self.chain_id,),
        )
        return [Checkpoint(*r) for r in rows]

    def approvals(self) -> list[dict[str, Any]]:
        rows = self._query(
            self.db.sql(f"SELECT {', '.join(_APPROVAL_COLS)} FROM {{s}}.approvals WHERE chain_id = %s"),
            (self.chain_id,),
        )
        return [dict(zip(_APPROVAL_COLS, r, strict=True)) for r in rows]

    def request_args(self, seq: int) -> bytes | None:
        rows = self._query(
            self.db.sql("SELECT args FROM {s}.requests WHERE chain_id = %s AND seq = %s"), (self.chain_id, seq)
        )
        return bytes(rows[0][0]) if rows else None

    def close(self) -> None:
        """Closing the writer session releases the chain lock."""
        self._discard_writer()
        with self._read_lock:
            _close(self._reader_conn)
            self._reader_conn = None


# ------------------------------------------------------------------------------------ the reader


def _like(glob: str) -> str:
    """A `*`-wildcard glob as a LIKE pattern (backslash escapes LIKE's own wildcards)."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


class PgReader:
    """A read-only view of one chain, for `faramesh audit verify|tail|show|export` and `explain`: the
    `SqliteReader` interface (except `backup_to`: back a PostgreSQL WAL up with `pg_dump`). It reads one
    snapshot (a REPEATABLE READ, READ ONLY transaction from open to close), so records and checkpoints
    agree with each other while engines append, and it never takes a lock an engine waits for.

    `chain_id` None reads the only chain in the database (several: `WAL_CHAIN_AMBIGUOUS`, listing them)."""

    def __init__(
        self,
        url: str,
        chain_id: str | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        op_timeout: float = 60.0,
    ) -> None:
        self.db = _Database(url, schema, application_name="faramesh-audit", connect_timeout=connect_timeout,
                            op_timeout=op_timeout)  # fmt: skip
        self._conn: Conn | None = None
        conn, _ = self.db.connect(autocommit=False, settings=self.db.session_settings(read_only=True),
                                  deadline=self.db.deadline())  # fmt: skip
        self._conn = conn
        try:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            self._start(chain_id)
        except BaseException:
            self.close()
            raise

    def _start(self, chain_id: str | None) -> None:
        db = self.db
        exists = self._one("SELECT to_regclass(%s)", (f"{db.s}.schema_version",))
        if exists is None or exists[0] is None:
            raise NotAWal(f"no Faramesh WAL at {db.where}")
        row = self._one(db.sql("SELECT version FROM {s}.schema_version"))
        version = int(row[0]) if row else 0
        if version > PG_SCHEMA_VERSION:
            raise SchemaTooNew(f"{db.where} has WAL schema {version}, newer than this faramesh's {PG_SCHEMA_VERSION}")
        chains = [str(r[0]) for r in self._all(db.sql("SELECT chain_id FROM {s}.chains ORDER BY chain_id"))]
        if chain_id is None:
            if not chains:
                raise NotAWal(f"{db.where} holds no chain yet")
            if len(chains) > 1:
                raise ChainAmbiguous(
                    f"{db.where} holds {len(chains)} chains ({', '.join(chains[:10])}"
                    f"{', …' if len(chains) > 10 else ''}); say which one to read"
                )
            chain_id = chains[0]
        elif chain_id not in chains:
            raise NotAWal(f"no chain {chain_id} at {db.where}")
        self.chain_id: str = chain_id
        rows = self._all(db.sql("SELECT key, value FROM {s}.meta WHERE chain_id = %s"), (chain_id,))
        self.meta: dict[str, str] = {str(k): str(v) for k, v in rows}
        self.meta["schema_version"] = str(version)
        self.chains = chains
        self.path = f"{db.where} chain {chain_id}"

    def __enter__(self) -> PgReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        _close(conn)

    def _all(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[TupleRow]:
        conn = self._conn
        if conn is None:
            raise StoreError("this WAL reader is closed")
        deadline = self.db.deadline()
        arm: _Arm | None = None
        try:
            with _WATCHDOG.guard(conn, deadline) as arm:
                return conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise self.db.failure("WAL read failed", exc, timed_out=bool(arm and arm.fired), conn=conn) from None

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> TupleRow | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _pages(self, select: str, where: str, params: list[Any], seq_col: str = "seq") -> Iterator[TupleRow]:
        """Rows of `select WHERE where` in seq order, a page at a time (keyset), all in this snapshot.
        The seq column must be the row's first."""
        last = 0
        while True:
            rows = self._all(f"{select} WHERE {where} AND {seq_col} > %s ORDER BY {seq_col} LIMIT {PAGE}",
                             [*params, last])  # fmt: skip
            yield from rows
            if len(rows) < PAGE:
                return
            last = int(rows[-1][0])

    # records
    def bounds(self) -> tuple[int, int, int]:
        row = self._one(
            self.db.sql("SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM {s}.records "
                        "WHERE chain_id = %s"), (self.chain_id,),
        )  # fmt: skip
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def records(self, from_seq: int = 1, to_seq: int | None = None) -> RecordStream:
        return RecordStream(self._record_rows(from_seq, to_seq))

    def _record_rows(self, from_seq: int, to_seq: int | None) -> Iterator[RecordRow]:
        select = self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records")
        rows = self._pages(select, "chain_id = %s AND seq >= %s AND seq <= %s",
                           [self.chain_id, from_seq, to_seq if to_seq is not None else 2**62])  # fmt: skip
        for row in rows:
            yield (int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], bytes(row[9]), row[10])

    def record_at(self, seq: int) -> StoredRecord | None:
        row = self._one(
            self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records WHERE chain_id = %s AND seq = %s"),
            (self.chain_id, seq),
        )
        return StoredRecord(*row) if row else None

    def record_by_id(self, record_id: str) -> StoredRecord | None:
        row = self._one(
            self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records WHERE chain_id = %s AND id = %s"),
            (self.chain_id, record_id),
        )
        return StoredRecord(*row) if row else None

    def tail(
        self,
        n: int,
        *,
        agent_id: str | None = None,
        effect: str | None = None,
        tool_glob: str | None = None,
        action_type: str | None = None,
    ) -> list[StoredRecord]:
        """The last `n` records matching every filter given, oldest first; `tool_glob` as in SqliteReader."""
        where = ["chain_id = %s"]
        params: list[Any] = [self.chain_id]
        if agent_id is not None:
            where.append("agent_id = %s")
            params.append(agent_id)
        if effect is not None:
            where.append("effect = %s")
            params.append(effect.upper())
        if tool_glob is not None:
            where.append("lower(tool) LIKE %s")
            params.append(_like(tool_glob.lower()))
        if action_type is not None:
            where.append("action_type = %s")
            params.append(action_type)
        rows = self._all(
            self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records WHERE {' AND '.join(where)} "
                        "ORDER BY seq DESC LIMIT %s"), (*params, max(0, n)),
        )  # fmt: skip
        return [StoredRecord(*r) for r in reversed(rows)]

    def records_since(
        self,
        since_time: str,
        *,
        agent_id: str | None = None,
        before_seq: int | None = None,
        action_type: str | None = None,
    ) -> Iterator[StoredRecord]:
        where = ["chain_id = %s", "time >= %s"]
        params: list[Any] = [self.chain_id, since_time]
        if agent_id is not None:
            where.append("agent_id = %s")
            params.append(agent_id)
        if before_seq is not None:
            where.append("seq < %s")
            params.append(before_seq)
        if action_type is not None:
            where.append("action_type = %s")
            params.append(action_type)
        select = self.db.sql(f"SELECT {_RECORD_COLS} FROM {{s}}.records")
        for row in self._pages(select, " AND ".join(where), params):
            yield StoredRecord(*row)

    def tool_calls_since(self, since_time: str) -> Iterator[tuple[StoredRecord, bytes | None]]:
        cols = ", ".join(f"r.{c.strip()}" for c in _RECORD_COLS.split(","))
        select = self.db.sql(
            f"SELECT {cols}, q.args FROM {{s}}.records r LEFT JOIN {{s}}.requests q "
            "ON q.chain_id = r.chain_id AND q.seq = r.seq"
        )
        where = "r.chain_id = %s AND r.time >= %s AND r.action_type = 'tool_call'"
        for row in self._pages(select, where, [self.chain_id, since_time], "r.seq"):
            yield StoredRecord(*row[:11]), (bytes(row[11]) if row[11] is not None else None)

    def request_args(self, seq: int) -> bytes | None:
        row = self._one(self.db.sql("SELECT args FROM {s}.requests WHERE chain_id = %s AND seq = %s"),
                        (self.chain_id, seq))  # fmt: skip
        return bytes(row[0]) if row else None

    # checkpoints
    def checkpoints(self) -> list[Checkpoint]:
        rows = self._all(
            self.db.sql(f"SELECT {_CHECKPOINT_COLS} FROM {{s}}.checkpoints WHERE chain_id = %s ORDER BY seq"),
            (self.chain_id,),
        )
        return [Checkpoint(*r) for r in rows]

    def checkpoint_covering(self, seq: int) -> Checkpoint | None:
        row = self._one(
            self.db.sql(f"SELECT {_CHECKPOINT_COLS} FROM {{s}}.checkpoints WHERE chain_id = %s AND seq >= %s "
                        "ORDER BY seq LIMIT 1"), (self.chain_id, seq),
        )  # fmt: skip
        return Checkpoint(*row) if row else None


# ------------------------------------------------------------------------------------ fleet budgets

# Fleet budgets (`budget … { scope = "fleet" }`): one row per (fleet, agent, budget, period window) holds
# what every engine of the fleet spent and has reserved there; one row per (reservation, budget) says what
# a permit holds and until when. The tables live in the WAL's schema and are created, if missing, by the
# first engine that needs them (schema version unchanged: they are additive and nothing reads them but
# `FleetBudgets`).
FLEET_DDL = [
    "CREATE TABLE IF NOT EXISTS {s}.fleet_budgets ("
    " fleet text NOT NULL, agent_id text NOT NULL, budget text NOT NULL, period text NOT NULL,"
    " period_start bigint NOT NULL,"
    " spent_cents bigint NOT NULL DEFAULT 0 CHECK (spent_cents >= 0),"
    " reserved_cents bigint NOT NULL DEFAULT 0 CHECK (reserved_cents >= 0),"
    " calls bigint NOT NULL DEFAULT 0 CHECK (calls >= 0),"
    " updated_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (fleet, agent_id, budget, period, period_start))",
    "CREATE TABLE IF NOT EXISTS {s}.fleet_reservations ("
    " reservation_id text NOT NULL, budget text NOT NULL, fleet text NOT NULL, agent_id text NOT NULL,"
    " period text NOT NULL, period_start bigint NOT NULL, cents bigint NOT NULL CHECK (cents >= 0),"
    " expires_ms bigint NOT NULL, chain_id text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (reservation_id, budget))",
    "CREATE INDEX IF NOT EXISTS fleet_reservations_expiry ON {s}.fleet_reservations"
    " (fleet, agent_id, budget, period, period_start, expires_ms)",
]
DEFAULT_BUDGET_TIMEOUT = 2.0
_GRACE_S = 0.25  # past the database deadline, the event loop stops waiting for the budget thread
_LATENCIES = 2048  # reservation round trips kept for `status` (p50)

# The budget rows a claim touches, by its (budget, period, period_start) arrays.
_KEYS = (
    "fleet = %(f)s AND agent_id = %(a)s AND (budget, period, period_start) IN "
    "(SELECT * FROM unnest(%(b)s::text[], %(p)s::text[], %(ps)s::bigint[]))"
)
_FLEET_SQL = {
    # Rows for a new period window (harmless when they exist; a concurrent insert of the same key waits
    # for the other transaction and then does nothing).
    "ensure": "INSERT INTO {s}.fleet_budgets (fleet, agent_id, budget, period, period_start) "
    "SELECT %(f)s, %(a)s, k.b, k.p, k.ps FROM unnest(%(b)s::text[], %(p)s::text[], %(ps)s::bigint[]) AS k(b, p, ps) "
    "ON CONFLICT DO NOTHING",
    # Every transaction that changes budget rows locks them first, in one order: two engines reserving
    # on the same budgets queue on the first row instead of deadlocking.
    "lock": f"SELECT budget FROM {{s}}.fleet_budgets WHERE {_KEYS} ORDER BY budget, period, period_start FOR UPDATE",
    # Reservations whose TTL passed are settled at their estimate (moved from reserved to spent).
    "sweep": f"WITH gone AS (DELETE FROM {{s}}.fleet_reservations WHERE {_KEYS} AND expires_ms <= %(now)s "
    "RETURNING budget, period, period_start, cents), "
    "total AS (SELECT budget, period, period_start, sum(cents)::bigint AS cents FROM gone "
    "GROUP BY budget, period, period_start) "
    "UPDATE {s}.fleet_budgets b SET spent_cents = b.spent_cents + t.cents, "
    "reserved_cents = b.reserved_cents - t.cents, updated_at = now() FROM total t "
    "WHERE b.fleet = %(f)s AND b.agent_id = %(a)s AND b.budget = t.budget AND b.period = t.period "
    "AND b.period_start = t.period_start",
    # The decision: one statement reserves on every budget whose limit holds (an `audit` budget takes it
    # anyway); fewer rows back than budgets → one refused, and the transaction is rolled back.
    "reserve": "UPDATE {s}.fleet_budgets b SET reserved_cents = b.reserved_cents + %(c)s, calls = b.calls + 1, "
    "updated_at = now() FROM unnest(%(b)s::text[], %(p)s::text[], %(ps)s::bigint[], %(mx)s::bigint[], "
    "%(mc)s::bigint[], %(g)s::boolean[]) AS k(b, p, ps, max_cents, max_calls, guarded) "
    "WHERE b.fleet = %(f)s AND b.agent_id = %(a)s AND b.budget = k.b AND b.period = k.p AND b.period_start = k.ps "
    "AND (NOT k.guarded OR ((k.max_cents IS NULL OR b.spent_cents + b.reserved_cents + %(c)s <= k.max_cents) "
    "AND (k.max_calls IS NULL OR b.calls + 1 <= k.max_calls))) "
    "RETURNING b.budget, b.spent_cents, b.reserved_cents, b.calls",
    "hold": "INSERT INTO {s}.fleet_reservations (reservation_id, budget, fleet, agent_id, period, period_start, "
    "cents, expires_ms, chain_id) SELECT %(r)s, k.b, %(f)s, %(a)s, k.p, k.ps, %(c)s, %(exp)s, %(chain)s "
    "FROM unnest(%(b)s::text[], %(p)s::text[], %(ps)s::bigint[]) AS k(b, p, ps)",
    "usage": f"SELECT budget, spent_cents, reserved_cents, calls FROM {{s}}.fleet_budgets WHERE {_KEYS}",
    "find": "SELECT fleet, agent_id, budget, period, period_start FROM {s}.fleet_reservations "
    "WHERE reservation_id = %(r)s AND (%(a)s::text IS NULL OR agent_id = %(a)s) ORDER BY budget",
    # Settle (or release) a reservation: its rows go, and each budget's reserved becomes spent — the
    # actual cost, or the estimate when its TTL had passed, or nothing for a release.
    "settle": "WITH gone AS (DELETE FROM {s}.fleet_reservations WHERE reservation_id = %(r)s AND agent_id = %(a)s "
    "RETURNING fleet, agent_id, budget, period, period_start, cents, expires_ms), "
    "amounts AS (SELECT *, CASE WHEN %(release)s THEN 0 WHEN expires_ms <= %(now)s THEN cents "
    "ELSE coalesce(%(actual)s::bigint, cents) END AS spend FROM gone) "
    "UPDATE {s}.fleet_budgets b SET spent_cents = b.spent_cents + m.spend, "
    "reserved_cents = b.reserved_cents - m.cents, "
    "calls = b.calls - CASE WHEN %(release)s THEN 1 ELSE 0 END, updated_at = now() FROM amounts m "
    "WHERE b.fleet = m.fleet AND b.agent_id = m.agent_id AND b.budget = m.budget AND b.period = m.period "
    "AND b.period_start = m.period_start RETURNING m.budget, m.cents, m.spend, m.expires_ms <= %(now)s",
}


class FleetBudgets:
    """Fleet-wide budgets in the PostgreSQL database the fleet's engines share.

    A reservation is one transaction on a session of its own (never the WAL writer's, whose batches it
    would hold up): lock the budget rows in one order, settle the expired reservations at their estimate,
    then a single guarded UPDATE reserves on every budget whose limit still holds — all granted, or the
    transaction is rolled back and the call is refused. The rows stay locked until COMMIT, so two engines
    can never both see room for the last $10. COMMIT is synchronous (`synchronous_commit = on`) whatever
    `wal_sync` says: a reservation the database forgot in a crash would let the fleet spend it twice.

    The SQL runs on one thread of this object's; the event loop awaits it for at most `timeout` (plus a
    short grace). No answer in time, a lost connection, a lock held past `lock_timeout`: UNAVAILABLE, and
    the engine denies the call (fail closed). A reservation that lands after its caller gave up is
    released again; a job still queued when its deadline passed never touches the database."""

    def __init__(
        self,
        url: str,
        chain_id: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        timeout: float = DEFAULT_BUDGET_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.timeout = timeout
        self.db = _Database(url, schema, application_name=f"faramesh-budget {chain_id}",
                            connect_timeout=connect_timeout, op_timeout=timeout)  # fmt: skip
        self._log = log or (lambda message: None)
        self._conn: Conn | None = None
        self._tables_ready = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-budget")
        self._closed = False
        self._latencies: collections.deque[int] = collections.deque(maxlen=_LATENCIES)
        self.counts = {GRANTED: 0, REFUSED: 0, UNAVAILABLE: 0}
        self.last_error: str | None = None
        self._sql = {name: self.db.sql(text) for name, text in _FLEET_SQL.items()}

    # ---- the session (budget thread only)
    def _session(self, deadline: float) -> Conn:
        conn = self._conn
        if conn is not None and not _stale(conn):
            return conn
        self._discard()
        settings = {
            **self.db.session_settings(read_only=False),
            "synchronous_commit": "on",
            "idle_in_transaction_session_timeout": "60000",
            # Shorter than the client-side deadline: rows held by someone else fail the statement cleanly,
            # and the session survives (the watchdog would have to sever it).
            "lock_timeout": str(max(1, int(self.timeout * 800))),
        }
        conn, _ = self.db.connect(autocommit=False, settings=settings, deadline=deadline)
        self._conn = conn
        if not self._tables_ready:
            self._create_tables(conn, deadline)
        return conn

    def _create_tables(self, conn: Conn, deadline: float) -> None:
        db = self.db
        arm: _Arm | None = None
        try:
            with _WATCHDOG.guard(conn, deadline) as arm:
                try:
                    exists = conn.execute("SELECT to_regclass(%s)", (f"{db.s}.fleet_reservations",)).fetchone()
                    if exists is None or exists[0] is None:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("ddl", db.schema),))
                        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (db.schema,))
                        if found.fetchone() is None:
                            conn.execute(db.sql("CREATE SCHEMA {s}"))
                        for ddl in FLEET_DDL:
                            conn.execute(db.sql(ddl))
                    conn.commit()
                except BaseException:
                    self._rollback(conn)
                    raise
        except psycopg.Error as exc:
            self._discard()
            raise db.failure("cannot create the fleet budget tables", exc, timed_out=bool(arm and arm.fired),
                             conn=conn) from None  # fmt: skip
        self._tables_ready = True

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        _close(conn)

    def _rollback(self, conn: Conn) -> None:
        if _broken(conn):
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._discard()

    def _failed(self, what: str, exc: BaseException, conn: Conn | None, arm: _Arm | None) -> str:
        fired = bool(arm and arm.fired)
        if conn is not None and (_broken(conn) or fired):
            self._discard()
        if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
            return f"{what}: the budget rows stayed locked or busy past {self.timeout:g}s ({self.db.where})"
        if isinstance(exc, StoreError):
            return str(exc)
        return str(self.db.failure(what, exc, timed_out=fired, conn=conn))

    # ---- jobs (budget thread only); they never raise
    def _reserve_job(self, claim: FleetClaim, deadline: float) -> FleetOutcome:
        if time.monotonic() >= deadline:  # queued behind a slow database past its caller's patience
            return FleetOutcome(UNAVAILABLE, error=f"no budget session free within {self.timeout:g}s")
        params: dict[str, Any] = {
            "f": claim.fleet,
            "a": claim.agent_id,
            "r": claim.reservation_id,
            "c": claim.cents,
            "now": claim.at_ms,
            "exp": claim.expires_ms,
            "chain": self.chain_id,
            "b": [p.name for p in claim.parts],
            "p": [p.period for p in claim.parts],
            "ps": [p.period_start for p in claim.parts],
            "mx": [p.max_cents for p in claim.parts],
            "mc": [p.max_calls for p in claim.parts],
            "g": [p.guarded for p in claim.parts],
        }
        q = self._sql
        conn: Conn | None = None
        arm: _Arm | None = None
        try:
            conn = self._session(deadline)
            with _WATCHDOG.guard(conn, deadline) as arm:
                try:
                    with conn.pipeline():
                        conn.execute(q["ensure"], params)
                        conn.execute(q["lock"], params)
                        conn.execute(q["sweep"], params)
                        reserved = conn.execute(q["reserve"], params)
                        conn.execute(q["hold"], params)
                        found = conn.execute(q["usage"], params)
                    taken = {str(r[0]): FleetUsage(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in reserved}
                    if len(taken) == len(claim.parts):
                        conn.commit()
                        return FleetOutcome(GRANTED, tuple(taken[p.name] for p in claim.parts))
                    before = {str(r[0]): FleetUsage(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in found}
                    conn.rollback()
                except BaseException:
                    self._rollback(conn)
                    raise
        except (psycopg.Error, StoreError) as exc:
            return FleetOutcome(UNAVAILABLE, error=self._failed("fleet budget reservation failed", exc, conn, arm))
        refused = next(p.name for p in claim.parts if p.name not in taken)
        return FleetOutcome(REFUSED, tuple(before[p.name] for p in claim.parts if p.name in before), refused)

    def _settle_job(
        self, reservation_id: str, agent_id: str | None, actual: int | None, now_ms: int, release: bool,
        deadline: float,
    ) -> FleetSettlement:  # fmt: skip
        if time.monotonic() >= deadline:
            return FleetSettlement(UNAVAILABLE, error=f"no budget session free within {self.timeout:g}s")
        q = self._sql
        conn: Conn | None = None
        arm: _Arm | None = None
        try:
            conn = self._session(deadline)
            with _WATCHDOG.guard(conn, deadline) as arm:
                try:
                    rows = conn.execute(q["find"], {"r": reservation_id, "a": agent_id}).fetchall()
                    if not rows:
                        conn.rollback()
                        return FleetSettlement(UNKNOWN)
                    owner = str(rows[0][1])
                    params: dict[str, Any] = {
                        "f": rows[0][0],
                        "a": owner,
                        "r": reservation_id,
                        "b": [str(r[2]) for r in rows],
                        "p": [str(r[3]) for r in rows],
                        "ps": [int(r[4]) for r in rows],
                        "now": now_ms,
                        "actual": actual,
                        "release": release,
                    }
                    with conn.pipeline():
                        conn.execute(q["lock"], params)
                        settled = conn.execute(q["settle"], params)
                    done = settled.fetchall()
                    conn.commit()
                except BaseException:
                    self._rollback(conn)
                    raise
        except (psycopg.Error, StoreError) as exc:
            return FleetSettlement(UNAVAILABLE, error=self._failed("fleet budget settlement failed", exc, conn, arm))
        if not done:  # a concurrent settlement or sweep took it between the two statements
            return FleetSettlement(UNKNOWN)
        expired = all(bool(r[3]) for r in done)
        return FleetSettlement(
            EXPIRED if expired and not release else SETTLED,
            owner,
            max(int(r[1]) for r in done),
            max(int(r[2]) for r in done),
            tuple(sorted(str(r[0]) for r in done)),
        )

    def _open_job(self, deadline: float) -> None:
        self._session(deadline)

    # ---- the engine's side (event loop)
    def open(self) -> None:
        """Connect and create the tables if they are missing (start-up, off the event loop). Raises a
        StoreError the engine refuses to start on: a role that cannot create them, a database not there."""
        deadline = time.monotonic() + max(self.timeout, self.db.connect_timeout)
        self._executor.submit(self._open_job, deadline).result(timeout=max(self.timeout, self.db.connect_timeout) + 5)

    async def reserve(self, claim: FleetClaim) -> FleetOutcome:
        started = time.perf_counter_ns()
        outcome = await self._await(
            partial(self._reserve_job, claim),
            lambda why: FleetOutcome(UNAVAILABLE, error=why),
            late=lambda late: self._release_late(claim.reservation_id, late),
        )
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if outcome.status == UNAVAILABLE:
            self.last_error = outcome.error
        else:
            self._latencies.append((time.perf_counter_ns() - started) // 1000)
        return outcome

    async def settle(
        self, reservation_id: str, agent_id: str | None, actual: int | None, now: float
    ) -> FleetSettlement:
        """`complete`: settle at `actual` (None: at the estimate). `agent_id` None: whoever holds it."""
        outcome = await self._await(
            partial(self._settle_job, reservation_id, agent_id, actual, int(now * 1000), False),
            lambda why: FleetSettlement(UNAVAILABLE, error=why),
        )
        if outcome.status == UNAVAILABLE:
            self.last_error = outcome.error
        return outcome

    def release_soon(self, reservation_id: str, agent_id: str) -> None:
        """Give a reservation back (its permit was never delivered: a WAL, credential or signing failure
        after the grant). In the background; if the database does not answer, the reservation is settled
        at its estimate when its TTL passes — more spent than true, never less."""
        if self._closed:
            return
        deadline = time.monotonic() + max(self.timeout, 5.0)
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            future = self._executor.submit(
                self._settle_job, reservation_id, agent_id, None, int(time.time() * 1000), True, deadline
            )
            future.add_done_callback(partial(self._released, reservation_id))

    def _released(self, reservation_id: str, future: concurrent.futures.Future[FleetSettlement]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        if result.status == UNAVAILABLE:
            self._log(f"fleet budget reservation {reservation_id} not released ({result.error}); "
                      "it is settled at its estimate when its reservation_ttl passes")  # fmt: skip

    def _release_late(self, reservation_id: str, late: FleetOutcome) -> None:
        if late.status == GRANTED:  # granted after the call was denied for want of an answer
            with contextlib.suppress(RuntimeError):
                self._executor.submit(self._settle_job, reservation_id, None, None, int(time.time() * 1000), True,
                                      time.monotonic() + max(self.timeout, 5.0))  # fmt: skip

    async def _await(
        self,
        job: Callable[[float], _T],
        unavailable: Callable[[str], _T],
        late: Callable[[_T], None] | None = None,
    ) -> _T:
        if self._closed:
            return unavailable("the engine is shutting down")
        deadline = time.monotonic() + self.timeout
        try:
            future = self._executor.submit(job, deadline)
        except RuntimeError:
            return unavailable("the engine is shutting down")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout + _GRACE_S)
        except TimeoutError:
            # Cancelling the wrapper cancels a job still queued; one already running finishes, and `late`
            # undoes what it did.
            if late is not None:
                future.add_done_callback(partial(_after_late, late))
            return unavailable(f"no answer from {self.db.where} within {self.timeout:g}s")

    def status(self) -> dict[str, Any]:
        ordered = sorted(self._latencies)
        return {
            "database": self.db.where,
            "timeout_seconds": self.timeout,
            "granted": self.counts.get(GRANTED, 0),
            "refused": self.counts.get(REFUSED, 0),
            "unavailable": self.counts.get(UNAVAILABLE, 0),
            "reservation_p50_us": ordered[len(ordered) // 2] if ordered else None,
            "reservation_p99_us": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] if ordered else None,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        """Let queued releases run (each bounded by its deadline), then close the session."""
        self._closed = True
        self._executor.shutdown(wait=True)
        self._discard()


def _after_late(late: Callable[[_T], None], future: concurrent.futures.Future[_T]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    late(future.result())
