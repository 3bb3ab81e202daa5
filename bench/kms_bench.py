"""Checkpoint signing through a KMS beside the engine's local key: durable decisions/s, same run.

    .venv/bin/python bench/kms_bench.py            # full run (part of `make bench`)
    .venv/bin/python bench/kms_bench.py --quick    # a smoke run: short windows

One `moto_server` (AWS KMS, an ECC_NIST_P256 SIGN_VERIFY key) is started on a free loopback port and
stopped at the end, and four real `faramesh serve` engines with the SQLite WAL at `wal_sync = "full"` and
the bench stack (bench/engine_bench.py's seed support-bot agent), each in directories of its own:

1. local   checkpoints signed by the engine's own Ed25519 key, inline, in the commit that reaches them;
2. kms     a `kms` provider (`backend = "aws-kms"`, `endpoint_url` = the moto_server): the provider
           child signs each due chain head (every 1,000 records or 1 s) off the decision path;
3. local + `signing_required = true`: a permit waits for the checkpoint that covers it (the local key
           signs one in every commit);
4. kms + `signing_required = true`: a permit waits for a KMS round trip (heads coalesce: one signature
           covers every permit committed before it).

The four run side by side and take turns, so what else the machine does falls on all of them alike:
in each round every engine in turn gets one client on one connection, sequential (p50/p99, and the
same for PERMIT replies alone: only permits wait for a checkpoint); then, in each round, 16 client
processes with a connection each (decisions/s over a window after a warm-up). The order reverses every
other round (ABBA). The engines not being measured are idle, and the fork + warm-up before each window
outlasts the 1 s after which an engine that went idle runs its WAL housekeeping. The floor under a
KMS checkpoint is measured first: boto3 `kms.sign` round trips from this process to the same
moto_server. Once the engines stop, each WAL is read (records, checkpoints by key, `permit_withdrawn`
records) and `faramesh audit verify --require-signed` checks every signature offline against the key
that engine pinned.

Without moto_server (pip `moto[server]`) or boto3 the KMS rows are skipped, not failed: the local rows
still run. Everything lives in a temp directory on the WAL's default filesystem (FARAMESH_BENCH_DIR
overrides) and is removed afterwards.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import importlib.util
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from engine_bench import AGENT_FPL, Engine, bench_root, faramesh_exe, table, verdict  # noqa: E402
from faramesh.engine.wal.log import rfc3339  # noqa: E402
from fsync import filesystem_of  # noqa: E402
from wire_client import EFFECTS, connect, line_maker, percentile_us  # noqa: E402

CLIENTS = 16
SYNC = "full"
REGION = "us-west-2"
MOTO_WAIT_S = 60.0  # an upper bound that keeps a broken moto_server from hanging the bench
SKIP_LINE = "moto not installed: KMS rows skipped"

# Goals of this section, relative to figures taken in the same run (they hold on a slow disk as on a fast
# one; report() states them): without signing_required no decision waits for the KMS; with it a permit
# waits a few KMS round trips at most, and one signature covers many permits under load.
KMS_RATE_FLOOR = 0.90  # KMS engine decisions/s (16 clients) ≥ this × the local engine's
KMS_P50_SLACK_US = 200.0  # KMS engine sequential p50 ≤ local's + this (a KMS round trip is ~20× more)
REQUIRED_KMS_TRIPS = 3.0  # signing_required: permit p50 ≤ local's + this × the KMS floor p50
MIN_COALESCED = 2.0  # signing_required, 16 clients: permits per KMS signature ≥ this


@dataclass(frozen=True)
class Config:
    rounds: int  # every engine is measured once per round, in turn
    seq_calls: int  # timed sequential calls per engine, over all rounds
    seq_warmup: int  # untimed calls before each round's sequential run
    start_s: float  # before each window: time for the client processes to fork and connect
    warmup_s: float
    window_s: float  # per round
    floor_calls: int  # boto3 kms.sign round trips for the floor row


FULL = Config(rounds=3, seq_calls=3000, seq_warmup=100, start_s=0.5, warmup_s=1.0, window_s=2.0, floor_calls=300)
QUICK = Config(rounds=2, seq_calls=400, seq_warmup=50, start_s=0.4, warmup_s=0.6, window_s=1.0, floor_calls=50)


@dataclass(frozen=True)
class Variant:
    key: str
    signer: str  # "local" | "kms"
    required: bool


VARIANTS = (
    Variant("local", "local", False),
    Variant("kms", "kms", False),
    Variant("local-required", "local", True),
    Variant("kms-required", "kms", True),
)


@dataclass
class Sample:
    """Round trips of one engine, all rounds, split by what the reply was (only permits wait for a
    checkpoint)."""

    permit_ns: list[int] = field(default_factory=list)  # sorted once absorbed
    other_ns: list[int] = field(default_factory=list)  # DEFER, DENY, anything else; likewise
    effects: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    withdrawn: int = 0  # DENY SIGNING_UNAVAILABLE: a permit no checkpoint covered in time
    clients: int = 1
    window_s: float = 0.0  # summed over the rounds; 0: sequential
    walls: list[tuple[float, float]] = field(default_factory=list)  # epoch seconds of each timed part
    moto_cpu_s: float | None = None  # CPU time moto_server used during the timed parts (KMS engines)

    @property
    def all_ns(self) -> list[int]:
        return sorted(self.permit_ns + self.other_ns)

    @property
    def completed(self) -> int:
        return len(self.permit_ns) + len(self.other_ns)

    @property
    def seconds(self) -> float:
        return sum(hi - lo for lo, hi in self.walls)

    @property
    def per_s(self) -> float:
        if self.window_s:
            return self.completed / self.window_s
        total = sum(self.permit_ns) + sum(self.other_ns)
        return self.completed / (total / 1e9) if total else 0.0

    def absorb(self, other: Sample) -> None:
        """Add `other`'s round trips (the lists stay sorted: percentile_us needs them so)."""
        self.permit_ns = sorted(self.permit_ns + other.permit_ns)
        self.other_ns = sorted(self.other_ns + other.other_ns)
        self.effects += other.effects
        self.errors += other.errors
        self.withdrawn += other.withdrawn
        self.window_s += other.window_s
        self.walls += other.walls
        if other.moto_cpu_s is not None:
            self.moto_cpu_s = (self.moto_cpu_s or 0.0) + other.moto_cpu_s


