"""The sink dispatcher: committed DPRs in, one spool and one delivery thread per sink.

    offer()/offer_committed()  (engine loop, after each WAL commit; never blocks on a sink, never raises)
        └─ per sink: Spool.append (one write to the page cache)     ← durable against SIGKILL on return
    syncer thread: fsync of every spool with new appends (group commit, at most every sync_interval)
    worker thread per sink: read a batch at the acknowledged position → send → ack → delete segments
        failures: retried with exponential backoff and jitter; 4xx keeps the records spooled (DEGRADED)

Delivery is at least once: a batch whose acknowledgement was lost (crash, timeout after the receiver
committed) is sent again. Every record carries its DPR `id` (and `chain_id`/`seq`) for de-duplication.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from faramesh.engine.providers.protocol import Redactor
from faramesh.engine.sinks.base import Batch, Sender, SenderContext, backoff_delay
from faramesh.engine.sinks.config import SinkSpec, sink_specs
from faramesh.engine.sinks.errors import SINK_SERVER_ERROR, SINK_SPOOL, SINK_TOO_LARGE, DeliveryError, SinkSpoolError
from faramesh.engine.sinks.spool import SEGMENT_BYTES, Spool

Log = Callable[[str], None]
OFFER_CHUNK = 1000  # records per spool append (a catch-up of a million records is many appends)
_MODULES = {"splunk": "splunk", "datadog": "datadog", "s3": "s3", "webhook": "webhook"}
_AWS_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class HasProviders(Protocol):
    @property
    def providers(self) -> Mapping[str, Mapping[str, Any]]: ...


class CommittedRecord(Protocol):
    """What the WAL hands back for a committed record (engine.wal.store.StoredRecord fits)."""

    @property
    def seq(self) -> int: ...

    @property
    def body(self) -> bytes: ...

    @property
    def record_hash(self) -> str: ...


@dataclass(frozen=True)
class SinkOptions:
    """Tuning; the defaults suit production, tests shorten the waits."""

    backoff_base: float = 1.0  # seconds before the first retry; doubles per failure
    backoff_cap: float = 60.0
    sync_interval: float = 0.02  # minimum spacing of fsync rounds (bounds fsyncs to 50/s per sink)
    idle_wait: float = 1.0  # how long an idle worker sleeps when nothing wakes it
    memory_limit: int = 32 * 1024 * 1024  # bytes per sink held in memory while the spool cannot be written
    segment_bytes: int = SEGMENT_BYTES
    timeout: float | None = None  # per request; None: the provider's `timeout` (default 10 s)
    max_records: int | None = None  # per batch; None: the sink type's default
    linger: float | None = None  # None: the sink type's default (0 for HTTP sinks, 1 s for S3)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Worker:
    """One sink: its spool, its sender and the thread that moves records from one to the other."""

    def __init__(
        self,
        spec: SinkSpec,
        sender: Sender,
        spool: Spool,
        options: SinkOptions,
        *,
        redact: Callable[[str], str],
        log: Log,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        rand: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.sender = sender
        self.spool = spool
        self.options = options
        self.redact = redact
        self._log = log
        self._clock = clock
        self._monotonic = monotonic
        self._rand = rand
        self.max_records = sender.max_records
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deadline = float("inf")
        self.thread: threading.Thread | None = None
        self._accept_lock = threading.Lock()
        self._backlog: collections.deque[tuple[bytes, int, dict[str, int], dict[str, int]]] = collections.deque()
        self._backlog_bytes = 0
        self._backlog_records = 0
        self._stats_lock = threading.Lock()
        self.health = "HEALTHY"
        self.state = "idle"
        self.delivered = 0
        self.batches = 0
        self.retries = 0
        self.dropped = 0
        self.corrupt = 0
        self.failures_in_row = 0
        self.last_error: dict[str, Any] | None = None
        self.last_delivery_at: float | None = None
        self.spool_error: str | None = None
        self._said: str | None = None  # the last failure logged, so a long outage logs once, not per retry

    # ---------------------------------------------------------------- offer side (engine loop thread)
    def accept(self, data: bytes, count: int, through: dict[str, int], firsts: dict[str, int]) -> None:
        with self._accept_lock:
            if not self._backlog:
                try:
                    self.spool.append(data, count, through)
                except OSError as exc:
                    self._spool_failed(exc)
                else:
                    self._wake.set()
                    return
            self._hold(data, count, through, firsts)

    def _hold(self, data: bytes, count: int, through: dict[str, int], firsts: dict[str, int]) -> None:
        """Keep records the spool could not take, in order, up to memory_limit; past it, drop and say so
        (the WAL still has them, and `through` stays below them so the next start re-offers them)."""
        if self._backlog_bytes + len(data) > self.options.memory_limit:
            self.spool.note_dropped(firsts)
            with self._stats_lock:
                first_drop = self.dropped == 0
                self.dropped += count
                self.health = "DEGRADED"
            if first_drop:
                self._say(
                    f"dropping records: the spool cannot be written and {self.options.memory_limit} bytes are "
                    "held in memory; they stay in the WAL and are re-offered at the next engine start"
                )
            return
        self._backlog.append((data, count, through, firsts))
        self._backlog_bytes += len(data)
        self._backlog_records += count

    def flush_backlog(self) -> None:
        """Move held records into the spool once it can be written again (the syncer thread). One item
        per lock hold, so offer() never waits behind a long flush."""
        while True:
            with self._accept_lock:
                if not self._backlog:
                    return
                data, count, through, _ = self._backlog[0]
                try:
                    self.spool.append(data, count, through)
                except OSError as exc:
                    self._spool_failed(exc)
                    return
                self._backlog.popleft()
                self._backlog_bytes -= len(data)
                self._backlog_records -= count
            self._wake.set()

    def sync(self, *, force: bool = False) -> None:
        try:
            self.spool.sync(force_through=force)
        except SinkSpoolError as exc:
            self._spool_failed(exc)
            return
        if self.spool_error is not None and not self._backlog:
            with self._stats_lock:
                self.spool_error = None
                if not self.failures_in_row:
                    self.health = "HEALTHY"
            self._say("the spool is writable again")

    def _spool_failed(self, exc: OSError) -> None:
        message = exc.message if isinstance(exc, SinkSpoolError) else f"spool write failed: {exc.strerror or exc}"
        with self._stats_lock:
            self.spool_error = message
            self.health = "DEGRADED"
            self.last_error = {"code": SINK_SPOOL, "message": self.redact(message), "at": _iso(self._clock())}
        self._say_once(f"{SINK_SPOOL}: {message}")

    # ---------------------------------------------------------------- the worker thread
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"sink-{self.spec.name}", daemon=True)
        self.thread.start()

    def stop(self, deadline: float) -> None:
        self._deadline = deadline
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        try:
            earlier = self.spool.count_earlier()
        except OSError as exc:
            self._spool_failed(exc)
            earlier = 0
        if earlier:
            self._say(f"replaying {earlier} record(s) spooled by an earlier run")
        try:
            self._loop()
        except Exception as exc:  # a defect must leave the records spooled and say so, not vanish silently
            with self._stats_lock:
                self.health, self.state = "DEGRADED", "stopped"
                self.last_error = {"code": "SINK_DEFECT", "message": type(exc).__name__, "at": _iso(self._clock())}
            self._say(f"delivery stopped by an internal error ({type(exc).__name__}); records stay spooled")
        finally:
            with self._stats_lock:
                self.state = "stopped"
            with contextlib.suppress(Exception):
                self.sender.close()
            self.spool.close_reader()

    def _loop(self) -> None:
        batch: Batch | None = None
        while True:
            if self._stop.is_set() and (self.failures_in_row or self._monotonic() >= self._deadline):
                return  # closing: what is left stays spooled for the next start
            if batch is None:
                self._wake.clear()
                batch = self._next_batch()
                if batch is None:
                    if self._stop.is_set():
                        return
                    with self._stats_lock:
                        self.state = "idle"
                    self._wake.wait(self.options.idle_wait)
                    continue
                if len(batch) < self.max_records and self.sender.linger > 0 and not self._stop.is_set():
                    self._stop.wait(self.sender.linger)  # a fuller batch: fewer, larger objects
                    batch = self._next_batch()
                    if batch is None:
                        continue
            if not batch.records:  # nothing deliverable (corrupt lines only): just move past them
                self.spool.ack(batch.end, batch.consumed)
                batch = None
                continue
            with self._stats_lock:
                self.state = "delivering" if not self.failures_in_row else "retrying"
            try:
                self.sender.send(batch)
            except DeliveryError as exc:
                if exc.code == SINK_TOO_LARGE and len(batch) > 1:
                    self.max_records = max(1, len(batch) // 2)
                    self._say(
                        f"the receiver refused a batch of {len(batch)} as too large; now at most {self.max_records}"
                    )
                    batch = None
                    continue
                self._failed(exc)
                self._stop.wait(self._retry_delay(exc))
                continue
            except Exception as exc:  # a defect in a sender: same treatment as a failed attempt
                self._failed(DeliveryError(SINK_SERVER_ERROR, f"internal error in the sender ({type(exc).__name__})"))
                self._stop.wait(self._retry_delay(None))
                continue
            self.spool.ack(batch.end, batch.consumed)
            self._delivered(batch)
            batch = None

    def _next_batch(self) -> Batch | None:
        start = self.spool.acked_position()
        try:
            lines, end = self.spool.read(self.max_records, self.sender.max_bytes)
        except SinkSpoolError as exc:
            self._spool_failed(exc)
            self._stop.wait(self._retry_delay(None))
            return None
        if not lines:
            if end != start:
                self.spool.ack(end, 0)  # moved past a torn tail or a vanished segment
                self._say_torn()
            return None
        good: list[bytes] = []
        records: list[Mapping[str, Any]] = []
        corrupt = 0
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                good.append(line)
                records.append(record)
            else:
                corrupt += 1
        if corrupt:
            with self._stats_lock:
                self.corrupt += corrupt
            self._say(f"skipped {corrupt} unreadable line(s) in the spool (damaged on disk)")
        return Batch(tuple(good), tuple(records), end, len(lines))

    def _say_torn(self) -> None:
        if self.spool.torn_bytes:
            self._say(f"skipped the unfinished last record ({self.spool.torn_bytes} bytes) a crash left in the spool")
            self.spool.torn_bytes = 0

    def _retry_delay(self, exc: DeliveryError | None) -> float:
        delay = backoff_delay(
            max(1, self.failures_in_row), self.options.backoff_base, self.options.backoff_cap, self._rand
        )
        if exc is not None and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.options.backoff_cap))
        return delay

    def _failed(self, exc: DeliveryError) -> None:
        message = self.redact(exc.message)
        with self._stats_lock:
            self.failures_in_row += 1
            self.retries += 1
            self.health = "DEGRADED"
            self.last_error = {"code": exc.code, "message": message, "at": _iso(self._clock())}
        self._say_once(f"{exc.code}: {message}; records stay spooled and are retried")

    def _delivered(self, batch: Batch) -> None:
        with self._stats_lock:
            recovered = self.failures_in_row
            self.failures_in_row = 0
            self.delivered += len(batch)
            self.batches += 1
            self.last_delivery_at = self._clock()
            if self.spool_error is None:
                self.health = "HEALTHY"
        if recovered:
            self._said = None
            self._say(f"delivering again after {recovered} failed attempt(s)")

    # ---------------------------------------------------------------- reporting
    def _say(self, message: str) -> None:
        with contextlib.suppress(Exception):  # a broken log must not break delivery
            self._log(
                self.redact(f'sink "{self.spec.name}" ({self.spec.declared_type} → {self.sender.target}): {message}')
            )

    def _say_once(self, message: str) -> None:
        if message != self._said:
            self._said = message
            self._say(message)

    def status(self) -> dict[str, Any]:
        spooled, spool_bytes = self.spool.pending()
        with self._stats_lock:
            return {
                "name": self.spec.name,
                "type": self.spec.declared_type,
                "target": self.sender.target,
                "health": self.health,
                "state": self.state,
                "queued": self._backlog_records,
                "spooled": spooled,
                "spool_bytes": spool_bytes,
                "delivered": self.delivered,
                "batches": self.batches,
                "retries": self.retries,
                "failing_attempts": self.failures_in_row,
                "dropped": self.dropped,
                "corrupt": self.corrupt,
                "last_error": dict(self.last_error) if self.last_error else None,
                "last_delivery_at": _iso(self.last_delivery_at),
            }


class SinkDispatcher:
    """Delivers committed DPRs to the declared audit sinks, off the decision path. See the module doc."""

    def __init__(
        self,
        workers: list[_Worker],
        *,
        log: Log,
        options: SinkOptions,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._workers = workers
        self._log = log
        self.options = options
        self._monotonic = monotonic
        self._sync_wake = threading.Event()
        self._sync_stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._started = False
        self._closed = False
        self.defects = 0

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_policy(
        cls,
        policy: HasProviders | Mapping[str, Mapping[str, Any]],
        environ: Mapping[str, str],
        spool_dir: Path,
        log: Log | None = None,
        *,
        options: SinkOptions | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> SinkDispatcher:
        """The dispatcher for the policy's sink providers (none: a dispatcher whose offer() is a no-op
        and which creates no file). Raises SinkConfigError (a missing env var, a bad URL…) or
        SinkSpoolError (the spool directory cannot be used); both name no secret."""
        options = options or SinkOptions()
        say = log or _stderr
        providers = policy if isinstance(policy, Mapping) else policy.providers
        specs = sink_specs(providers, environ)
        hostname = socket.gethostname()
        workers = []
        for spec in specs:
            redactor = Redactor([*spec.secret_values(), *(environ[k] for k in _AWS_SECRETS if environ.get(k))])
            ctx = SenderContext(
                timeout=options.timeout or spec.timeout,
                redact=redactor,
                environ=environ,
                clock=clock,
                hostname=hostname,
                max_records=options.max_records,
                linger=options.linger,
            )
            module = importlib.import_module(f"faramesh.engine.sinks.{_MODULES[spec.kind]}")
            sender: Sender = module.create(spec, ctx)
            spool = Spool(spool_dir / spec.spool_name, segment_bytes=options.segment_bytes, monotonic=monotonic)
            workers.append(
                _Worker(
                    spec, sender, spool, options, redact=redactor, log=say, clock=clock, monotonic=monotonic, rand=rand
                )
            )
        dispatcher = cls(workers, log=say, options=options, monotonic=monotonic)
        if workers:
            dispatcher._warn_orphans(spool_dir, {w.spec.spool_name for w in workers})
        return dispatcher

    def _warn_orphans(self, spool_dir: Path, known: set[str]) -> None:
        """A spool left by a sink no longer declared is never delivered: say so at every start."""
        with contextlib.suppress(OSError):
            for entry in spool_dir.iterdir():
                if entry.name not in known and entry.is_dir() and any(entry.glob("seg-*.jsonl")):
                    self._log(
                        f"sink spool {entry} belongs to no declared sink and will not be delivered; "
                        "declare the sink again, or delete the directory once its records are not needed"
                    )

    @property
    def names(self) -> list[str]:
        return [w.spec.name for w in self._workers]

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the syncer and one delivery thread per sink (each first replays its spool)."""
        if self._started or not self._workers:
            return
        self._started = True
        self._syncer = threading.Thread(target=self._sync_loop, name="sink-syncer", daemon=True)
        self._syncer.start()
        for worker in self._workers:
            worker.start()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within `timeout` seconds, then stop; the rest stays spooled
        (fsync'd) for the next start. A sink that is failing is not waited for. Blocking: from the
        event loop use `await aclose()`."""
        if self._closed:
            return
        self._closed = True
        deadline = self._monotonic() + max(0.0, timeout)
        for worker in self._workers:
            worker.stop(deadline)
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(max(0.0, deadline - self._monotonic()))
        self._sync_stop.set()
        self._sync_wake.set()
        if self._syncer is not None:
            self._syncer.join(max(1.0, deadline - self._monotonic()))
        for worker in self._workers:
            worker.flush_backlog()
            try:
                worker.spool.close()
            except SinkSpoolError as exc:
                worker._spool_failed(exc)

    async def aclose(self, timeout: float = 5.0) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def _sync_loop(self) -> None:
        while not self._sync_stop.is_set():
            self._sync_wake.wait(self.options.idle_wait)
            self._sync_wake.clear()
            for worker in self._workers:
                worker.flush_backlog()
                worker.sync()
            # Group commit: appends that arrive during this pause share the next fsync.
            self._sync_stop.wait(self.options.sync_interval)

    # ---------------------------------------------------------------- offers (the engine's loop)
    def offer(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Hand committed DPRs (dicts, with `id`, `chain_id`, `seq`) to every sink. Returns once they
        are in each sink's spool (page cache); never waits for a sink and never raises."""
        if not self._workers:
            return
        try:
            chunk: list[bytes] = []
            through: dict[str, int] = {}
            firsts: dict[str, int] = {}
            for record in records:
                try:
                    chunk.append(orjson.dumps(record))
                except TypeError:
                    self.defects += 1
                    continue
                chain, seq = record.get("chain_id"), record.get("seq")
                if isinstance(chain, str) and type(seq) is int:
                    _mark(through, firsts, chain, seq)
                if len(chunk) >= OFFER_CHUNK:
                    self._fan_out(chunk, through, firsts)
                    chunk, through, firsts = [], {}, {}
            if chunk:
                self._fan_out(chunk, through, firsts)
        except Exception as exc:
            self._defect(exc)

    def offer_committed(self, chain_id: str, records: Iterable[CommittedRecord]) -> None:
        """As offer(), from the WAL's own committed records: the stored canonical body plus its
        `record_hash`, spliced without re-encoding (the cheapest path on the engine's loop)."""
        if not self._workers:
            return
        try:
            chunk: list[bytes] = []
            through: dict[str, int] = {}
            firsts: dict[str, int] = {}
            for rec in records:
                body = bytes(rec.body)
                if len(body) < 2 or body[-1:] != b"}":
                    self.defects += 1
                    continue
                chunk.append(body[:-1] + b',"record_hash":"' + rec.record_hash.encode() + b'"}')
                _mark(through, firsts, chain_id, rec.seq)
                if len(chunk) >= OFFER_CHUNK:
                    self._fan_out(chunk, through, firsts)
                    chunk, through, firsts = [], {}, {}
            if chunk:
                self._fan_out(chunk, through, firsts)
        except Exception as exc:
            self._defect(exc)

    def _fan_out(self, lines: list[bytes], through: dict[str, int], firsts: dict[str, int]) -> None:
        data = b"\n".join(lines) + b"\n"
        for worker in self._workers:
            worker.accept(data, len(lines), through, firsts)
        self._sync_wake.set()

    def _defect(self, exc: Exception) -> None:
        self.defects += 1
        with contextlib.suppress(Exception):
            self._log(f"sink offer failed: {type(exc).__name__} (records stay in the WAL)")

    # ---------------------------------------------------------------- queries
    def resume_seq(self, chain_id: str) -> int | None:
        """The seq after which the engine should re-offer WAL records of `chain_id` at start: the lowest
        durable high-water mark among the sinks that have seen this chain (None: none has; a new sink
        starts with what is committed from now on)."""
        marks = [m for m in (w.spool.through(chain_id) for w in self._workers) if m is not None]
        return min(marks) if marks else None

    def status(self) -> list[dict[str, Any]]:
        """Per sink: health (HEALTHY | DEGRADED), queued (in memory, waiting for the spool), spooled
        (on disk, not yet acknowledged), delivered, retries, dropped, last error (redacted)."""
        return [w.status() for w in self._workers]

    @property
    def degraded(self) -> bool:
        return any(w.health != "HEALTHY" for w in self._workers)


def _mark(through: dict[str, int], firsts: dict[str, int], chain: str, seq: int) -> None:
    if seq > through.get(chain, 0):
        through[chain] = seq
    if seq < firsts.get(chain, seq + 1):
        firsts[chain] = seq


def _stderr(message: str) -> None:
    sys.stderr.write(f"faramesh engine: {message}\n")
