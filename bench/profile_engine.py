"""Where a decision's time goes inside `faramesh serve`: per-stage timers, group-commit batch sizes,
per-thread CPU, and (optionally) a py-spy GIL profile — under one client and under 16.

    .venv/bin/python bench/profile_engine.py [--sync normal|full] [--seconds 5] [--py-spy]

The engine runs as its own process exactly as `faramesh serve` does (launchers/serve.main, same
policy, SQLite WAL, sockets), with timers wrapped around the engine's functions at import time in
that process (nothing in the engine's source changes). The wrappers cost ~0.3 µs each and about a
dozen run per decision, so absolute totals read a few µs high; the proportions are what to use.
Stages nest: "of which" rows are contained in the row above them. Load comes from the same client
processes as bench/engine_bench.py. `--py-spy` (pip install py-spy) samples which Python function
holds the GIL in the 16-client phase and prints the top functions by own time; add `--plain` to
leave the timers out so the profile is of the unmodified engine. `--with-budget` gives the agent the
seed's daily budget; `--inline-commit` is a what-if (commits on the loop thread), not the engine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

# (label, module, attribute path, depth, kind); kind: "call" | "batch" (first arg's length) | "commit"
STAGES: list[tuple[str, str, str, int, str]] = [
    ("protocol.decode", "faramesh.engine.server", "decode", 0, "call"),
    (
        "EngineServer._verb_govern (whole verb, incl. WAL wait)",
        "faramesh.engine.server",
        "EngineServer._verb_govern",
        0,
        "async",
    ),
    ("EngineServer._ids (discarded ULID + rfc3339)", "faramesh.engine.server", "EngineServer._ids", 1, "call"),
    ("new_ulid (server module: both ULIDs)", "faramesh.engine.server", "new_ulid", 1, "call"),
    ("EngineState.govern (the pipeline)", "faramesh.engine.pipeline", "EngineState.govern", 1, "call"),
    ("evaluate (rules, rate, budget)", "faramesh.engine.pipeline", "evaluate", 2, "call"),
    ("args_hmac (JCS + HMAC of raw args)", "faramesh.engine.pipeline", "args_hmac", 2, "call"),
    ("redact", "faramesh.engine.pipeline", "redact", 2, "call"),
    ("canonical_bytes (redacted args)", "faramesh.engine.pipeline", "canonical_bytes", 2, "call"),
    ("args_digest (JCS again + sha256)", "faramesh.engine.pipeline", "args_digest", 2, "call"),
    ("EngineState.expire_reservations", "faramesh.engine.pipeline", "EngineState.expire_reservations", 1, "call"),
    ("Wal.append (queue + future)", "faramesh.engine.wal.log", "Wal.append", 1, "call"),
    ("append → commit done (wait)", "", "", 1, "wait"),
    ("protocol.encode_result", "faramesh.engine.server", "encode_result", 0, "call"),
    ("StreamWriter.write (reply send syscall)", "asyncio.streams", "StreamWriter.write", 0, "call"),
    ("Wal._build (per batch: chain + canonical bytes)", "faramesh.engine.wal.log", "Wal._build", 0, "batch"),
    ("record_body (DPR canonical bytes)", "faramesh.engine.wal.log", "record_body", 1, "call"),
    ("SqliteStore.commit (wal-writer thread)", "faramesh.engine.wal.store", "SqliteStore.commit", 0, "commit"),
]


# ---- the child: an instrumented `faramesh serve` -------------------------------------------------------


def _child(out_path: str, serve_argv: list[str]) -> int:
    import asyncio
    import importlib
    import threading

    clock = time.perf_counter_ns
    lock = threading.Lock()
    stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # calls, ns, calls over 1 ms
    batches: collections.Counter[int] = collections.Counter()
    missing: list[str] = []

    def add(label: str, ns: int) -> None:
        with lock:
            s = stats[label]
            s[0] += 1
            s[1] += ns
            if ns > 1_000_000:
                s[2] += 1

    def wrap_call(label: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                add(label, clock() - t0)

        return wrapper

    def wrap_async(label: str, fn: Any) -> Any:
        async def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return await fn(*a, **k)
            finally:
                add(label, clock() - t0)

        return wrapper

    def wrap_append(label: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            fut = fn(*a, **k)
            add(label, clock() - t0)
            fut.add_done_callback(lambda _f: add("append → commit done (wait)", clock() - t0))
            return fut

        return wrapper

    def wrap_build(label: str, fn: Any) -> Any:
        def wrapper(self: Any, taken: list[Any]) -> Any:
            t0 = clock()
            try:
                return fn(self, taken)
            finally:
                add(label, clock() - t0)

        return wrapper

    def wrap_commit(label: str, fn: Any) -> Any:
        def wrapper(self: Any, batch: Any) -> Any:
            t0 = clock()
            try:
                return fn(self, batch)
            finally:
                add(label, clock() - t0)
                n = len(batch.records)
                if n:
                    with lock:
                        batches[n] += 1

        return wrapper

    plain = bool(os.environ.get("FM_PROFILE_PLAIN"))
    for label, module_name, attr, _depth, kind in STAGES:
        if kind == "wait" or plain:
            continue
        module = importlib.import_module(module_name)
        owner: Any = module
        parts = attr.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
        original = getattr(owner, parts[-1], None) if owner is not None else None
        if original is None:
            missing.append(label)
            continue
        if label.startswith("Wal.append"):
            wrapped = wrap_append(label, original)
        elif kind == "async":
            wrapped = wrap_async(label, original)
        elif kind == "batch":
            wrapped = wrap_build(label, original)
        elif kind == "commit":
            wrapped = wrap_commit(label, original)
        else:
            wrapped = wrap_call(label, original)
        setattr(owner, parts[-1], wrapped)

    def thread_cpu() -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                raw = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue
            name = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2 :].split()
            key = "main" if tid == str(os.getpid()) else f"{name}:{tid}"
            out[key] = (int(fields[11]) + int(fields[12])) / tick
        return out

    cpu_mark = [thread_cpu(), time.monotonic()]

    def dump(_sig: int, _frame: Any) -> None:
        now_cpu, now = thread_cpu(), time.monotonic()
        with lock:
            snapshot = {
                "stats": {k: list(v) for k, v in stats.items()},
                "batches": dict(batches),
                "missing": missing,
                "cpu": {k: v - cpu_mark[0].get(k, 0.0) for k, v in now_cpu.items()},
                "wall": now - cpu_mark[1],
            }
            stats.clear()
            batches.clear()
        cpu_mark[0], cpu_mark[1] = now_cpu, now
        tmp = out_path + ".tmp"
        Path(tmp).write_text(json.dumps(snapshot))
        os.replace(tmp, out_path)

    if os.environ.get("FM_PROFILE_INLINE_COMMIT"):
        # What-if experiment (--inline-commit): the WAL commit runs on the event-loop thread instead of
        # the wal-writer thread, removing the thread hand-off and GIL ping-pong per group commit.
        import concurrent.futures

        from faramesh.engine.wal import log as wal_log

        class _Inline(concurrent.futures.Executor):
            def submit(self, fn: Any, /, *a: Any, **k: Any) -> concurrent.futures.Future[Any]:
                fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
                try:
                    fut.set_result(fn(*a, **k))
                except BaseException as exc:
                    fut.set_exception(exc)
                return fut

        original_init = wal_log.Wal.__init__

        def init(self: Any, *a: Any, **k: Any) -> None:
            original_init(self, *a, **k)
            self._executor = _Inline()

        wal_log.Wal.__init__ = init  # type: ignore[method-assign]

    signal.signal(signal.SIGUSR1, dump)
    del asyncio
    from faramesh.launchers.serve import main as serve_main

    return serve_main(serve_argv)


# ---- the parent: drive load, collect, report -----------------------------------------------------------


def _snapshot(pid: int, path: Path) -> dict[str, Any]:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        time.sleep(0.02)
    raise RuntimeError("the instrumented engine did not answer SIGUSR1")


def _report(title: str, snap: dict[str, Any], decisions_hint: int) -> list[str]:
    stats = snap["stats"]
    decisions = stats.get("EngineState.govern (the pipeline)", [decisions_hint, 0])[0] or decisions_hint
    out = [f"{title}: {decisions:,} decisions in {snap['wall']:.1f} s ({decisions / snap['wall']:,.0f}/s)"]
    rows = [("stage", "calls", "µs/call", "µs/decision", "calls > 1 ms")]
    for label, _m, _a, depth, kind in STAGES:
        if label not in stats:
            continue
        calls, ns, slow = stats[label]
        per_call = ns / calls / 1000 if calls else 0.0
        per_dec = ns / decisions / 1000 if decisions else 0.0
        name = ("  " * depth) + ("of which " if depth and kind != "wait" else "") + label
        if kind == "wait":
            name = "  " * depth + label
        rows.append((name, f"{calls:,}", f"{per_call:,.1f}", f"{per_dec:,.1f}", f"{slow:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for n, r in enumerate(rows if len(rows) > 1 else []):
        out.append(
            "  " + r[0].ljust(widths[0]) + "  " + "  ".join(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))
        )
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    b = {int(k): v for k, v in snap["batches"].items()}
    if b:
        commits = sum(b.values())
        recs = sum(k * v for k, v in b.items())
        buckets = collections.Counter()
        for size, count in b.items():
            key = "1" if size == 1 else "2-3" if size <= 3 else "4-7" if size <= 7 else "8-15" if size <= 15 else "16+"
            buckets[key] += count
        shown = ", ".join(f"{k}: {buckets[k]:,}" for k in ("1", "2-3", "4-7", "8-15", "16+") if buckets[k])
        out.append(f"  group commit: {commits:,} transactions, {recs / commits:.1f} records each on average ({shown})")
    cpu = snap["cpu"]
    total = sum(cpu.values())
    # Python 3.11 does not name OS threads: the only other busy thread is the WAL's writer.
    names = {k: ("main thread" if k == "main" else "other threads (wal-writer)") for k in cpu}
    per_name: collections.Counter[str] = collections.Counter()
    for k, v in cpu.items():
        per_name[names[k]] += v
    parts = ", ".join(f"{name} {v / snap['wall']:.2f}" for name, v in per_name.most_common() if v)
    out.append(
        f"  engine CPU: {total / snap['wall']:.2f} cores ({parts});"
        f" {total / decisions * 1e6:,.0f} µs of CPU per decision"
    )
    if snap["missing"]:
        out.append(f"  (not instrumented, not found in this build: {', '.join(snap['missing'])})")
    return out


def _py_spy_summary(raw: Path, top: int = 22) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        total += int(n)
        if len(frames) > 1:
            own[re.sub(r":\d+\)", ")", frames[-1])] += int(n)
    out = [f"py-spy --gil, 16 clients: {total:,} samples of the GIL holder; top functions by own time"]
    for fn, n in own.most_common(top):
        out.append(f"  {n / total:6.1%}  {fn}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        return _child(args[1], args[3:] if args[2:3] == ["--"] else args[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sync", choices=("normal", "full"), default="normal")
    ap.add_argument("--seconds", type=float, default=5.0, help="16-client window")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--py-spy", action="store_true", help="also sample the GIL holder with py-spy")
    ap.add_argument(
        "--inline-commit",
        action="store_true",
        help="what-if: run each WAL commit on the loop thread (no wal-writer hand-off); not the engine's behaviour",
    )
    ap.add_argument(
        "--with-budget",
        action="store_true",
        help="give the agent the seed's daily budget (permits then hold reservations; the bench never completes them)",
    )
    ap.add_argument(
        "--plain", action="store_true", help="no stage timers (CPU per thread only; for a clean py-spy profile)"
    )
    opts = ap.parse_args(args)
    if opts.plain:
        os.environ["FM_PROFILE_PLAIN"] = "1"
    if opts.with_budget:
        import engine_bench

        engine_bench.AGENT_FPL = engine_bench.AGENT_FPL.replace(
            "  redact", "  budget daily { max $1000000 on_exceed defer }\n  redact"
        )
    if opts.inline_commit:
        os.environ["FM_PROFILE_INLINE_COMMIT"] = "1"

    from engine_bench import Engine, bench_root
    from wire_client import concurrent, percentile_us, sequential

    root = bench_root()
    stats_path = root / "profile.json"
    engine = Engine(root, opts.sync)
    what_if = " — WHAT-IF: commits inline on the loop thread" if opts.inline_commit else ""
    what_if += " — with the seed's daily budget" if opts.with_budget else ""
    out: list[str] = [
        f"faramesh serve, sqlite wal_sync={opts.sync}, instrumented (bench/profile_engine.py){what_if}",
        "",
    ]
    try:
        engine.start(launcher=[sys.executable, str(Path(__file__).resolve()), "--child", str(stats_path), "--"])
        assert engine.proc is not None
        pid = engine.proc.pid
        sequential(engine.agent_socket, 500, 0)
        _snapshot(pid, stats_path)  # reset after warm-up
        seq = sequential(engine.agent_socket, 3000, 0)
        snap = _snapshot(pid, stats_path)
        out += _report(
            f"1 client, sequential (round trip p50 {percentile_us(seq.latencies_ns, 50):,.0f} µs)", snap, 3000
        )
        out.append("")
        conc = concurrent(engine.agent_socket, opts.clients, 0.0, opts.seconds, expect=b'"effect"')
        snap = _snapshot(pid, stats_path)
        out += _report(
            f"{opts.clients} client processes (client-side {conc.per_s:,.0f}/s, round trip p50"
            f" {percentile_us(conc.latencies_ns, 50):,.0f} µs)",
            snap,
            conc.completed,
        )
        if opts.py_spy:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            raw = root / "py-spy.txt"
            proc = subprocess.Popen(
                [spy, "record", "--gil", "--format", "raw", "-r", "400", "-d", str(int(opts.seconds)), "-o", str(raw),
                 "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.3)
            concurrent(engine.agent_socket, opts.clients, 0.0, opts.seconds, expect=b'"effect"')
            proc.wait(30)
            out.append("")
            out += _py_spy_summary(raw) if raw.exists() else ["py-spy produced no profile (ptrace not permitted?)"]
    finally:
        code = engine.stop()
        shutil.rmtree(root, ignore_errors=True)
    out.append(f"\nengine exit {code} after SIGTERM")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
