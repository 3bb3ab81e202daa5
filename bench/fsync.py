"""The disk's durable-append latency on a given directory: write(~200 B) + fdatasync, one at a time.

This is the floor under `wal_sync = "full"`: SQLite in WAL journal mode appends the transaction's
frames to `<db>-wal` and syncs that file once per commit. The probe appends to a file in the very
directory the WAL uses, so it measures the same filesystem and device.

    .venv/bin/python bench/fsync.py DIR [--samples N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECORD_BYTES = 200


@dataclass(frozen=True)
class FsyncResult:
    directory: str
    filesystem: str
    samples: int
    p50_us: float
    p99_us: float
    mean_us: float
    in_place: bool = False


def filesystem_of(path: Path) -> str:
    """`ext4 /dev/vda on /`: the mount holding `path` (longest mount-point prefix in /proc/mounts)."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                device, mount, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[1])):
                    best = (device, mount, fstype)
    except OSError:
        best = None
    if best is None:
        return "unknown filesystem"
    device, mount, fstype = best
    return f"{fstype} {device} on {mount}"


def _percentile_us(sorted_ns: list[int], q: float) -> float:
    rank = max(1, min(len(sorted_ns), round(q / 100 * len(sorted_ns) + 0.5)))
    return sorted_ns[rank - 1] / 1000


def measure_fdatasync(directory: Path, samples: int = 2000, warmup: int = 50, *, in_place: bool = False) -> FsyncResult:
    """Write RECORD_BYTES and fdatasync, `samples` times (after `warmup`), timing each pair.

    Default: appends (the file grows, so each sync also commits its new size: a WAL being filled).
    `in_place`: overwrites within a preallocated, already-synced 4 MiB file (SQLite reuses its
    `-wal` file from the start after each checkpoint, so most commits in a long run look like this)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / "fdatasync-probe.bin"
    payload = (b"x" * (RECORD_BYTES - 1)) + b"\n"
    span = 4 << 20
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | (0 if in_place else os.O_APPEND)
    fd = os.open(probe, flags, 0o600)
    clock = time.perf_counter_ns
    out = [0] * samples
    try:
        if in_place:
            os.write(fd, b"\0" * span)
            os.fsync(fd)

        def one(i: int) -> None:
            if in_place:
                os.pwrite(fd, payload, (i * RECORD_BYTES) % span)
            else:
                os.write(fd, payload)
            os.fdatasync(fd)

        for i in range(warmup):
            one(i)
        for i in range(samples):
            t0 = clock()
            one(warmup + i)
            out[i] = clock() - t0
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    out.sort()
    return FsyncResult(
        str(directory),
        filesystem_of(directory),
        samples,
        _percentile_us(out, 50),
        _percentile_us(out, 99),
        sum(out) / len(out) / 1000,
        in_place,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--samples", type=int, default=2000)
    opts = ap.parse_args(argv)
    for in_place in (False, True):
        r = measure_fdatasync(opts.directory, opts.samples, in_place=in_place)
        how = "overwrite in place" if in_place else "append"
        print(
            f"write {RECORD_BYTES} B ({how}) + fdatasync on {r.filesystem} ({r.directory}): {r.samples} samples,"
            f" p50 {r.p50_us:,.0f} µs, p99 {r.p99_us:,.0f} µs, mean {r.mean_us:,.0f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
