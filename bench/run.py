"""`make bench`: six sections, in this order, each comparing against a baseline measured in the same run.

1. Decision latency: Faramesh's `evaluate` beside Cedar (cedarpy); what is timed is described below.
2. The engine end to end (bench/engine_bench.py): fdatasync, echo floor, `faramesh serve` with the
   SQLite WAL at both sync levels, `audit verify` speed.
3. Checkpoint signing (bench/kms_bench.py): `faramesh serve` with wal_sync = "full", checkpoints signed
   through a moto_server KMS beside the local key, with and without `signing_required` (decisions/s,
   p50/p99, permits alone); the KMS rows are skipped, not failed, when moto is not installed.
4. Sandbox launch latency (bench/launch_bench.py): `/bin/true` under profile `full` beside bwrap and
   firejail (needs root).
5. The egress proxy (bench/proxy_bench.py): engine/proxy.py's child beside a direct loopback connection
   (and tinyproxy when it is installed): round trip, new connection, streaming MB/s, plain-HTTP GET.
6. systemd exposure (bench/systemd_security.py): `systemd-analyze security --offline=true` scores of
   the engine and supervisor units against their goals (deterministic, not a timing).
The exit status is 1 when any section that ran missed a goal or could not measure.

    .venv/bin/python bench/run.py                  # everything (`make bench`)
    .venv/bin/python bench/run.py --quick          # a smoke run of every section: short windows
    .venv/bin/python bench/run.py --profile        # also cProfile Faramesh (seed, 1,000 rules)
    .venv/bin/python bench/run.py --engine-only    # one section only; several --*-only flags
    .venv/bin/python bench/run.py --kms-only       #   run those sections (the decision table
    .venv/bin/python bench/run.py --launch-only    #   runs only when no --*-only flag is given)
    .venv/bin/python bench/run.py --proxy-only
    .venv/bin/python bench/run.py --systemd-only
    .venv/bin/python bench/run.py --no-engine      # skip a section: --no-engine, --no-kms, --no-launch,
    .venv/bin/python bench/run.py --no-proxy       #   --no-proxy, --no-systemd (combinable)

Decision latency, what is timed per call with time.perf_counter_ns:
- Faramesh: `evaluate(policy, request)` from the request dict as the wire decoder yields it to a
  Decision; the rate-limit and budget checks run inside it (against the empty state snapshot).
- Cedar: `cedarpy.is_authorized(request, policy_set, entities)` with the policy set and the (empty)
  entity set parsed once, outside the loop. The Cedar request dict is built from the same wire
  request before the loop, so the conversion is not charged to Cedar.
Only the request varies between calls: every call gets a fresh args dict, so neither engine can
answer from a cache keyed on args. Decisions are checked for agreement before anything is timed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import cedarpy
from cedar_policies import SEED_CEDAR, cedar_request, effect_of, translate
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.evaluate import DEFER, DENY, PERMIT, evaluate
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.policy.parser import parse_fpl
from timing import Stats, stats, time_calls, timer_overhead_ns
from workloads import (
    AGENT,
    REQUEST_TIME,
    SEED_FPL,
    generate_rules,
    large_requests,
    large_requests_unique_tools,
    render_fpl,
    seed_requests,
)

GOAL_P50_US = {"seed": 10.0, "large": 50.0, "large-new-ids": 50.0}
GOALS_LINE = "goals: p50 ≤ 10 µs seed, ≤ 50 µs 1,000 rules, faster than Cedar"


@dataclass(frozen=True)
class Config:
    calls: int  # timed Faramesh calls per workload
    warmup: int
    cedar_calls: int  # upper bound on timed Cedar calls per workload
    cedar_budget_s: float  # Cedar's timed run stops growing past this (calibrated from warm-up)
    verify_sample: int
    batch: int  # cedarpy batch size for the amortised figure


FULL = Config(calls=20_000, warmup=2_000, cedar_calls=20_000, cedar_budget_s=5.0, verify_sample=4_000, batch=100)
QUICK = Config(calls=2_000, warmup=300, cedar_calls=1_000, cedar_budget_s=0.5, verify_sample=500, batch=50)


@dataclass
class Workload:
    key: str
    label: str
    fpl_rules: int
    policy: CompiledPolicy
    cedar_text: str
    cedar_policies: int
    requests: list[dict[str, Any]]  # warm-up first, then the timed calls
    cedar_counts: dict[str, int] | None = None  # from translate(): how the rules became Cedar policies
    cedar_handles: tuple[Any, Any] = (None, None)
    cedar_reqs: list[dict[str, Any]] | None = None


@dataclass
class Result:
    ours: Stats
    cedar: Stats
    cedar_core_us: float  # Cedar's own authz_duration_micros, p50
    cedar_build_us: float  # Cedar's own build_request_duration_micros, p50
    cedar_batch_us: float  # per request via is_authorized_batch
    cedar_reparse_us: float  # per call when the policy text is passed instead of a PolicySet


def compile_fpl(text: str) -> CompiledPolicy:
    return compile_files(parse_fpl(text, "governance.fms"), {"governance.fms": "bench"}, env={})


def lib_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- building ------------------------------------------------------------------------------------


def build(cfg: Config) -> list[Workload]:
    n = cfg.warmup + cfg.calls
    seed_policy = compile_fpl(SEED_FPL)
    rules = generate_rules(1000)
    large_policy = compile_fpl(render_fpl(rules))
    large_cedar, counts = translate(rules)
    n_cedar_large = counts["permit"] + counts["defer"] + counts["forbid"]
    return [
        Workload("seed", "seed support-bot", 5, seed_policy, SEED_CEDAR, 4, seed_requests(n)),
        Workload(
            "large", "1,000 rules", 1000, large_policy, large_cedar, n_cedar_large, large_requests(rules, n), counts
        ),
        Workload(
            "large-new-ids",
            "1,000 rules, new tool ids",
            1000,
            large_policy,
            large_cedar,
            n_cedar_large,
            large_requests_unique_tools(rules, n),
            counts,
        ),
    ]


def prepare_cedar(w: Workload) -> None:
    # Parsed once: cedarpy keeps a parsed policy set in a PolicySet handle, and entities in an
    # Entities handle (the bench has no entities; an empty, pre-parsed set is passed).
    w.cedar_handles = (cedarpy.PolicySet.from_str(w.cedar_text), cedarpy.Entities.from_json_str("[]"))
    w.cedar_reqs = [cedar_request(r) for r in w.requests]


def _cedar_call(handles: tuple[Any, Any], request: dict[str, Any]) -> Any:
    return cedarpy.is_authorized(request, handles[0], handles[1])


# ---- correctness ---------------------------------------------------------------------------------


def check_seed_cases(seed: Workload) -> list[str]:
    """The seed's documented outcomes, on both sides."""
    failures = []
    for amount, want in ((10, PERMIT), (100, DEFER), (1000, DENY)):
        req = {"agent_id": AGENT, "tool_id": "refund", "args": {"amount": amount}, "time": REQUEST_TIME}
        ours = evaluate(seed.policy, req).effect
        theirs = effect_of(_cedar_call(seed.cedar_handles, cedar_request(req)))
        if ours != want or theirs != want:
            failures.append(f"refund {amount}: want {want}, faramesh {ours}, cedar {theirs}")
    return failures


