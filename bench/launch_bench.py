"""Sandbox launch latency: `/bin/true` under profile `full` through Faramesh's two paths, beside peers.

    .venv/bin/python bench/launch_bench.py            # 200 launches per path (part of `make bench`)
    .venv/bin/python bench/launch_bench.py --quick    # 30 per path
    .venv/bin/python bench/run.py --launch-only [--quick]

Needs root (the root path of DESIGN.md §5: a dedicated host uid, cgroup, uid switch), bubblewrap and
firejail (`make bench` installs them). Every path launches `/bin/true` and is timed from the request to
the exit status, with time.perf_counter_ns; the paths are interleaved round-robin (the starting path
rotates every round), so drift hits all of them alike:

- plain exec: subprocess.run([/bin/true], close_fds=True)
- python -I -S -c pass: the interpreter alone, the floor under any Python launcher
- python + sandbox imports: the lean launcher's interpreter with its imports, no launch
- bwrap: --unshare-all --die-with-parent --new-session --cap-drop ALL, /usr /etc read-only, --proc --dev
- firejail: --quiet --noprofile --private --net=none
- launcher: `.faramesh/bin/agent -- /bin/true`, i.e. `/bin/sh` shim → `/usr/bin/python3 -I -S -c BOOT
  PKG --spec SPEC.json -- /bin/true` (what users run); also the python line without the shim
- zygote (supervisor path): a pre-forked `/usr/bin/python3 -I -S` process holding the imports and the
  parsed spec forks C1 per request (pipe), C1 runs launch(spec, argv)
- fat fork: the same, forked from a process that imported the CLI, the engine, lark and cryptography
  and runs two threads (why the supervisor never forks launches itself)

Then each Faramesh path runs bench/launch_probe.py instead of /bin/true; a missing mechanism of `full`
prints INVALID and the exit status is 1. Goals: zygote ≤ 1.2× bwrap, launcher ≤ 3.5× bwrap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from timing import percentile

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"
VENV_PY = str(REPO / ".venv" / "bin" / "python")
# Must stay equal to supervisor/layout.py BOOT (checked below when that module imports).
BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from faramesh.launchers.agent_exec import run; run()"
)
AGENT_UID = 65210
AGENT_ID = "bench-launch"
GOAL_ZYGOTE = 1.2
GOAL_LAUNCHER = 3.5
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Setup:
    base: str
    pkg_root: str
    stack: str
    workspace: str
    spec_path: str
    shim: str
    outside: str


def make_setup() -> Setup:
    from faramesh.sandbox.launch import build_spec, spec_to_json

    base = tempfile.mkdtemp(prefix="faramesh-launchbench-", dir="/tmp")
    os.chmod(base, 0o755)
    pkg_root = os.path.join(base, "pkg")
    pkg = os.path.join(pkg_root, "faramesh")
    os.makedirs(pkg, 0o755)
    os.chmod(pkg_root, 0o755)
    os.symlink(REPO / "faramesh_pkg" / "__init__.py", os.path.join(pkg, "__init__.py"))
    for sub in ("sandbox", "launchers"):
        os.symlink(REPO / sub, os.path.join(pkg, sub))
    stack = os.path.join(base, "stack")
    os.mkdir(stack, 0o755)
    outside = os.path.join(stack, "outside.txt")
    with open(outside, "w") as f:
        f.write("the probe must not be able to write here\n")
    ws = os.path.join(stack, "workspace")
    os.mkdir(ws, 0o755)
    os.chown(ws, AGENT_UID, AGENT_UID)
    spec = build_spec("full", AGENT_ID, AGENT_UID, AGENT_UID, ws, stack)
    spec_path = os.path.join(base, "spec.json")
    with open(spec_path, "w") as f:
        f.write(spec_to_json(spec))
    os.chmod(spec_path, 0o644)
    # The shim `faramesh apply` writes as .faramesh/bin/agent (launchers/apply.py shim_text), for one agent.
    shim = os.path.join(base, "agent")
    with open(shim, "w") as f:
        f.write("#!/bin/sh\n"
                f"exec {PYTHON} -I -S -c {shlex.quote(BOOT)} {pkg_root} --spec {spec_path} \"$@\"\n")
    os.chmod(shim, 0o755)
    return Setup(base, pkg_root, stack, ws, spec_path, shim, outside)


def teardown(s: Setup) -> None:
    shutil.rmtree(s.base, ignore_errors=True)
    with contextlib.suppress(Exception):
        from faramesh.sandbox import cgroups

        cgroups.remove_cgroup(AGENT_ID)


# --- paths ------------------------------------------------------------------------------------------------

class Path_:
    """One way of launching a command; run() returns the exit status."""

    name: str
    faramesh: bool = False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, argv: Sequence[str]) -> int:
        raise NotImplementedError

    def run_capture(self, argv: Sequence[str]) -> tuple[int, str]:
        raise NotImplementedError


class CmdPath(Path_):
    def __init__(self, name: str, prefix: Callable[[Sequence[str]], list[str]], *, faramesh: bool = False) -> None:
        self.name = name
        self.prefix = prefix
        self.faramesh = faramesh

    def run(self, argv: Sequence[str]) -> int:
        return subprocess.run(self.prefix(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, close_fds=True, env=CLEAN_ENV).returncode

    def run_capture(self, argv: Sequence[str]) -> tuple[int, str]:
        p = subprocess.run(self.prefix(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           close_fds=True, env=CLEAN_ENV, timeout=60)
        return p.returncode, p.stdout + p.stderr


class ServerPath(Path_):
    """A long-lived launch server (bench/launch_zygote.py): request on its stdin, status on a pipe."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.faramesh = True
        self.info = ""

    def start(self) -> None:
        r, w = os.pipe()
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; closed in stop())
        cmd = [self.cmd[0], *(a if a != "REPLY_FD" else str(w) for a in self.cmd[1:])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.out, stderr=self.out,
                                     env=self.env, close_fds=True, pass_fds=(w,))
        os.close(w)
        self.reply = os.fdopen(r, "r", buffering=1)
        line = self.reply.readline()
        if not line.startswith("READY"):
            self.out.seek(0)
            raise RuntimeError(f"{self.name}: server did not start: {self.out.read().decode(errors='replace')}")
        self.info = line[len("READY "):].strip()
        assert self.proc.stdin is not None
        self.stdin = self.proc.stdin

    def run(self, argv: Sequence[str]) -> int:
        self.stdin.write((json.dumps(list(argv)) + "\n").encode())
        self.stdin.flush()
        line = self.reply.readline()
        if not line:
            raise RuntimeError(f"{self.name}: server died")
        return int(line)

    def run_capture(self, argv: Sequence[str]) -> tuple[int, str]:
        self.out.seek(0)
        self.out.truncate()
        rc = self.run(argv)
        self.out.seek(0)
        return rc, self.out.read().decode(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reply.close()
        self.out.close()


def make_paths(s: Setup) -> list[Path_]:
    launcher = [PYTHON, "-I", "-S", "-c", BOOT, s.pkg_root, "--spec", s.spec_path, "--"]
    bwrap = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
             "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc",
             "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
             "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
             "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--"]
    firejail = ["firejail", "--quiet", "--noprofile", "--private", "--net=none", "--"]
    imports_only = ("import sys; sys.path.insert(0, sys.argv[1]); import faramesh.launchers.agent_exec; "
                    "import faramesh.sandbox.launch")
    return [
        CmdPath("plain exec", lambda a: list(a)),
        CmdPath("python -I -S -c pass", lambda a: [PYTHON, "-I", "-S", "-c", "pass"]),
        CmdPath("python + sandbox imports", lambda a: [PYTHON, "-I", "-S", "-c", imports_only, s.pkg_root]),
        CmdPath("bwrap", lambda a: [*bwrap, *a]),
        CmdPath("firejail", lambda a: [*firejail, *a]),
        CmdPath("launcher (agent shim)", lambda a: [s.shim, "--", *a], faramesh=True),
        CmdPath("launcher (python line)", lambda a: [*launcher, *a], faramesh=True),
        ServerPath("zygote (supervisor path)",
                   [PYTHON, "-I", "-S", str(BENCH / "launch_zygote.py"), "REPLY_FD", s.pkg_root, s.spec_path], env={}),
        ServerPath("fat fork (no zygote)",
                   [VENV_PY, str(BENCH / "launch_zygote.py"), "--fat", "REPLY_FD", s.pkg_root, s.spec_path],
                   env=CLEAN_ENV),
    ]