@dataclass
class WalFacts:
    records: int
    last_seq: int
    permits: int  # tool-call PERMIT records
    withdrawn: int  # permit_withdrawn records
    checkpoints: Counter[str]  # key fingerprint → checkpoints it signed
    signed_through: int
    checkpoint_times: list[str]  # each checkpoint's head time (RFC 3339, UTC, µs), sorted

    def signed_during(self, walls: list[tuple[float, float]]) -> int:
        """Checkpoints over heads that came due inside `walls` (epoch seconds; the engine's clock is ours)."""
        n = 0
        for wall in walls:
            lo, hi = (rfc3339(t) for t in wall)
            n += bisect.bisect_right(self.checkpoint_times, hi) - bisect.bisect_left(self.checkpoint_times, lo)
        return n


@dataclass
class Measured:
    """One engine through the whole run."""

    variant: Variant
    engine: Engine
    filesystem: str = "?"
    seq: Sample = field(default_factory=Sample)
    conc: Sample = field(default_factory=lambda: Sample(clients=CLIENTS))
    signer: str = "?"  # the key id `status` names
    remote: bool = False
    wal: WalFacts | None = None
    verify: str = "not run"
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)
    failed: bool = False  # stopped taking turns after an error


@dataclass(frozen=True)
class Floor:
    calls: int
    p50_us: float
    p99_us: float


def progress(message: str) -> None:
    sys.stderr.write(f"kms bench: {message}\n")
    sys.stderr.flush()


# ---- the client: bench/wire_client.py's loops, with every round trip filed under its reply's effect -----


def _effect(reply: bytes) -> int:
    """0 PERMIT, 1 DEFER, 2 DENY, -1 not a decision."""
    for k, marker in enumerate(EFFECTS):
        if marker in reply:
            return k
    return -1


