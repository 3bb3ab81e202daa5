"""The engine's side of the WAL: chain state, group commit and checkpoints.

Group commit: `append` queues a record and returns a future; one committer task takes everything
queued so far, assigns seq and hashes, and commits it as one transaction on a dedicated writer
thread. While that commit runs, new appends queue up for the next one, so batch size grows with
load. A future resolves only after its transaction committed; if the commit fails every caller in
the batch gets StoreError (the server answers WAL_WRITE_FAILURE) and the chain head does not move.

Checkpoints (the signed chain head, every CHECKPOINT_EVERY records or CHECKPOINT_INTERVAL_S) are signed
one of two ways, by what the signer is:
- local key (`remote` False): signed inline while the batch is built, committed in the same transaction.
- KMS through a provider child (`remote` True): a head that is due is queued; one signing task signs it
  on a thread of its own (a KMS round trip never runs on the event loop, nor on the writer thread), and
  the committer commits the signed checkpoint with its next transaction. While the KMS cannot sign,
  decisions go on and heads pile up in the queue (its depth is in `status`); once it can, the newest head
  is signed and the queue drains at once: a checkpoint over the newest head covers every record before
  it, so the older heads would add no evidence, only KMS round trips.
The signer may also be None (a KMS key not pinned yet): heads queue the same way until one is set.
`signing_required` makes the committer queue a head after every commit, and `wait_signed` lets a
permit wait for the checkpoint that covers it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from faramesh.engine.wal.dpr import SCHEMA, NonCanonicalArgs, chain_hash, genesis_hash, record_body
from faramesh.engine.wal.signer import CheckpointKey, SigningFailed, checkpoint_message
from faramesh.engine.wal.store import Batch, Checkpoint, Store, StoredRecord, StoreError
from ulid import ULID

CHECKPOINT_EVERY = 1000
CHECKPOINT_INTERVAL_S = 1.0
MAINTENANCE_EVERY = 2000
SIGN_RETRY_INITIAL_S = 0.25  # a KMS that failed is asked again after this, doubling …
SIGN_RETRY_MAX_S = 5.0  # … up to this
MAX_QUEUED_HEADS = 100_000  # beyond it the oldest queued head is dropped: the newest covers it anyway


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


@dataclass(frozen=True)
class Head:
    """A chain head due for a checkpoint, waiting for its signature."""

    seq: int
    head_hash: str
    kind: str
    time: float


class Wal:
    def __init__(
        self,
        store: Store,
        signer: CheckpointKey | None,
        *,
        clock: Callable[[], float],
        signing_required: bool = False,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_interval: float = CHECKPOINT_INTERVAL_S,
        commit_inline: bool = False,
        on_commit: Callable[[str, list[StoredRecord]], None] | None = None,
    ) -> None:
        # commit_inline: run the (short, fsync-free) commit on the event-loop thread. Handing a ~30 µs
        # `synchronous=NORMAL` commit to a thread costs more than the commit (GIL hand-offs, wake-ups).
        # With `full`, the fdatasync must not block the loop, so it goes to the writer thread.
        self.commit_inline = commit_inline
        # Called with (chain id, the records) after each commit: the audit sinks' spool (engine/sinks/),
        # which never blocks and never raises.
        self.on_commit = on_commit
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
        # Remote signing (see the module docstring).
        self._heads: deque[Head] = deque(maxlen=MAX_QUEUED_HEADS)
        self._ready: Checkpoint | None = None  # signed, waiting for the committer
        self._meta_pending: dict[str, str] = {}  # committed with the next transaction
        self._sign_wake = asyncio.Event()
        self._sign_task: asyncio.Task[None] | None = None
        self._sign_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-signer")
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self.signing_error: str | None = None  # why the last signature failed (None once one succeeds)
        self.signing_failures = 0
        self.heads_coalesced = 0  # queued heads a newer signed checkpoint made redundant
        self._last_queued_time = 0.0

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
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._committer(), name="wal-committer")
        self._sign_task = loop.create_task(self._signing_loop(), name="wal-signer")

    def recovery_checkpoint_needed(self) -> bool:
        return self.seq > self.signed_seq

    @property
    def remote_signing(self) -> bool:
        """Checkpoints go through the signing queue (a KMS signer, or none pinned yet)."""
        return self.signer is None or self.signer.remote

    @property
    def queue_depth(self) -> int:
        """Chain heads due for a checkpoint whose signature has not been committed yet."""
        return len(self._heads) + (1 if self._ready is not None else 0)

    def sign_head(self, signer: CheckpointKey, head: Head) -> Checkpoint:
        """Sign `head` (blocking: a KMS round trip for a remote signer; may raise SigningFailed)."""
        message = checkpoint_message(self.chain_id, head.seq, head.head_hash)
        return Checkpoint(
            seq=head.seq,
            head_hash=head.head_hash,
            time=rfc3339(head.time),
            kind=head.kind,
            key_fingerprint=signer.fingerprint,
            public_key=signer.public_b64,
            signature=signer.sign(message),
        )

    def _checkpoint(self, kind: str) -> Checkpoint:
        assert self.signer is not None
        return self.sign_head(self.signer, Head(self.seq, self.head_hash, kind, self.clock()))

    def write_checkpoint_sync(self, kind: str) -> bool:
        """Sign and commit a checkpoint over the head now, on the calling thread (start-up and shutdown,
        never the event loop). A remote signer that cannot sign queues the head instead: False."""
        if self.seq == self.signed_seq and kind != "shutdown":
            return True
        if self.seq == 0:
            return True
        head = Head(self.seq, self.head_hash, kind, self.clock())
        if self.signer is None:
            self._queue_head(head)
            return False
        try:
            cp = self.sign_head(self.signer, head)
        except SigningFailed as exc:
            self._note_signing_failure(exc)
            self._queue_head(head)
            return False
        self.store.commit(Batch(checkpoint=cp))
        self._signed(cp)
        return True

    def commit_checkpoint_sync(self, cp: Checkpoint) -> None:
        """Commit a checkpoint signed elsewhere (the old key's hand-over) before the committer runs."""
        self.store.commit(Batch(checkpoint=cp))
        self._signed(cp)

    def append_sync(self, record: dict[str, Any], *, meta: dict[str, str] | None = None) -> StoredRecord:
        """Append one record in a transaction of its own on the calling thread: start-up only, before
        `start()` (the committer is the only writer once it runs)."""
        assert self._task is None, "append_sync after start()"
        loop = asyncio.new_event_loop()
        try:
            future: asyncio.Future[StoredRecord] = loop.create_future()
            pending = [_Pending(record, None, [], future, meta)]
            batch, stored = self._build(pending, checkpoints=False)
            if not stored:
                raise StoreError(str(future.exception()))
            try:
                self.store.commit(batch)
            except Exception:
                self.seq, self.head_hash = self._rollback
                raise
            if meta:
                self.meta.update(meta)
            return stored[0]
        finally:
            loop.close()

    def offer_checkpoint(self, cp: Checkpoint) -> None:
        """A checkpoint signed elsewhere (the old key's hand-over), committed with the next transaction."""
        if self._ready is None or self._ready.seq < cp.seq:
            self._ready = cp
        self._wake.set()

    def set_meta(self, meta: dict[str, str]) -> None:
        """Meta entries to commit with the next transaction (or on the next idle tick)."""
        self._meta_pending.update(meta)
        self.meta.update(meta)
        self._wake.set()

    def set_signer(self, signer: CheckpointKey | None) -> None:
        """Sign checkpoints with `signer` from now on (None: queue them until one is set)."""
        self.signer = signer
        if signer is not None and not signer.remote:
            self._heads.clear()  # a local signer signs inline: the next batch (or idle tick) covers them
        self._sign_wake.set()

    # ---- the signing queue (remote signers)
    def _queue_head(self, head: Head) -> None:
        if self._heads and self._heads[-1].seq >= head.seq:
            return
        if len(self._heads) == self._heads.maxlen:
            self.heads_coalesced += 1  # deque drops the oldest; the newest covers its records
        self._heads.append(head)
        self._sign_wake.set()

    def _queued_seq(self) -> int:
        if self._heads:
            return self._heads[-1].seq
        return self._ready.seq if self._ready is not None else self.signed_seq

    def _maybe_queue(self, kind: str = "periodic") -> None:
        """After a commit (or on an idle tick): queue the head when a checkpoint is due."""
        if self.seq <= self._queued_seq():
            return
        now = self.clock()
        if (
            self._waiters
            or self.seq - self._queued_seq() >= self.checkpoint_every
            or now - max(self._last_checkpoint_time, self._last_queued_time) >= self.checkpoint_interval
        ):
            self._last_queued_time = now
            self._queue_head(Head(self.seq, self.head_hash, kind, now))

    def _note_signing_failure(self, why: BaseException | str) -> None:
        self.signing_failures += 1
        self.signing_error = str(why)[:500]

    async def _signing_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = SIGN_RETRY_INITIAL_S
        while True:
            if self._closing:
                return
            signer = self.signer
            if not self._heads or signer is None or not signer.remote:
                self._sign_wake.clear()
                await self._sign_wake.wait()
                continue
            head = self._heads[-1]
            if head.seq <= self.signed_seq:
                self._heads.clear()  # all covered by a committed checkpoint
                continue
            try:
                cp = await loop.run_in_executor(self._sign_executor, self.sign_head, signer, head)
            except Exception as exc:  # SigningFailed, or a defect: either way retry, never stop signing
                self._note_signing_failure(exc if isinstance(exc, SigningFailed) else f"{type(exc).__name__}: {exc}")
                self._sign_wake.clear()
                with contextlib.suppress(TimeoutError):  # close() and set_signer() cut the wait short
                    await asyncio.wait_for(self._sign_wake.wait(), delay)
                delay = min(SIGN_RETRY_MAX_S, delay * 2)
                continue
            delay = SIGN_RETRY_INITIAL_S
            if self.signer is not signer:
                continue  # the signer changed while this was signing: sign again with the new one
            self.signing_error = None
            while self._heads and self._heads[0].seq <= cp.seq:
                dropped = self._heads.popleft()
                if dropped.seq < cp.seq:
                    self.heads_coalesced += 1
            if self._ready is None or self._ready.seq < cp.seq:
                self._ready = cp
            self._wake.set()

    def _signed(self, cp: Checkpoint) -> None:
        """A checkpoint is committed: advance the signed head (any thread; waiters are released by
        `_release_waiters`, on the loop)."""
        self.signed_seq = max(self.signed_seq, cp.seq)
        self._last_checkpoint_time = self.clock()
        while self._heads and self._heads[0].seq <= self.signed_seq:
            self._heads.popleft()  # covered by this checkpoint

    def _release_waiters(self) -> None:
        """Resolve the permits waiting for a checkpoint that now covers them (event-loop thread only)."""
        if self._waiters:
            keep = []
            for seq, future in self._waiters:
                if seq <= self.signed_seq:
                    if not future.done():
                        future.set_result(True)
                else:
                    keep.append((seq, future))
            self._waiters = keep

    async def wait_signed(self, seq: int, timeout: float) -> bool:
        """Wait until a committed checkpoint covers `seq` (signing_required); False after `timeout`."""
        if self.signed_seq >= seq:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        if self.remote_signing:
            self._maybe_queue()
        else:
            self._wake.set()  # the committer's idle tick signs locally
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters = [(s, f) for s, f in self._waiters if f is not future]

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
                if self._ready is None and not self._meta_pending:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self.checkpoint_interval)
                if not self._pending:
                    if self._closing:
                        return  # close() writes the shutdown checkpoint
                    if self._ready is not None or self._meta_pending:
                        await self._commit_checkpoint_only(loop)
                    elif self.seq > self.signed_seq:
                        if self.remote_signing:
                            self._maybe_queue()
                        else:
                            await self._commit_checkpoint_only(loop)
                    if self._commits_since_maintenance or self._maintenance_backlog:
                        await self._maintenance(loop)
                    continue
            taken, self._pending = self._pending, []
            batch, stored = self._build(taken)
            ready = self._take_ready(batch)
            try:
                if self.commit_inline:
                    self.store.commit(batch)
                else:
                    await loop.run_in_executor(self._executor, self.store.commit, batch)
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.seq, self.head_hash = self._rollback
                self._give_back(ready, batch.meta)
                for p in taken:
                    if not p.future.done():
                        p.future.set_exception(StoreError(self.last_error))
                continue
            if batch.checkpoint is not None:
                self._signed(batch.checkpoint)
                self._release_waiters()
            self._commits_since_maintenance += 1
            for p, rec in zip(taken, stored, strict=True):
                if not p.future.done():
                    p.future.set_result(rec)
            if self.on_commit is not None and stored:
                self.on_commit(self.chain_id, stored)
            if self.remote_signing:
                self._maybe_queue()
            if self._commits_since_maintenance >= MAINTENANCE_EVERY:
                await self._maintenance(loop)

    def _take_ready(self, batch: Batch) -> Checkpoint | None:
        """Attach the signed checkpoint and the pending meta entries to `batch` (a local checkpoint the
        batch already carries wins: it is newer)."""
        ready = None
        if self._ready is not None and self._ready.seq <= self.signed_seq:
            # Covered already (e.g. by the old key's hand-over at that very seq): never replace a checkpoint.
            self._ready = None
        if self._ready is not None and batch.checkpoint is None:
            ready, self._ready = self._ready, None
            batch.checkpoint = ready
        if self._meta_pending:
            batch.meta = {**self._meta_pending, **batch.meta}
            self._meta_pending = {}
        return ready

    def _give_back(self, ready: Checkpoint | None, meta: dict[str, str]) -> None:
        """A transaction failed: its signed checkpoint and meta entries go with the next one."""
        if ready is not None and (self._ready is None or self._ready.seq < ready.seq):
            self._ready = ready
        for key, value in meta.items():
            self._meta_pending.setdefault(key, value)

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
        """An idle tick: the signed (remote) checkpoint and pending meta, or a local checkpoint."""
        batch = Batch()
        ready = self._take_ready(batch)
        if batch.checkpoint is None and not self.remote_signing and self.seq > self.signed_seq:
            batch.checkpoint = self._checkpoint("periodic")
        if batch.checkpoint is None and not batch.meta:
            return
        try:
            await loop.run_in_executor(self._executor, self.store.commit, batch)
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._give_back(ready, batch.meta)
            return
        if batch.checkpoint is not None:
            self._signed(batch.checkpoint)
            self._release_waiters()

    def _build(self, taken: list[_Pending], *, checkpoints: bool = True) -> tuple[Batch, list[StoredRecord]]:
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
        if not checkpoints or self.remote_signing:
            return batch, stored  # remote: the committer queues the head once this batch has committed
        now = self.clock()
        if (
            self.signing_required
            or self.seq - self.signed_seq >= self.checkpoint_every
            or now - self._last_checkpoint_time >= self.checkpoint_interval
        ):
            batch.checkpoint = self._checkpoint("periodic")
        return batch, stored

    async def close(self) -> None:
        """Flush what is queued, write the shutdown checkpoint, stop the writer and signer threads."""
        self._closing = True
        self._wake.set()
        self._sign_wake.set()
        if self._task is not None:
            await self._task
        if self._sign_task is not None:
            await self._sign_task
        loop = asyncio.get_running_loop()
        if self._ready is not None or self._meta_pending:
            await self._commit_checkpoint_only(loop)
        if self.seq > self.signed_seq:
            try:
                # A remote signer gets one KMS round trip here; if it fails the tail stays unsigned and the
                # next start signs it with a recovery checkpoint.
                signed = await loop.run_in_executor(self._executor, self.write_checkpoint_sync, "shutdown")
                if not signed:
                    self.last_error = f"shutdown checkpoint not signed: {self.signing_error}"
            except Exception as exc:
                self.last_error = f"shutdown checkpoint failed: {exc}"
        self._release_waiters()
        for future in (f for _, f in self._waiters if not f.done()):
            future.set_result(False)  # shutting down without a checkpoint over it: not signed
        self._executor.shutdown(wait=True)
        self._sign_executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def decode_body(body: bytes) -> dict[str, Any]:
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ValueError("record body is not an object")
    return data