# --- measuring --------------------------------------------------------------------------------------------

@dataclass
class Row:
    path: Path_
    samples: list[int] = field(default_factory=list)
    probe: str = ""

    def p(self, q: float) -> float:
        return percentile(sorted(self.samples), q) / 1000  # ms


def measure(paths: list[Path_], n: int, warmup: int) -> list[Row]:
    rows = [Row(p) for p in paths]
    clock = time.perf_counter_ns
    true = ["/bin/true"]
    for r in rows:
        for _ in range(warmup):
            rc = r.path.run(true)
            if rc != 0:
                rc, out = r.path.run_capture(true)
                raise RuntimeError(f"{r.path.name}: /bin/true exited {rc}:\n{out}")
    k = len(rows)
    for i in range(n):
        for j in range(k):
            r = rows[(i + j) % k]
            t0 = clock()
            rc = r.path.run(true)
            r.samples.append(clock() - t0)
            if rc != 0:
                raise RuntimeError(f"{r.path.name}: /bin/true exited {rc}")
    return rows


PROBE_SRC = (BENCH / "launch_probe.py").read_text()
STATUS_ONLY = ["/bin/grep", "-E", "^(NoNewPrivs|Seccomp|CapEff):", "/proc/self/status"]


def probe_all(rows: list[Row], s: Setup) -> list[str]:
    """Run the probe on each Faramesh path; the peers only show their /proc/self/status (safe: no writes)."""
    invalid = []
    probe = [PYTHON, "-I", "-S", "-c", PROBE_SRC, s.workspace, s.outside]
    for r in rows:
        name = r.path.name
        if name.startswith(("plain", "python")):
            continue
        if r.path.faramesh:
            rc, out = r.path.run_capture(probe)
            seen = next((ln for ln in out.splitlines() if ln.startswith("{")), "")
            r.probe = ("ok " if rc == 0 else f"FAILED (exit {rc}) ") + seen
            if rc != 0:
                invalid.append(f"{name}: probe exit {rc}\n{out}")
        else:
            rc, out = r.path.run_capture(STATUS_ONLY)
            r.probe = "(status only) " + " ".join(" ".join(ln.split()) for ln in out.splitlines())
    with open(s.outside) as f:
        if "must not" not in f.read():
            invalid.append(f"{s.outside} was modified from inside a sandbox")
    return invalid


