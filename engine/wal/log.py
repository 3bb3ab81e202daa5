"""The engine's side of the WAL: chain state, group commit and checkpoints.

Group commit: `append` queues a record and returns a future; one committer task takes everything
queued so far, assigns seq and hashes, and commits it as one transaction on a dedicated writer
thread. While that commit runs, new appends queue up for the next one, so batch size grows with
load. A future resolves only after its transaction committed; if the commit fails every caller in
the batch gets StoreError (the server answers WAL_WRITE_FAILURE) and the chain head does not move.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from faramesh.engine.wal.dpr import SCHEMA, NonCanonicalArgs, chain_hash, genesis_hash, record_body
from faramesh.engine.wal.signer import LocalSigner, checkpoint_message
from faramesh.engine.wal.store import Batch, Checkpoint, Store, StoredRecord, StoreError
from ulid import ULID

CHECKPOINT_EVERY = 1000
CHECKPOINT_INTERVAL_S = 1.0
MAINTENANCE_EVERY = 2000


_second_prefix: tuple[int, str] = (-1, "")


def rfc3339(epoch: float) -> str:
    """`2026-11-28T05:19:30.123456Z`. The per-second prefix is cached: this runs for every DPR."""
    global _second_prefix
    second = int(epoch // 1)
    if _second_prefix[0] != second:
        from datetime import UTC, datetime

        _second_prefix = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    micros = min(999_999, round((epoch - second) * 1_000_000))
    return f"{_second_prefix[1]}.{micros:06d}Z"


def new_ulid(epoch: float, random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    return str(ULID.from_bytes(int(epoch * 1000).to_bytes(6, "big") + random_bytes(10)))


@dataclass
class _Pending:
    record: dict[str, Any]
    args: bytes | None
    approvals: list[dict[str, Any]]
    future: asyncio.Future[StoredRecord]
    meta: dict[str, str] | None = None


class Wal:
    def __init__(
        self,
        store: Store,
        signer: LocalSigner,
        *,
        clock: Callable[[], float],
        signing_required: bool = False,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_interval: float = CHECKPOINT_INTERVAL_S,
        commit_inline: bool = False,
    ) -> None:
        # commit_inline: run the (short, fsync-free) commit on the event-loop thread. Handing a ~30 µs
        # `synchronous=NORMAL` commit to a thread costs more than the commit (GIL hand-offs, wake-ups).
        # With `full`, the fdatasync must not block the loop, so it goes to the writer thread.
        self.commit_inline = commit_inline
        self._commits_since_maintenance = 0
        self._maintenance_backlog = False  # the last maintenance left old request rows to delete
        self.store = store
        self.signer = signer
        self.clock = clock
        self.signing_required = signing_required
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.chain_id = ""
        self.seq = 0
        self.head_hash = ""
        self.signed_seq = 0
        self._last_checkpoint_time = 0.0
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-writer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.failures = 0
        self.last_error: str | None = None
        self.meta: dict[str, str] = {}  # the store's meta table as of open() plus what this engine committed

    # ---- start-up
    def open(self) -> None:
        """Open the store, adopt (or create) the chain and load the head. Verification is the caller's."""
        meta = self.store.open()
        self.meta = dict(meta)
        self.chain_id = meta.get("chain_id") or new_ulid(self.clock())
        head = self.store.head()
        self.seq = head.seq if head else 0
        self.head_hash = head.record_hash if head else genesis_hash(self.chain_id)
        checkpoints = self.store.checkpoints()
        self.signed_seq = checkpoints[-1].seq if checkpoints else 0
        if "chain_id" not in meta:
            self.store.commit(Batch(meta={"chain_id": self.chain_id}))
            self.meta["chain_id"] = self.chain_id

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._committer(), name="wal-committer")

    def recovery_checkpoint_needed(self) -> bool:
        return self.seq > self.signed_seq

    def _checkpoint(self, kind: str) -> Checkpoint:
        message = checkpoint_message(self.chain_id, self.seq, self.head_hash)
        return Checkpoint(
            seq=self.seq,
            head_hash=self.head_hash,
            time=rfc3339(self.clock()),
            kind=kind,
            key_fingerprint=self.signer.fingerprint,
            public_key=self.signer.public_b64,
            signature=self.signer.sign(message),
        )

    def write_checkpoint_sync(self, kind: str) -> None:
        if self.seq == self.signed_seq and kind != "shutdown":
            return
        if self.seq == 0:
            return
        cp = self._checkpoint(kind)
        self.store.commit(Batch(checkpoint=cp))
        self.signed_seq = cp.seq
        self._last_checkpoint_time = self.clock()

    # ---- appends
    def append(
        self,
        record: dict[str, Any],
        args: bytes | None = None,
        approvals: list[dict[str, Any]] | None = None,
        *,
        meta: dict[str, str] | None = None,
    ) -> asyncio.Future[StoredRecord]:
        """Queue a record (without chain fields), with the approval rows and meta entries to commit in the
        same transaction. The future resolves once it is committed."""
        future: asyncio.Future[StoredRecord] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(StoreError("the WAL is closing"))
            return future
        self._pending.append(_Pending(record, args, approvals or [], future, meta))
        self._wake.set()
        return future

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.checkpoint_interval)
                if not self._pending:
                    if self._closing:
                        return  # close() writes the shutdown checkpoint
                    if self.seq > self.signed_seq:
                        await self._commit_checkpoint_only(loop)
                    if self._commits_since_maintenance or self._maintenance_backlog:
                        await self._maintenance(loop)
                    continue
            taken, self._pending = self._pending, []
            batch, stored = self._build(taken)
            try:
                if self.commit_inline:
                    self.store.commit(batch)
                else:
                    await loop.run_in_executor(self._executor, self.store.commit, batch)
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.seq, self.head_hash = self._rollback
                for p in taken:
                    if not p.future.done():
                        p.future.set_exception(StoreError(self.last_error))
                continue
            if batch.checkpoint is not None:
                self.signed_seq = batch.checkpoint.seq
                self._last_checkpoint_time = self.clock()
            self._commits_since_maintenance += 1
            for p, rec in zip(taken, stored, strict=True):
                if not p.future.done():
                    p.future.set_result(rec)
            if self._commits_since_maintenance >= MAINTENANCE_EVERY:
                await self._maintenance(loop)

    async def _maintenance(self, loop: asyncio.AbstractEventLoop) -> None:
        """Store housekeeping (SQLite: delete request args past `replay_retention`, fold the -wal file
        into the database) when idle or every MAINTENANCE_EVERY commits, instead of at an arbitrary
        commit inside a decision's latency. Runs between commits (the committer awaits it), so it never
        shares the writer connection with a commit. A backlog of old rows is worked off in bounded
        steps, one per idle tick."""
        self._commits_since_maintenance = 0
        self._maintenance_backlog = False
        maintenance = getattr(self.store, "maintenance", None)
        if maintenance is None:
            return
        try:
            more = await loop.run_in_executor(self._executor, maintenance, self.clock())
        except Exception as exc:  # housekeeping failing is reported, never fatal to decisions
            self.last_error = f"WAL maintenance failed: {type(exc).__name__}: {exc}"
            return
        self._maintenance_backlog = bool(more)

    async def _commit_checkpoint_only(self, loop: asyncio.AbstractEventLoop) -> None:
        cp = self._checkpoint("periodic")
        try:
            await loop.run_in_executor(self._executor, self.store.commit, Batch(checkpoint=cp))
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        self.signed_seq = cp.seq
        self._last_checkpoint_time = self.clock()

    def _build(self, taken: list[_Pending]) -> tuple[Batch, list[StoredRecord]]:
        self._rollback = (self.seq, self.head_hash)
        batch = Batch()
        stored = []
        kept = []
        for p in taken:
            record = dict(p.record)
            record["schema"] = SCHEMA
            record["chain_id"] = self.chain_id
            record["seq"] = self.seq + 1
            record["prev_record_hash"] = self.head_hash
            try:
                body = record_body(record)
            except NonCanonicalArgs as exc:
                p.future.set_exception(StoreError(f"record not canonicalisable: {exc}"))
                continue
            kept.append(p)
            self.seq += 1
            self.head_hash = chain_hash(self.head_hash, body)
            rec = StoredRecord(
                seq=self.seq,
                id=record["id"],
                time=record["time"],
                agent_id=record.get("agent_id"),
                tool=record.get("tool"),
                effect=record.get("effect"),
                code=record.get("code"),
                approval_id=record.get("approval_id"),
                action_type=record.get("action_type", "tool_call"),
                body=body,
                record_hash=self.head_hash,
            )
            batch.records.append(rec)
            stored.append(rec)
            if p.args is not None:
                batch.request_args.append((self.seq, p.args))
            batch.approvals.extend(p.approvals)
            if p.meta:
                batch.meta.update(p.meta)
        taken[:] = kept
        now = self.clock()
        if (
            self.signing_required
            or self.seq - self.signed_seq >= self.checkpoint_every
            or now - self._last_checkpoint_time >= self.checkpoint_interval
        ):
            batch.checkpoint = self._checkpoint("periodic")
        return batch, stored

    async def close(self) -> None:
        """Flush what is queued, write the shutdown checkpoint, stop the writer thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self.seq > self.signed_seq:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.write_checkpoint_sync, "shutdown")
            except Exception as exc:
                self.last_error = f"shutdown checkpoint failed: {exc}"
        self._executor.shutdown(wait=True)
        self.store.close()


def decode_body(body: bytes) -> dict[str, Any]:
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ValueError("record body is not an object")
    return data