def _file(sample: Sample, reply: bytes, latency_ns: int) -> None:
    k = _effect(reply)
    (sample.permit_ns if k == 0 else sample.other_ns).append(latency_ns)
    if k < 0 or b'"error"' in reply:
        sample.errors += 1
    else:
        sample.effects[("PERMIT", "DEFER", "DENY")[k]] += 1
    if b"SIGNING_UNAVAILABLE" in reply:
        sample.withdrawn += 1


Probe = Callable[[], float]  # CPU seconds used so far by a process the bench watches


def sequential(path: str, calls: int, warmup: int, worker: int, probe: Probe | None = None) -> Sample:
    """One connection, `warmup` untimed then `calls` timed request/reply round trips (`worker` seeds the
    traffic: every round sends args of its own)."""
    make = line_maker(worker)
    sock, rfile = connect(path)
    readline = rfile.readline  # type: ignore[attr-defined]
    clock = time.perf_counter_ns
    out = Sample()
    try:
        for _ in range(warmup):
            sock.sendall(make())
            readline()
        cpu0 = probe() if probe else 0.0
        began = time.time()
        for _ in range(calls):
            line = make()
            t0 = clock()
            sock.sendall(line)
            reply = readline()
            _file(out, reply, clock() - t0)
        out.walls.append((began, time.time()))
        if probe:
            out.moto_cpu_s = probe() - cpu0
    finally:
        sock.close()
    return out