def step_breakdown(s: Setup, n: int) -> str:
    out = []
    p = subprocess.run([PYTHON, "-I", "-S", "-X", "importtime", "-c", BOOT, s.pkg_root, "--spec", s.spec_path,
                        "--", "/bin/true"], capture_output=True, text=True, env=CLEAN_ENV, timeout=60)
    imports = []
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = [x.strip() for x in line[len("import time:"):].split("|")]
            if parts[0].isdigit():
                imports.append((int(parts[1]), int(parts[0]), parts[2]))
    top_level = [(c, own, m) for c, own, m in imports if not m.startswith(" ")]
    total_us = sum(c for c, _, _ in top_level)
    out.append(f"launcher imports (python -X importtime, one run): {total_us / 1000:.1f} ms in "
               f"{len(imports)} modules; heaviest top-level (cumulative):")
    for c, _own, m in sorted(top_level, reverse=True)[:8]:
        out.append(f"  {c / 1000:7.2f} ms  {m}")
    p = subprocess.run([PYTHON, "-I", "-S", str(BENCH / "launch_steps.py"), s.pkg_root, s.spec_path, str(n)],
                       capture_output=True, text=True, env={}, timeout=300)
    try:
        data = json.loads(p.stdout)
    except ValueError:
        out.append(f"per-step timing failed: {p.stdout}{p.stderr}")
        return "\n".join(out)
    if "error" in data:
        out.append(f"per-step timing failed: {data['error']}")
        return "\n".join(out)
    totals = sorted(data["totals"])
    med_total = percentile(totals, 50) / 1000
    out.append(f"per-step inside launch() (zygote-style fork, {n} launches, median ms; total "
               f"fork→exit median {med_total:.2f} ms):")
    accounted = 0.0
    for label in data["order"]:
        xs = sorted(data["steps"][label])
        if not xs:
            continue
        med = percentile(xs, 50) / 1000
        accounted += med
        out.append(f"  {med:7.3f} ms  {label}")
    out.append(f"  {med_total - accounted:7.3f} ms  rest: fork C1/C2/C3, exec /bin/true, waits, JSON status pipe,"
               " report, namespace teardown")
    return "\n".join(out)


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return f"{cmd[0]}: not installed"

    py = subprocess.run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                        text=True).stdout.strip()
    return (f"{first_line(['bwrap', '--version'])} · {first_line(['firejail', '--version'])} · "
            f"system python {py} · bench python {platform.python_version()} · "
            f"{platform.system()} {platform.release()} {platform.machine()} · {os.cpu_count()} CPUs")


