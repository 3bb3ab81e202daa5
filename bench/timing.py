"""Per-call latency measurement with time.perf_counter_ns, and the statistics the table reports."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Stats:
    calls: int
    p50_us: float
    p99_us: float
    mean_us: float

    @property
    def calls_per_s(self) -> float:
        # Single-threaded throughput implied by the mean; the per-call timer pair is included.
        return 1e6 / self.mean_us if self.mean_us > 0 else float("inf")


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile, in µs."""
    if not sorted_ns:
        return float("nan")
    rank = max(1, min(len(sorted_ns), round(q / 100 * len(sorted_ns) + 0.5)))
    return sorted_ns[rank - 1] / 1000


def stats(samples_ns: list[int]) -> Stats:
    ordered = sorted(samples_ns)
    mean = sum(ordered) / len(ordered) / 1000
    return Stats(len(ordered), percentile(ordered, 50), percentile(ordered, 99), mean)


def time_calls(fn: Callable[[Any, Any], object], first: Any, inputs: Sequence[Any]) -> list[int]:
    """Latency of `fn(first, x)` for each x, in ns.

    `fn(first, x)` rather than a closure so Faramesh's `evaluate(policy, request)` is called
    directly, with no wrapper frame in its numbers. The GC stays enabled (as in the engine), but
    starts each run from a clean heap so one run's garbage is not collected in the next."""
    clock = time.perf_counter_ns
    out = [0] * len(inputs)
    gc.collect()
    for i, x in enumerate(inputs):
        t0 = clock()
        fn(first, x)
        out[i] = clock() - t0
    return out


def timer_overhead_ns(n: int = 20_000) -> float:
    """p50 of an empty timed region: what every sample carries on top of the call itself."""
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        out[i] = clock() - t0
    out.sort()
    return float(out[n // 2])
