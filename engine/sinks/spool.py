"""A sink's durable queue: append-only JSONL segments under `<state dir>/spool/<sink>/`.

Every record offered to a sink is appended here first (one `write` per offer, to the page cache: it
survives a SIGKILL of the engine the moment `offer()` returns) and fsync'd by the dispatcher's syncer
thread in groups (so it survives power loss a few milliseconds later). The sink's worker reads batches
from the acknowledged position and, once the receiver acknowledged a batch, moves that position and
deletes every segment it has passed. Nothing is deleted before delivery is acknowledged.

Files (all 0600, the directory 0700):

    seg-000000000001.jsonl   one DPR per line, exactly as delivered (no secret is ever written here)
    acked                    {"segment": n, "offset": bytes}: where delivery stands (written after each
                             acknowledged batch; losing it only means re-delivering, never losing)
    through.json             {chain_id: seq}: the highest seq of each chain known to be durable here,
                             which the engine uses to re-offer WAL records a crash kept from the spool

A new run never appends to an old segment: a crash can leave a torn last line, which replay skips.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
from faramesh.engine.sinks.base import Position
from faramesh.engine.sinks.errors import SinkSpoolError

SEGMENT_BYTES: Final = 8 * 1024 * 1024  # rotate after this much; a delivered segment is deleted whole
READ_CHUNK: Final = 64 * 1024
THROUGH_EVERY: Final = 0.5  # seconds between rewrites of through.json (a hint: stale only means duplicates)
_SEGMENT = re.compile(r"seg-(\d{12,})\.jsonl")


def segment_name(number: int) -> str:
    return f"seg-{number:012d}.jsonl"


@dataclass
class _Segment:
    number: int
    size: int  # bytes of whole appends (for a segment of an earlier run: its file size, torn tail included)
    closed: bool
    earlier: bool = False  # written by an earlier run (counted by count_earlier)


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        through_every: float = THROUGH_EVERY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.through_every = through_every
        self._monotonic = monotonic
        self._lock = threading.Lock()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise SinkSpoolError(f"cannot use the spool directory {directory}: {exc.strerror or exc}") from None
        self._segments: dict[int, _Segment] = {}
        for entry in entries:
            match = _SEGMENT.fullmatch(entry.name)
            if match:
                n = int(match.group(1))
                self._segments[n] = _Segment(n, entry.stat().st_size, closed=True, earlier=True)
            elif entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # an interrupted atomic write
        acked = self._load_acked()
        for n in [n for n in self._segments if n < acked.segment]:
            self._unlink(n)  # delivered; a crash came between the acknowledgement and the deletion
            del self._segments[n]
        self._acked = acked
        self._next = max([*self._segments, acked.segment]) + 1
        self._fd: int | None = None
        self._cur: _Segment | None = None
        self._retired: list[int] = []  # fds of rotated segments still to fsync
        self._unsynced = False
        self._dir_unsynced = False
        self._through: dict[str, int] = self._load_through()
        self._through_cap: dict[str, int] = {}
        self._persisted_through = dict(self._through)
        self._through_written_at = float("-inf")
        self._appended = 0  # records appended by this run
        self._acked_records = 0  # records acknowledged by this run
        # Records earlier runs left to deliver (None: not counted yet; counting reads them, off the loop).
        self._earlier_records: int | None = None if any(s.earlier for s in self._segments.values()) else 0
        self._read_fd: tuple[int, int] | None = None
        self.torn_bytes = 0  # skipped at the end of segments a crash left unfinished
        self.lost_segments = 0  # segment files that vanished before delivery (removed by hand)

    # ---------------------------------------------------------------- state files
    def _load_acked(self) -> Position:
        try:
            data = orjson.loads((self.dir / "acked").read_bytes())
            position = Position(int(data["segment"]), int(data["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return Position(min(self._segments, default=1), 0)
        if position.segment < 0 or position.offset < 0:
            return Position(min(self._segments, default=1), 0)
        return position

    def _load_through(self) -> dict[str, int]:
        try:
            data = orjson.loads((self.dir / "through.json").read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and type(v) is int}

    def _write_atomic(self, name: str, data: bytes, *, durable: bool) -> None:
        tmp = self.dir / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / name)

    def _unlink(self, number: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / segment_name(number))

    # ---------------------------------------------------------------- writer side (any thread)
    def append(self, data: bytes, count: int, through: Mapping[str, int]) -> None:
        """Append `count` whole lines (`data` ends with a newline). Raises OSError; a failed append
        leaves no partial line behind for later appends to run into."""
        with self._lock:
            seg = self._cur
            if seg is None or self._fd is None or seg.size >= self.segment_bytes:
                seg = self._rotate()
            assert self._fd is not None
            written = 0
            view = memoryview(data)
            try:
                while written < len(data):
                    written += os.write(self._fd, view[written:])
            except OSError:
                if written:
                    try:
                        os.ftruncate(self._fd, seg.size)
                    except OSError:
                        self._retire()  # the torn tail stays last in its segment, where replay skips it
                raise
            seg.size += len(data)
            self._appended += count
            self._unsynced = True
            for chain, seq in through.items():
                if seq > self._through.get(chain, 0):
                    self._through[chain] = seq

    def note_dropped(self, first_dropped: Mapping[str, int]) -> None:
        """Records of these chains from these seqs on were dropped (memory full while the disk failed):
        hold `through` below them, so the engine re-offers them from the WAL at its next start."""
        with self._lock:
            for chain, seq in first_dropped.items():
                self._through_cap[chain] = min(self._through_cap.get(chain, seq - 1), seq - 1)

    def _rotate(self) -> _Segment:
        self._retire()
        number = self._next
        self._next += 1
        try:
            fd = os.open(
                self.dir / segment_name(number),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise SinkSpoolError(f"cannot create a spool segment in {self.dir}: {exc.strerror or exc}") from None
        self._fd = fd
        self._cur = seg = _Segment(number, 0, closed=False)
        self._segments[number] = seg
        self._dir_unsynced = True
        return seg

    def _retire(self) -> None:
        if self._cur is not None:
            self._cur.closed = True
            if self._acked.segment == self._cur.number and self._acked.offset >= self._cur.size:
                self._segments.pop(self._cur.number, None)  # already delivered in full
                self._unlink(self._cur.number)
        if self._fd is not None:
            self._retired.append(self._fd)
        self._fd, self._cur = None, None

    # ---------------------------------------------------------------- durability (the syncer thread)
    def sync(self, *, force_through: bool = False) -> None:
        """fsync everything appended since the last call, then record what is now durable in
        through.json (at most every `through_every` seconds unless forced). Raises SinkSpoolError."""
        with self._lock:
            fds, self._retired = self._retired, []
            if self._unsynced and self._fd is not None:
                fds.append(os.dup(self._fd))
            self._unsynced = False
            dir_dirty, self._dir_unsynced = self._dir_unsynced, False
            # Taken before the fsync: only what was appended before it is covered by it.
            through = {c: min(s, self._through_cap.get(c, s)) for c, s in self._through.items()}
        failure: OSError | None = None
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError as exc:
                failure = exc
            finally:
                os.close(fd)
        if dir_dirty:
            try:
                dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as exc:
                failure = exc
        if failure is not None:
            raise SinkSpoolError(f"fsync of the spool in {self.dir} failed: {failure.strerror or failure}")
        now = self._monotonic()
        if through != self._persisted_through and (
            force_through or now - self._through_written_at >= self.through_every
        ):
            try:
                self._write_atomic("through.json", orjson.dumps(through, option=orjson.OPT_SORT_KEYS), durable=True)
            except OSError as exc:
                raise SinkSpoolError(f"cannot write {self.dir}/through.json: {exc.strerror or exc}") from None
            self._persisted_through = through
            self._through_written_at = now

    def through(self, chain_id: str) -> int | None:
        """The highest seq of `chain_id` this spool holds or delivered, as far as it is durable."""
        with self._lock:
            return self._persisted_through.get(chain_id)

    # ---------------------------------------------------------------- reader side (the sink's worker only)
    def count_earlier(self) -> int:
        """Count the records earlier runs left to deliver (reads them once; run on the worker thread)."""
        total = 0
        with self._lock:
            earlier = [(s.number, s.size) for s in self._segments.values() if s.earlier]
            acked = self._acked
        for number, size in sorted(earlier):
            start = acked.offset if number == acked.segment else 0
            try:
                with open(self.dir / segment_name(number), "rb") as f:
                    f.seek(start)
                    remaining = size - start
                    while remaining > 0:
                        chunk = f.read(min(remaining, 1024 * 1024))
                        if not chunk:
                            break
                        total += chunk.count(b"\n")
                        remaining -= len(chunk)
            except FileNotFoundError:
                continue
        with self._lock:
            self._earlier_records = total
        return total

    def read(self, max_records: int, max_bytes: int) -> tuple[list[bytes], Position]:
        """Up to `max_records` lines (about `max_bytes`) from the acknowledged position on, and the
        position just after them. Raises SinkSpoolError when a segment cannot be read."""
        with self._lock:
            start = self._acked
            segments = [(s.number, s.size, s.closed) for s in sorted(self._segments.values(), key=lambda s: s.number)]
        lines: list[bytes] = []
        nbytes = 0
        end = start
        for number, size, closed in segments:
            if number < start.segment:
                continue
            off = start.offset if number == start.segment else 0
            while off < size and len(lines) < max_records and nbytes < max_bytes:
                try:
                    data = self._pread(number, min(size - off, max(max_bytes - nbytes, READ_CHUNK)), off)
                    if b"\n" not in data and off + len(data) < size:
                        data = self._pread(number, size - off, off)  # one line longer than a chunk
                except FileNotFoundError:
                    self._forget(number)
                    off = size
                    break
                cut = data.rfind(b"\n")
                if cut < 0:
                    # No newline up to the end of this segment: the torn tail of a crashed append.
                    self.torn_bytes += size - off
                    off = size
                    break
                taken = data[:cut].split(b"\n")[: max_records - len(lines)]
                used = sum(len(line) + 1 for line in taken)
                lines.extend(taken)
                off += used
                nbytes += used
            end = Position(number, off)
            if off < size or not closed:
                break
        return lines, end

    def _pread(self, number: int, length: int, offset: int) -> bytes:
        if self._read_fd is None or self._read_fd[0] != number:
            self._close_reader()
            try:
                fd = os.open(self.dir / segment_name(number), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise SinkSpoolError(f"cannot read spool segment {number}: {exc.strerror or exc}") from None
            self._read_fd = (number, fd)
        try:
            return os.pread(self._read_fd[1], length, offset)
        except OSError as exc:
            raise SinkSpoolError(f"cannot read spool segment {number}: {exc.strerror or exc}") from None

    def _close_reader(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None

    def _forget(self, number: int) -> None:
        with self._lock:
            if number in self._segments and self._segments[number].closed:
                del self._segments[number]
                self.lost_segments += 1

    def ack(self, end: Position, consumed: int) -> None:
        """The receiver acknowledged everything before `end`: delete the segments passed, persist."""
        with self._lock:
            self._acked = end
            self._acked_records += consumed
            doomed = [
                n
                for n, s in self._segments.items()
                if n < end.segment or (n == end.segment and s.closed and end.offset >= s.size)
            ]
            for n in doomed:
                del self._segments[n]
        if self._read_fd is not None and self._read_fd[0] in doomed:
            self._close_reader()
        for n in doomed:
            self._unlink(n)
        # Not fsync'd: a stale `acked` after power loss means re-delivering a batch, never losing one.
        with contextlib.suppress(OSError):
            self._write_atomic("acked", orjson.dumps({"segment": end.segment, "offset": end.offset}), durable=False)

    # ---------------------------------------------------------------- status and shutdown
    def acked_position(self) -> Position:
        with self._lock:
            return self._acked

    def close_reader(self) -> None:
        """Release the read fd (the worker, when it stops)."""
        self._close_reader()

    def pending(self) -> tuple[int | None, int]:
        """(records not yet acknowledged — None while an earlier run's spool is being counted, bytes)."""
        with self._lock:
            size = sum(s.size for s in self._segments.values())
            if self._acked.segment in self._segments:
                size -= min(self._acked.offset, self._segments[self._acked.segment].size)
            records = None
            if self._earlier_records is not None:
                records = max(0, self._earlier_records + self._appended - self._acked_records)
            return records, max(0, size)

    def close(self) -> None:
        """Make everything appended durable and close the segment being written (an append after this
        opens a new one). The read side belongs to the worker, which releases it with close_reader()."""
        with self._lock:
            self._retire()
        self.sync(force_through=True)