def check_boot() -> None:
    try:
        from faramesh.supervisor import layout
    except Exception:
        return
    if getattr(layout, "BOOT", BOOT) != BOOT:
        raise SystemExit("bench BOOT line differs from supervisor/layout.py BOOT: update bench/launch_bench.py")


def run_all(quick: bool) -> tuple[str, bool]:
    if os.geteuid() != 0:
        return "sandbox launch latency: skipped (needs root: the root path of DESIGN.md §5)", True
    missing = [t for t in ("bwrap", "firejail") if shutil.which(t) is None]
    if missing:
        return (f"sandbox launch latency: {', '.join(missing)} not installed (make bench installs them)", False)
    check_boot()
    n = 30 if quick else 200
    s = make_setup()
    paths = make_paths(s)
    started = time.perf_counter()
    try:
        for p in paths:
            p.start()
        rows = measure(paths, n, warmup=2 if quick else 5)
        invalid = probe_all(rows, s)
        breakdown = step_breakdown(s, 20 if quick else 50)
    finally:
        for p in paths:
            p.stop()
        teardown(s)
    by = {r.path.name: r for r in rows}
    bw50, bw99 = by["bwrap"].p(50), by["bwrap"].p(99)
    quick_note = " (--quick: numbers are rough)" if quick else ""
    out = [f"Sandbox launch latency: /bin/true to exit, profile full, {n} launches per path, interleaved"
           f"{quick_note}", versions(),
           f"goals: supervisor path (zygote) ≤ {GOAL_ZYGOTE}× bwrap p50; launcher (agent shim) ≤ "
           f"{GOAL_LAUNCHER}× bwrap p50", ""]
    w = max(len(r.path.name) for r in rows)
    out.append(f"{'path':<{w}}  {'p50 ms':>8}  {'p99 ms':>8}  {'p50/bwrap':>9}  {'p99/bwrap':>9}")
    for r in rows:
        out.append(f"{r.path.name:<{w}}  {r.p(50):8.2f}  {r.p(99):8.2f}  {r.p(50) / bw50:8.2f}×  "
                   f"{r.p(99) / bw99:8.2f}×")
    out.append("")
    for r in rows:
        if isinstance(r.path, ServerPath):
            out.append(f"{r.path.name}: {r.path.info}")
    out.append("")
    out.append("confinement probe (Faramesh paths: NoNewPrivs/Seccomp/caps, Landlock read, seccomp unshare,"
               " writes outside the workspace):")
    for r in rows:
        if r.probe:
            out.append(f"  {r.path.name}: {r.probe}")
    zyg = by["zygote (supervisor path)"].p(50) / bw50
    lau = by["launcher (agent shim)"].p(50) / bw50
    ok_z, ok_l = zyg <= GOAL_ZYGOTE, lau <= GOAL_LAUNCHER
    out.append("")
    out.append(f"goal supervisor path ≤ {GOAL_ZYGOTE}× bwrap: {zyg:.2f}× — {'met' if ok_z else 'NOT met'}")
    out.append(f"goal launcher ≤ {GOAL_LAUNCHER}× bwrap: {lau:.2f}× — {'met' if ok_l else 'NOT met'}")
    out.append("")
    out.append(breakdown)
    out.append(f"\nlaunch bench wall time {time.perf_counter() - started:.1f} s")
    if invalid:
        out.append("")
        out.append("INVALID: a mechanism of profile full is missing:")
        out += [f"  {x}" for x in invalid]
    return "\n".join(out), not invalid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 launches per path instead of 200")
    opts = ap.parse_args(argv)
    text, ok = run_all(opts.quick)
    print(text, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
