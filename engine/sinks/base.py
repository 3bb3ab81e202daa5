"""What every sink shares: the batch handed to a sender, the sender protocol, and the backoff rule.

Pure functions and plain data; no I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a sink's spool: segment number and byte offset within it."""

    segment: int
    offset: int


@dataclass(frozen=True)
class Batch:
    """Records read from the spool, in spool order, for one delivery (and its retries).

    `lines[i]` is the exact JSON of `records[i]` as spooled; `consumed` counts spool lines including
    any that could not be parsed, so acknowledging the batch moves past them too."""

    lines: tuple[bytes, ...]
    records: tuple[Mapping[str, Any], ...]
    end: Position
    consumed: int

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def key(self) -> str:
        """A deterministic name for this batch: `<chain>:<first seq>-<last seq>` (ids when unchained).
        The same batch retried carries the same key, so a receiver can de-duplicate whole deliveries."""
        return delivery_key(self.records)


class Sender(Protocol):
    """Delivers one batch or raises DeliveryError. Runs on the sink's own thread, never on the loop."""

    target: str  # how logs and status name the destination: never a secret
    max_records: int
    max_bytes: int
    linger: float  # seconds to wait for a fuller batch when there is less than max_records to send

    def send(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SenderContext:
    """What a sink module's `create(spec, ctx)` gets besides its spec."""

    timeout: float
    redact: Callable[[str], str]
    environ: Mapping[str, str]
    clock: Callable[[], float]
    hostname: str
    max_records: int | None
    linger: float | None


def delivery_key(records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        return "empty"
    first, last = records[0], records[-1]
    chain, seq0, seq1 = first.get("chain_id"), first.get("seq"), last.get("seq")
    if isinstance(chain, str) and type(seq0) is int and type(seq1) is int and last.get("chain_id") == chain:
        return f"{chain}:{seq0}-{seq1}"
    return f"{first.get('id')}..{last.get('id')}"


def chain_runs(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """Index ranges [start, end) of consecutive records from the same chain."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i].get("chain_id") != records[start].get("chain_id"):
            runs.append((start, i))
            start = i
    return runs


def epoch_of(record: Mapping[str, Any]) -> float | None:
    """The DPR's RFC 3339 `time` as epoch seconds (microsecond precision), or None."""
    text = record.get("time")
    if not isinstance(text, str):
        return None
    try:
        return round(datetime.fromisoformat(text).timestamp(), 6)
    except ValueError:
        return None


def backoff_delay(failures: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait after the `failures`-th consecutive failure: exponential from `base`, capped at
    `cap`, with "equal jitter" (half fixed, half random) so that many engines recovering from the
    same outage do not retry in lockstep."""
    exp: float = min(cap, base * 2.0 ** max(0, failures - 1))
    return exp / 2 + rand() * exp / 2