def _worker(path: str, worker: int, t_start: int, t_measure: int, t_end: int, conn: Connection) -> None:
    try:
        make = line_maker(worker)
        sock, rfile = connect(path)
        readline = rfile.readline  # type: ignore[attr-defined]
        clock = time.monotonic_ns
        out = Sample()
        delay = (t_start - clock()) / 1e9
        if delay > 0:
            time.sleep(delay)
        while True:
            line = make()
            t0 = clock()
            sock.sendall(line)
            reply = readline()
            t1 = clock()
            if t1 > t_end:
                break
            if t0 >= t_measure:
                _file(out, reply, t1 - t0)
        sock.close()
        conn.send((out, None))
    except Exception as exc:  # reported to the parent, never silently lost
        conn.send((Sample(), f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def concurrent(path: str, cfg: Config, first_worker: int, probe: Probe | None = None) -> Sample:
    """CLIENTS processes (fork), each on its own connection, flat out; replies counted inside the window
    (`probe` is read when the window opens and when it closes)."""
    ctx = mp.get_context("fork")
    clients, window_s = CLIENTS, cfg.window_s
    now_ns, now_wall = time.monotonic_ns(), time.time()
    t_start = now_ns + int(cfg.start_s * 1e9)
    t_measure = t_start + int(cfg.warmup_s * 1e9)
    t_end = t_measure + int(window_s * 1e9)
    procs, pipes = [], []
    for w in range(clients):
        parent, child = ctx.Pipe(duplex=False)
        args = (path, first_worker + w, t_start, t_measure, t_end, child)
        p = ctx.Process(target=_worker, args=args, daemon=True)
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    wall_start = now_wall + (t_measure - now_ns) / 1e9
    total = Sample(clients=clients, window_s=window_s, walls=[(wall_start, wall_start + window_s)])
    if probe is not None:  # this process only waits for the clients: it can watch the window meanwhile
        time.sleep(max(0.0, (t_measure - time.monotonic_ns()) / 1e9))
        cpu0 = probe()
        time.sleep(max(0.0, (t_end - time.monotonic_ns()) / 1e9))
        total.moto_cpu_s = probe() - cpu0
    problems = []
    for parent in pipes:
        part, problem = parent.recv()
        part.window_s, part.walls = 0.0, []
        total.absorb(part)
        if problem:
            problems.append(problem)
    for p in procs:
        p.join(10)
    if problems:
        raise RuntimeError(f"{len(problems)} client process(es) failed: {problems[0]}")
    return total


# ---- moto_server ------------------------------------------------------------------------------------------


def moto_binary() -> Path | None:
    """moto_server next to this interpreter (the virtualenv), else on PATH; None when missing."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return beside
    found = shutil.which("moto_server")
    return Path(found) if found else None


def kms_missing() -> str | None:
    """Why the KMS rows cannot run here, or None."""
    if moto_binary() is None:
        return "no moto_server binary"
    if importlib.util.find_spec("boto3") is None:
        return "no boto3 (the kms provider child and this bench need it)"
    return None


@dataclass(frozen=True)
class Moto:
    endpoint: str
    secret_key: str  # random per run: never printed
    pid: int

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "kms",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key=self.secret_key,
        )

    def env(self) -> dict[str, str]:
        """What the engine's environment holds for its kms child (it is handed these, never metadata)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REGION": REGION,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(binary: Path, workdir: Path) -> Iterator[Moto]:
    """moto_server on a free loopback port, stopped (SIGTERM, then SIGKILL) when the block ends."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(workdir / "moto.log", "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.defpath, "HOME": str(workdir), "LANG": "C.UTF-8"},
        )
    try:
        deadline = time.monotonic() + MOTO_WAIT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited {proc.returncode}: {_tail(workdir / 'moto.log')}")
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers: that is all this waits for
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer at {endpoint} within {MOTO_WAIT_S:g} s") from None
                time.sleep(0.05)
        yield Moto(endpoint, "aws-secret-" + secrets.token_hex(16), proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own threads; moto_server serves each request on a thread)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def kms_floor(kms: Any, arn: str, calls: int) -> Floor:
    """Sequential boto3 kms.sign round trips (what the provider child does per checkpoint, minus the IPC)."""
    message = secrets.token_bytes(64)
    sign = kms.sign
    for _ in range(max(5, calls // 10)):
        sign(KeyId=arn, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        sign(KeyId=arn, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
        lat.append(time.perf_counter_ns() - t0)
    lat.sort()
    return Floor(calls, percentile_us(lat, 50), percentile_us(lat, 99))


# ---- one engine -------------------------------------------------------------------------------------------


def stack_fpl(variant: Variant, moto: Moto | None, arn: str | None) -> str:
    runtime = f'  backend = "sqlite"\n  wal_sync = "{SYNC}"\n'
    if variant.required:
        runtime += "  signing_required = true\n"
    kms = ""
    if variant.signer == "kms":
        assert moto is not None and arn is not None
        kms = (
            f'provider "audit-kms" {{\n  type = "kms"\n  backend = "aws-kms"\n  key_arn = "{arn}"\n'
            f'  endpoint_url = "{moto.endpoint}"\n}}\n\n'
        )
    return f"runtime {{\n{runtime}}}\n\n{kms}{AGENT_FPL}"


def read_wal(path: Path) -> WalFacts:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        records, last = conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM records").fetchone()
        permits = conn.execute(
            "SELECT count(*) FROM records WHERE action_type = 'tool_call' AND effect = 'PERMIT'"
        ).fetchone()[0]
        withdrawn = conn.execute("SELECT count(*) FROM records WHERE action_type = 'permit_withdrawn'").fetchone()[0]
        by_key = Counter(
            {k: n for k, n in conn.execute("SELECT key_fingerprint, count(*) FROM checkpoints GROUP BY 1")}
        )
        signed = conn.execute("SELECT coalesce(max(seq), 0) FROM checkpoints").fetchone()[0]
        times = sorted(str(t) for (t,) in conn.execute("SELECT time FROM checkpoints"))
    finally:
        conn.close()
    return WalFacts(int(records), int(last), int(permits), int(withdrawn), by_key, int(signed), times)


def audit_verify(engine: Engine) -> tuple[bool, str]:
    """`faramesh audit verify --require-signed` over the stopped engine's WAL, against its pinned keys."""
    done = subprocess.run(
        [faramesh_exe(), "audit", "verify", "--dir", str(engine.stack), "--wal", str(engine.wal_file),
         "--require-signed", "--format", "json"],
        env=engine.env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return False, f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
    if done.returncode != 0 or not report.get("ok"):
        return False, f"exit {done.returncode}: {report.get('problem') or report}"
    pinned = "pinned" if report.get("keys_pinned") else "NOT pinned"
    return True, f"intact, {report.get('checkpoints')} checkpoints verified ({pinned} key)"


def start(m: Measured) -> None:
    try:
        m.engine.start(timeout=60)
        m.filesystem = filesystem_of(m.engine.wal_dir)
    except Exception as exc:
        m.failed = True
        m.problems.append(f"{_label(m.variant)}: did not start: {type(exc).__name__}: {exc}")


def take_turn(m: Measured, cfg: Config, rnd: int, phase: str, moto: Moto | None) -> None:
    """One round of one phase on one engine; an error takes the engine out of the rotation."""
    if m.failed:
        return
    pid = moto.pid if moto is not None and m.variant.signer == "kms" else None
    probe = (lambda: cpu_seconds(pid)) if pid is not None else None
    os.sync()  # the previous turn's dirty pages must not be flushed on this one's fdatasyncs
    try:
        if phase == "sequential":
            calls = cfg.seq_calls // cfg.rounds
            m.seq.absorb(sequential(m.engine.agent_socket, calls, cfg.seq_warmup, 1000 + rnd, probe))
        else:
            m.conc.absorb(concurrent(m.engine.agent_socket, cfg, 100 * (rnd + 1) + 1, probe))
    except Exception as exc:
        m.failed = True
        m.problems.append(f"{_label(m.variant)}, {phase} round {rnd + 1}: {type(exc).__name__}: {exc}")


def finish(m: Measured) -> None:
    """Read `status`, stop the engine, read its WAL and verify it; what is wrong goes to m.problems."""
    name = _label(m.variant)
    status: dict[str, object] = {}
    if m.engine.proc is not None and m.engine.proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            status = m.engine.status()
    m.exit_code = m.engine.stop()
    if m.engine.proc is None:
        return  # never started: start() said why
    daemon = status.get("daemon")
    wal = daemon.get("wal") if isinstance(daemon, dict) else None
    cps = wal.get("checkpoints") if isinstance(wal, dict) else None
    cps = cps if isinstance(cps, dict) else {}
    m.signer, m.remote = str(cps.get("signer")), bool(cps.get("remote"))
    want = "aws-kms:" if m.variant.signer == "kms" else "local:"
    if not m.signer.startswith(want):
        m.problems.append(f"{name}: checkpoints signed by {m.signer}, not a {want} key")
    if bool(cps.get("signing_required")) != m.variant.required:
        m.problems.append(f"{name}: engine reports signing_required {cps.get('signing_required')}")
    if cps.get("last_error"):
        m.problems.append(f"{name}: signing error during the run: {cps.get('last_error')}")
    if m.exit_code != 0:
        m.problems.append(f"{name}: engine exit {m.exit_code} after SIGTERM:\n{_tail(m.engine.log)}")
    try:
        m.wal = read_wal(m.engine.wal_file)
    except sqlite3.Error as exc:
        m.problems.append(f"{name}: WAL not readable: {exc}")
        return
    algorithm = "ecdsa-p256:" if m.variant.signer == "kms" else "ed25519:"
    if len(m.wal.checkpoints) != 1 or not all(k.startswith(algorithm) for k in m.wal.checkpoints):
        m.problems.append(f"{name}: checkpoints by {sorted(m.wal.checkpoints)}, want one {algorithm} key")
    if m.wal.withdrawn:
        m.problems.append(f"{name}: {m.wal.withdrawn} permits withdrawn (SIGNING_UNAVAILABLE)")
    if m.wal.signed_through != m.wal.last_seq:
        m.problems.append(f"{name}: WAL signed through {m.wal.signed_through} of {m.wal.last_seq}")
    verify_ok, m.verify = audit_verify(m.engine)
    if not verify_ok:
        m.problems.append(f"{name}: audit verify: {m.verify}")
    if m.seq.errors or m.conc.errors:
        m.problems.append(f"{name}: {m.seq.errors + m.conc.errors} replies were not decisions")
    if m.seq.withdrawn or m.conc.withdrawn:
        m.problems.append(f"{name}: {m.seq.withdrawn + m.conc.withdrawn} replies were SIGNING_UNAVAILABLE")


# ---- output -----------------------------------------------------------------------------------------------


def _us(v: float) -> str:
    if v != v:  # NaN: no sample of that kind
        return "—"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _label(v: Variant) -> str:
    return f"{'moto KMS' if v.signer == 'kms' else 'local key'}{' + signing_required' if v.required else ''}"


def _phase(m: Measured, s: Sample) -> tuple[int, float]:
    """(checkpoints over heads that came due in this phase's timed parts, their length in seconds)."""
    n = m.wal.signed_during(s.walls) if m.wal else 0
    return n, max(1e-9, s.seconds)


def report(runs: dict[str, Measured], floor: Floor | None, skipped: str | None, cfg: Config) -> tuple[list[str], bool]:
    head = ["signer", "signing_required", "clients", "replies", "p50 µs", "p99 µs", "permit p50", "permit p99",
            "per s", "checkpoints/s", "permits/checkpoint", "moto CPU"]  # fmt: skip
    rows = [head]
    if floor is not None:
        rows.append(["boto3 kms.sign → moto (floor)", "—", "1 (sequential)", f"{floor.calls:,}", _us(floor.p50_us),
                     _us(floor.p99_us), "", "", f"{1e6 / floor.p50_us:,.0f}", "", "", ""])  # fmt: skip
    for m in runs.values():
        for s in (m.seq, m.conc):
            n, seconds = _phase(m, s)
            permits = s.effects["PERMIT"]
            cpu = f"{s.moto_cpu_s / seconds:.0%} of a core" if s.moto_cpu_s is not None else ""
            rows.append(
                ["moto KMS" if m.variant.signer == "kms" else "local key", "true" if m.variant.required else "false",
                 "1 (sequential)" if s is m.seq else f"{s.clients} processes", f"{s.completed:,}",
                 _us(percentile_us(s.all_ns, 50)), _us(percentile_us(s.all_ns, 99)),
                 _us(percentile_us(s.permit_ns, 50)), _us(percentile_us(s.permit_ns, 99)), f"{s.per_s:,.0f}",
                 f"{n / seconds:,.0f}", f"{permits / n:,.1f}" if n else "—", cpu]
            )  # fmt: skip
    out = [table(rows, [False, False, False, True, True, True, True, True, True, True, True, False]), ""]
    ok = True
    out += [
        f"goals (same run, wal_sync = {SYNC}): without signing_required no decision waits for the KMS: the KMS engine",
        f"  keeps ≥ {KMS_RATE_FLOOR:.0%} of the local engine's decisions/s (16 clients), sequential p50 ≤ local's"
        f" + {KMS_P50_SLACK_US:g} µs;",
        f"  with signing_required a permit waits ≤ {REQUIRED_KMS_TRIPS:g} KMS round trips (sequential permit p50"
        f" ≤ local's + {REQUIRED_KMS_TRIPS:g} × the floor p50)",
        f"  and one signature covers ≥ {MIN_COALESCED:g} permits under 16 clients; every run: no reply errors,"
        " no permit withdrawn,",
        "  every checkpoint by the expected key, `audit verify --require-signed` intact",
    ]
    if skipped:
        out.append(f"  {SKIP_LINE} ({skipped})")
    base, kms = runs.get("local"), runs.get("kms")
    if base is not None and kms is not None:
        rate = kms.conc.per_s / base.conc.per_s if base.conc.per_s else 0.0
        bp50, kp50 = percentile_us(base.seq.all_ns, 50), percentile_us(kms.seq.all_ns, 50)
        rate_ok, p50_ok = rate >= KMS_RATE_FLOOR, kp50 <= bp50 + KMS_P50_SLACK_US
        ok = ok and rate_ok and p50_ok
        out.append(
            f"  KMS off the decision path: {kms.conc.per_s:,.0f}/s vs local {base.conc.per_s:,.0f}/s = {rate:.0%}"
            f" ≥ {KMS_RATE_FLOOR:.0%}: {verdict(rate_ok)}; sequential p50 {_us(kp50)} µs ≤ {_us(bp50)}"
            f" + {KMS_P50_SLACK_US:g} µs: {verdict(p50_ok)}"
        )
    base, kms = runs.get("local-required"), runs.get("kms-required")
    if base is not None and kms is not None and floor is not None:
        bp50, kp50 = percentile_us(base.seq.permit_ns, 50), percentile_us(kms.seq.permit_ns, 50)
        bound = bp50 + REQUIRED_KMS_TRIPS * floor.p50_us
        n, _ = _phase(kms, kms.conc)
        covered = kms.conc.effects["PERMIT"] / n if n else 0.0
        p50_ok, coalesce_ok = kp50 <= bound, covered >= MIN_COALESCED
        ok = ok and p50_ok and coalesce_ok
        out.append(
            f"  signing_required through the KMS: permit p50 {_us(kp50)} µs ≤ {_us(bp50)} + {REQUIRED_KMS_TRIPS:g}"
            f" × {_us(floor.p50_us)} µs: {verdict(p50_ok)}; {covered:,.1f} permits per KMS signature (16 clients)"
            f" ≥ {MIN_COALESCED:g}: {verdict(coalesce_ok)}"
        )
        core = kms.conc.moto_cpu_s / kms.conc.window_s if kms.conc.moto_cpu_s is not None else float("nan")
        out.append(
            f"  (no goal) decisions/s with signing_required: moto KMS {kms.conc.per_s:,.0f}/s vs local key"
            f" {base.conc.per_s:,.0f}/s = {kms.conc.per_s / base.conc.per_s:.0%}: each client blocks"
        )
        out.append(
            "  on its permit's signature (permit p50 under 16 clients"
            f" {_us(percentile_us(kms.conc.permit_ns, 50))} µs vs {_us(percentile_us(base.conc.permit_ns, 50))} µs),"
            f" and moto_server signed on the same cores ({core:.0%} of a core)"
        )
    out.append("")
    out.append("checks:")
    for m in runs.values():
        mix = ", ".join(f"{k} {v:,}" for k, v in sorted((m.seq.effects + m.conc.effects).items()))
        keys = ", ".join(f"{k} {n:,}" for k, n in sorted(m.wal.checkpoints.items())) if m.wal else "—"
        wal = (
            f"WAL {m.wal.records:,} records, {m.wal.permits:,} permits, signed through {m.wal.signed_through:,}"
            f" of {m.wal.last_seq:,}, {m.wal.withdrawn} withdrawn"
            if m.wal
            else "WAL not read"
        )
        out.append(f"  {_label(m.variant)} on {m.filesystem}: signer {m.signer} ({'remote' if m.remote else 'inline'})")
        out.append(
            f"    reply errors {m.seq.errors + m.conc.errors}, SIGNING_UNAVAILABLE {m.seq.withdrawn + m.conc.withdrawn}"
            f" ({mix}); {wal}"
        )
        out.append(f"    checkpoints by key: {keys}; audit verify: {m.verify}; engine exit {m.exit_code}")
        ok = ok and not m.problems
    out.append("")
    out += [
        "notes:",
        "  - Engines: `faramesh serve` subprocesses, the bench stack of the engine section (seed support-bot,",
        f"    rate limit out of reach, no budget), SQLite WAL with wal_sync = {SYNC}: a reply only after its",
        "    transaction's fdatasync. Checkpoints: every 1,000 records or 1 s, and at shutdown. The local key",
        "    signs inline (Ed25519, in the commit; with signing_required, in every commit). The KMS engine's",
        "    provider child signs on the engine's signing thread, over a socketpair, through boto3 to moto_server",
        "    on loopback (ECDSA P-256), and the signature commits with the next transaction; with",
        "    signing_required a head is queued whenever a permit waits, and one signature covers every permit",
        "    committed before it.",
        f"  - The engines run side by side and take turns ({cfg.rounds} rounds, ABBA order), so background load",
        "    falls on all of them alike; the others are idle meanwhile. '1 (sequential)': one connection, one",
        f"    request at a time, {cfg.seq_calls // cfg.rounds:,} timed calls per round; per s = 1 / mean round trip.",
        f"    'processes': {CLIENTS} client processes (fork), one blocking connection each; per s = replies completed",
        f"    in {cfg.rounds} windows of {cfg.window_s:g} s, each after {cfg.warmup_s:g} s of warm-up. Clients, engines"
        " and moto share the cores.",
        "  - p50/p99: client-side round trip (send → reply line) of every reply; 'permit' columns: PERMIT",
        "    replies alone (about a quarter of the seed mix; DEFER and DENY never wait for a checkpoint).",
        "  - checkpoints/s: checkpoints in the WAL (read after the engine stopped) whose head came due in that",
        "    phase; permits/checkpoint: PERMIT replies per checkpoint there, i.e. permits one signature covered.",
        "    moto CPU: moto_server's utime+stime over the phase (it signs in Python, on this machine).",
        "  - The floor: boto3 kms.sign from this process to the same moto_server, sequential. A real KMS is a",
        "    network round trip away (typically 5–30 ms) and costs this machine no CPU for the signature: that",
        "    moves the signing_required permit latency, not the rows without signing_required.",
    ]
    return out, ok


def run_all(quick: bool = False) -> tuple[str, bool]:
    cfg = QUICK if quick else FULL
    started = time.perf_counter()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    root = bench_root()
    runs: dict[str, Measured] = {}
    errors: list[str] = []
    floor: Floor | None = None
    skipped = kms_missing()
    try:
        with contextlib.ExitStack() as stack:
            moto: Moto | None = None
            arn: str | None = None
            if skipped is None:
                binary = moto_binary()
                assert binary is not None
                progress("moto_server on loopback")
                try:
                    moto = stack.enter_context(moto_server(binary, root))
                    kms = moto.client()
                    meta = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
                    arn = str(meta["Arn"])
                    progress("KMS floor: boto3 kms.sign round trips")
                    floor = kms_floor(kms, arn, cfg.floor_calls)
                except Exception as exc:
                    errors.append(f"moto_server: {type(exc).__name__}: {exc}")
                    moto = None
            else:
                progress(SKIP_LINE)
            for variant in VARIANTS:
                if variant.signer == "local" or moto is not None:
                    engine = Engine(root, SYNC, name=variant.key, fpl=stack_fpl(variant, moto, arn),
                                    env=moto.env() if moto else None)  # fmt: skip
                    runs[variant.key] = Measured(variant, engine)
            # Threads: starting is mostly waiting (compile subprocess, READY, the KMS pin), as is finishing.
            pool = stack.enter_context(ThreadPoolExecutor(len(VARIANTS)))
            progress(f"starting {len(runs)} engines: " + ", ".join(_label(m.variant) for m in runs.values()))
            list(pool.map(start, runs.values()))
            try:
                for phase in ("sequential", f"{CLIENTS} clients"):
                    for rnd in range(cfg.rounds):
                        order = list(runs.values()) if rnd % 2 == 0 else list(reversed(runs.values()))
                        progress(f"{phase}, round {rnd + 1} of {cfg.rounds}")
                        for m in order:
                            take_turn(m, cfg, rnd, "sequential" if phase == "sequential" else "concurrent", moto)
            finally:
                progress("stopping the engines, audit verify")
                list(pool.map(finish, runs.values()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for m in runs.values():
        errors += m.problems
    title = "Checkpoint signing: moto KMS vs the local key, durable decisions through `faramesh serve`"
    if quick:
        title += " (--quick: short windows; numbers are rough)"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    out = [title, f"{os.cpu_count()} CPUs · load average (1, 5, 15 min) before {load_before}, after {load}"]
    if skipped:
        out.append(SKIP_LINE)
    out.append("")
    lines, ok = report(runs, floor, skipped, cfg)
    out += lines
    out += [f"  ERROR: {e}" for e in errors]
    out.append(f"\nkms bench wall time {time.perf_counter() - started:.1f} s")
    expected = {v.key for v in VARIANTS if skipped is None or v.signer == "local"}
    ok = ok and not errors and set(runs) == expected
    return "\n".join(out), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows: a smoke run")
    opts = ap.parse_args(argv)
    text, ok = run_all(opts.quick)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