def compare(w: Workload, sample: int) -> tuple[int, int, Counter[str]]:
    """(3-way mismatches, permit/deny mismatches, our decision mix) over the first `sample` requests.

    Permit/deny treats DEFER as not-denied: Cedar allows it, Faramesh holds it for a human."""
    assert w.cedar_reqs is not None
    three = two = 0
    mix: Counter[str] = Counter()
    for req, creq in zip(w.requests[:sample], w.cedar_reqs[:sample], strict=True):
        ours = evaluate(w.policy, req)
        theirs = effect_of(_cedar_call(w.cedar_handles, creq))
        mix[ours.code if ours.code not in ("POLICY_PERMIT", "POLICY_DEFER", "POLICY_DENY") else ours.effect] += 1
        three += ours.effect != theirs
        two += (ours.effect == DENY) != (theirs == DENY)
    return three, two, mix


# ---- timing --------------------------------------------------------------------------------------


def run_workload(w: Workload, cfg: Config) -> Result:
    assert w.cedar_reqs is not None
    warm, timed = w.requests[: cfg.warmup], w.requests[cfg.warmup :]
    for req in warm:
        evaluate(w.policy, req)
    ours = stats(time_calls(evaluate, w.policy, timed))

    cwarm, ctimed = w.cedar_reqs[: cfg.warmup], w.cedar_reqs[cfg.warmup :]
    cwarm = cwarm[: max(100, cfg.warmup // 4)]
    t0 = time.perf_counter()
    for creq in cwarm:
        _cedar_call(w.cedar_handles, creq)
    per_call = (time.perf_counter() - t0) / len(cwarm)
    # Cedar's call count is capped by a time budget so the whole bench stays under a minute.
    n_cedar = int(min(cfg.cedar_calls, len(ctimed), max(500, cfg.cedar_budget_s / per_call)))
    cedar = stats(time_calls(_cedar_call, w.cedar_handles, ctimed[:n_cedar]))

    # Cedar's self-reported timings, read from results outside the timed loop.
    core, build_req = [], []
    for creq in ctimed[: min(1000, n_cedar)]:
        m = _cedar_call(w.cedar_handles, creq).metrics
        core.append(m.get("authz_duration_micros", 0))
        build_req.append(m.get("build_request_duration_micros", 0))
    core.sort()
    build_req.sort()

    batch_reqs = ctimed[: min(n_cedar, 20 * cfg.batch)]
    t0 = time.perf_counter_ns()
    for i in range(0, len(batch_reqs), cfg.batch):
        cedarpy.is_authorized_batch(batch_reqs[i : i + cfg.batch], w.cedar_handles[0], w.cedar_handles[1])
    batch_us = (time.perf_counter_ns() - t0) / len(batch_reqs) / 1000

    # The text-per-call form cedarpy also offers (no PolicySet): it re-parses every time.
    reparse_reqs = ctimed[:20] if w.fpl_rules > 100 else ctimed[:200]
    t0 = time.perf_counter_ns()
    for creq in reparse_reqs:
        cedarpy.is_authorized(creq, w.cedar_text, w.cedar_handles[1])
    reparse_us = (time.perf_counter_ns() - t0) / len(reparse_reqs) / 1000

    return Result(ours, cedar, core[len(core) // 2], build_req[len(build_req) // 2], batch_us, reparse_us)


def profile_ours(policy: CompiledPolicy, requests: list[dict[str, Any]]) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for req in requests:
        evaluate(policy, req)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


# ---- output --------------------------------------------------------------------------------------


def fmt_us(v: float) -> str:
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def table(rows: list[list[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(
    workloads: list[Workload], results: dict[str, Result], checks: list[str], overhead_ns: float, cfg: Config
) -> str:
    head1 = ["", "", "faramesh", "", "", "", "cedarpy", "", "", "", "cedar/ours", "", ""]
    head2 = ["workload", "rules", "calls", "p50 µs", "p99 µs", "calls/s"]
    head2 += ["calls", "p50 µs", "p99 µs", "calls/s", "p50", "p99", "goal: p50 ≤"]
    rows = [head1, head2]
    for w in workloads:
        r = results[w.key]
        goal = GOAL_P50_US[w.key]
        met = "met" if r.ours.p50_us <= goal else "NOT MET"
        rows.append(
            [
                w.label,
                f"{w.fpl_rules:,}",
                f"{r.ours.calls:,}",
                fmt_us(r.ours.p50_us),
                fmt_us(r.ours.p99_us),
                fmt_rate(r.ours.calls_per_s),
                f"{r.cedar.calls:,}",
                fmt_us(r.cedar.p50_us),
                fmt_us(r.cedar.p99_us),
                fmt_rate(r.cedar.calls_per_s),
                f"{r.cedar.p50_us / r.ours.p50_us:.1f}x",
                f"{r.cedar.p99_us / r.ours.p99_us:.1f}x",
                f"{goal:g} µs {met}",
            ]
        )
    out = [table(rows, [False, True, *[True] * 10, False]), ""]

    faster = all(results[w.key].cedar.p50_us > results[w.key].ours.p50_us for w in workloads)
    faster99 = all(results[w.key].cedar.p99_us > results[w.key].ours.p99_us for w in workloads)
    out.append(GOALS_LINE)
    for w in workloads:
        r = results[w.key]
        verdict = "met" if r.ours.p50_us <= GOAL_P50_US[w.key] else "NOT MET"
        out.append(f"  {w.label}: p50 {fmt_us(r.ours.p50_us)} µs vs goal ≤ {GOAL_P50_US[w.key]:g} µs: {verdict}")
    out.append(
        f"  faster than Cedar: p50 {'met' if faster else 'NOT MET'}, p99 {'met' if faster99 else 'NOT MET'}"
        " (cedarpy calls, every workload)"
    )
    # The stricter comparison: Cedar's Rust evaluator alone, without cedarpy's marshalling.
    core = ", ".join(f"{w.label} {results[w.key].cedar_core_us / results[w.key].ours.p50_us:.1f}x" for w in workloads)
    out.append(f"  against Cedar's self-reported Rust core time alone (core/ours p50): {core}")
    out.append("")
    out.append("correctness (checked before timing):")
    out += [f"  {c}" for c in checks]
    out.append("")
    out.append("cedarpy, other ways to call it (per request, µs):")
    crow = [["workload", "Cedar", "core authz p50", "core/ours", "build_request p50", "is_authorized", "text"]]
    crow.append(["", "policies", "(self-reported)", "p50", "(self-reported)", "_batch", "re-parse"])
    for w in workloads:
        r = results[w.key]
        crow.append(
            [
                w.label,
                f"{w.cedar_policies:,}",
                f"{r.cedar_core_us:g}",
                f"{r.cedar_core_us / r.ours.p50_us:.1f}x",
                f"{r.cedar_build_us:g}",
                fmt_us(r.cedar_batch_us),
                fmt_us(r.cedar_reparse_us),
            ]
        )
    out.append(table(crow, [False, True, True, True, True, True, True]))
    large = next(w for w in workloads if w.cedar_counts is not None)
    c = large.cedar_counts or {}
    plain_deny = large.fpl_rules - sum(c.values())
    per_policy = results[large.key].cedar_core_us / large.cedar_policies
    out += [
        f"  1,000 FPL rules → {c.get('permit', 0)} permit + {c.get('defer', 0)} defer-tagged permit"
        f" + {c.get('forbid', 0)} forbid (deny!) Cedar policies;",
        f"  {plain_deny} plain `deny` rules fall to Cedar's default deny; {c.get('dropped', 0)} rules"
        " fully shadowed by an earlier rule are dropped.",
        "  Cedar's authorizer evaluates every policy on every request (no index): its core time here is"
        f" ~{per_policy:.2f} µs per policy.",
    ]
    out.append("")
    out += [
        "notes:",
        "  - Every sample is one call timed with perf_counter_ns, one thread, GC on; the timer pair adds",
        f"    ~{overhead_ns:.0f} ns to each. calls/s = 1 / mean latency.",
        "  - The seed is slower than 1,000 rules on our side: its rate limit and daily budget are checked",
        "    on every permit and defer; the generated agent has neither.",
        "  - faramesh: evaluate(policy, request) from the wire-decoded request dict to a Decision, incl. the",
        "    rate-limit and budget checks (empty state snapshot). Fresh args every call; the engine's",
        "    tool-id candidate cache (keyed on tool id, never on args) is warm except in the 'new tool ids'",
        "    row, where every glob hit and miss carries a never-seen id (literal hits still repeat).",
        "  - cedarpy: is_authorized(request, PolicySet, Entities), parsed once (cedarpy's PolicySet and",
        "    Entities handles); uids as {type,id} dicts (its fastest form); the Cedar request is built",
        "    outside the timed loop. 'core authz' is Cedar's own authz_duration_micros (whole µs): the Rust",
        "    evaluator alone, without request building or the Python<->Rust JSON marshalling that the",
        f"    timed call includes. Batch: is_authorized_batch in batches of {cfg.batch}, time / requests.",
        '  - Cedar has no defer: defer rules are Cedar permits tagged @id("defer:…"); first-match-wins is',
        "    encoded by excluding earlier overlapping rules of another effect in each permit's `when`, and",
        "    `deny` rules fall to Cedar's default deny; `deny!` is a forbid. Rate limits and budgets have",
        "    no Cedar counterpart (they allow on the empty state), so Cedar does less work per call here.",
    ]
    return "\n".join(out)


SECTIONS = ("engine", "kms", "launch", "proxy", "systemd")  # after the decision table, in this order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke run of every section")
    ap.add_argument(
        "--profile", action="store_true", help="also cProfile faramesh on the seed and 1,000-rule workloads"
    )
    ap.add_argument("--no-engine", action="store_true", help="skip the end-to-end engine section")
    ap.add_argument("--engine-only", action="store_true", help="only the end-to-end engine section")
    ap.add_argument("--kms-only", action="store_true", help="only the checkpoint-signing (KMS) section")
    ap.add_argument("--no-kms", action="store_true", help="skip the checkpoint-signing (KMS) section")
    ap.add_argument("--launch-only", action="store_true", help="only the sandbox launch-latency section")
    ap.add_argument("--no-launch", action="store_true", help="skip the sandbox launch-latency section")
    ap.add_argument("--proxy-only", action="store_true", help="only the egress proxy section")
    ap.add_argument("--no-proxy", action="store_true", help="skip the egress proxy section")
    ap.add_argument("--systemd-only", action="store_true", help="only the systemd exposure section")
    ap.add_argument("--no-systemd", action="store_true", help="skip the systemd exposure section")
    opts = ap.parse_args(argv)
    only = [name for name in SECTIONS if getattr(opts, f"{name}_only")]
    clash = [name for name in only if getattr(opts, f"no_{name}")]
    if clash:
        ap.error(f"--{clash[0]}-only and --no-{clash[0]} contradict each other")
    runners = {
        "engine": engine_section,
        "kms": kms_section,
        "launch": launch_section,
        "proxy": proxy_section,
        "systemd": systemd_section,
    }
    if only:
        selected = only
        ok = True
    else:
        selected = [name for name in SECTIONS if not getattr(opts, f"no_{name}")]
        ok = decision_section(opts) == 0
    for n, name in enumerate(selected):
        if n or not only:
            print()
        ok = runners[name](opts.quick) == 0 and ok
    return 0 if ok else 1


def launch_section(quick: bool) -> int:
    from launch_bench import run_all as run_launch

    text, ok = run_launch(quick)
    print(text, flush=True)
    return 0 if ok else 1


def engine_section(quick: bool) -> int:
    from engine_bench import run_all

    text, ok = run_all(quick)
    print(text, flush=True)
    return 0 if ok else 1


def kms_section(quick: bool) -> int:
    from kms_bench import run_all as run_kms

    text, ok = run_kms(quick)
    print(text, flush=True)
    return 0 if ok else 1


def proxy_section(quick: bool) -> int:
    from proxy_bench import run_all as run_proxy

    text, ok = run_proxy(quick)
    print(text, flush=True)
    return 0 if ok else 1


def systemd_section(quick: bool) -> int:
    """Scores are deterministic for a given unit file and systemd: --quick changes nothing here."""
    del quick
    from systemd_security import main as systemd_main

    return systemd_main([])


def decision_section(opts: argparse.Namespace) -> int:
    cfg = QUICK if opts.quick else FULL
    started = time.perf_counter()

    quick_note = " (--quick: few iterations, numbers are rough)" if opts.quick else ""
    print(f"Faramesh decision latency vs Cedar{quick_note}")
    print(
        f"python {platform.python_version()} · faramesh {lib_version('faramesh')} · lark {lib_version('lark')}"
        f" · cedarpy {lib_version('cedarpy')}"
    )
    print(f"{platform.system()} {platform.machine()} · {cpu_model()} · {os.cpu_count()} CPUs")
    print(GOALS_LINE)
    print()

    workloads = build(cfg)
    for w in workloads:
        prepare_cedar(w)

    checks: list[str] = []
    failures = check_seed_cases(workloads[0])
    checks.append(
        "seed refund 10 → PERMIT, 100 → DEFER, 1000 → DENY on both sides: "
        + ("ok" if not failures else "FAILED: " + "; ".join(failures))
    )
    bad = bool(failures)
    for w in workloads:
        three, two, mix = compare(w, cfg.verify_sample)
        bad |= bool(two or three)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(mix.items()))
        checks.append(
            f"{w.label}: {min(cfg.verify_sample, len(w.requests)):,} requests, permit/deny mismatches {two},"
            f" PERMIT/DEFER/DENY mismatches {three} (faramesh: {shown})"
        )

    overhead = timer_overhead_ns()
    results = {w.key: run_workload(w, cfg) for w in workloads}
    print(report(workloads, results, checks, overhead, cfg))
    print(f"\nbench wall time {time.perf_counter() - started:.1f} s", flush=True)

    if opts.profile:
        # Fresh streams (other random seeds): ids the timed runs never saw, so the candidate cache
        # is as cold in the profile as in the 'new tool ids' row.
        seed_w, large_w = workloads[0], workloads[2]
        print("\ncProfile, faramesh evaluate, seed workload (sorted by own time):")
        print(profile_ours(seed_w.policy, seed_requests(cfg.calls, seed=99)))
        print("cProfile, faramesh evaluate, 1,000 rules with new tool ids (sorted by own time):")
        print(profile_ours(large_w.policy, large_requests_unique_tools(generate_rules(1000), cfg.calls, seed=99)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
