"""The load generator: one blocking Unix-socket connection per client, one request line out, one
reply line back, strictly sequential per connection (no pipelining). The same client drives the echo
floor and the engine, so their numbers are directly comparable.

- `sequential`: one client, N timed requests on one connection (latency p50/p99).
- `concurrent`: K client *processes* (multiprocessing, fork), each with its own connection, running
  flat out for a fixed window after a warm-up; decisions/s = replies completed inside the window /
  window length. Processes rather than threads so the client side's GIL cannot cap the figure (the
  clients still share the machine's cores with the server: that cost is part of the measurement).

Traffic is the seed support-bot mix (bench/workloads.py `_SEED_TOOLS`): refunds with amounts across
both thresholds (permit < $25, defer < $500, deny above) carrying a card the policy redacts, ticket
reads, knowledge-base searches and tools no rule names. Every request has fresh args (a unique
ticket number), so defers create new approvals rather than matching an old one.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import orjson

AGENT = "support-bot"
SEED_TOOLS: tuple[tuple[str, float], ...] = (
    ("refund", 0.60),
    ("ticket/read", 0.15),
    ("knowledgebase/search", 0.10),
    ("ticket/write", 0.10),
    ("admin/delete-user", 0.05),
)
EFFECTS = (b'"effect":"PERMIT"', b'"effect":"DEFER"', b'"effect":"DENY"')


def line_maker(worker: int, seed: int = 7) -> Callable[[], bytes]:
    """A generator of govern lines for one client: fresh call_id and args every call."""
    rng = random.Random(seed * 1000 + worker)
    tools = [t for t, _ in SEED_TOOLS]
    weights = [w for _, w in SEED_TOOLS]
    counter = 0
    head = b'{"type":"govern","v":1,"agent_id":"%s","session_id":"bench-%d","call_id":"c%d-%%d","tool_id":"%%s",' % (
        AGENT.encode(),
        worker,
        worker,
    )
    refund_args = b'"args":{"amount":%d,"ticket":"T-%d","card":{"number":"4111111111111111","cvv":"123"}}}\n'
    other_args = b'"args":{"amount":%d,"ticket":"T-%d"}}\n'

    def make() -> bytes:
        nonlocal counter
        counter += 1
        tool = rng.choices(tools, weights)[0]
        amount = rng.randrange(0, 1200)
        args = refund_args if tool == "refund" else other_args
        return (head % (counter, tool.encode())) + (args % (amount, counter))

    return make


def connect(path: str, timeout: float = 30.0) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock, sock.makefile("rb", buffering=65536)


@dataclass
class Sequential:
    latencies_ns: list[int]  # sorted
    effects: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    server_latency_us: list[int] = field(default_factory=list)  # sorted; the engine's own latency_us


def sequential(path: str, calls: int, warmup: int, *, worker: int = 0) -> Sequential:
    """One connection, `warmup` untimed then `calls` timed request/reply round trips."""
    make = line_maker(worker)
    sock, rfile = connect(path)
    clock = time.perf_counter_ns
    readline = rfile.readline  # type: ignore[attr-defined]
    out = Sequential([0] * calls)
    try:
        for _ in range(warmup):
            sock.sendall(make())
            readline()
        for i in range(calls):
            line = make()
            t0 = clock()
            sock.sendall(line)
            reply = readline()
            out.latencies_ns[i] = clock() - t0
            try:
                data = orjson.loads(reply)
            except orjson.JSONDecodeError:
                out.errors += 1
                continue
            if "error" in data or ("effect" not in data and "call_id" not in data):
                out.errors += 1
            effect = data.get("effect")
            if effect is not None:
                out.effects[effect] += 1
                if type(data.get("latency_us")) is int:
                    out.server_latency_us.append(data["latency_us"])
    finally:
        sock.close()
    out.latencies_ns.sort()
    out.server_latency_us.sort()
    return out


@dataclass
class Concurrent:
    clients: int
    window_s: float
    completed: int
    latencies_ns: list[int]  # sorted, every reply inside the window, all clients
    effects: Counter[str]
    errors: int

    @property
    def per_s(self) -> float:
        return self.completed / self.window_s


def _worker(path: str, worker: int, t_start: int, t_measure: int, t_end: int, expect: bytes, conn: Connection) -> None:
    try:
        make = line_maker(worker)
        sock, rfile = connect(path)
        readline = rfile.readline  # type: ignore[attr-defined]
        clock = time.monotonic_ns
        lat: list[int] = []
        effects = [0, 0, 0]
        errors = 0
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
            if t0 < t_measure:
                continue
            lat.append(t1 - t0)
            if expect not in reply:
                errors += 1
            for k, marker in enumerate(EFFECTS):
                if marker in reply:
                    effects[k] += 1
                    break
        sock.close()
        conn.send((len(lat), lat, effects, errors, None))
    except Exception as exc:  # reported to the parent, never silently lost
        conn.send((0, [], [0, 0, 0], 0, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def concurrent(path: str, clients: int, warmup_s: float, window_s: float, *, expect: bytes) -> Concurrent:
    """`clients` processes, each on its own connection, flat out; replies counted inside the window."""
    ctx = mp.get_context("fork")
    now = time.monotonic_ns()
    t_start = now + 1_000_000_000  # time for every process to fork and connect
    t_measure = t_start + int(warmup_s * 1e9)
    t_end = t_measure + int(window_s * 1e9)
    procs = []
    pipes = []
    for w in range(clients):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(path, w + 1, t_start, t_measure, t_end, expect, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    completed = 0
    errors = 0
    lat: list[int] = []
    eff = [0, 0, 0]
    problems = []
    for parent in pipes:
        n, worker_lat, worker_eff, worker_err, problem = parent.recv()
        completed += n
        lat.extend(worker_lat)
        errors += worker_err
        eff = [a + b for a, b in zip(eff, worker_eff, strict=True)]
        if problem:
            problems.append(problem)
    for p in procs:
        p.join(10)
    if problems:
        raise RuntimeError(f"{len(problems)} client process(es) failed: {problems[0]}")
    lat.sort()
    effects = Counter({name: n for name, n in zip(("PERMIT", "DEFER", "DENY"), eff, strict=True) if n})
    return Concurrent(clients, window_s, completed, lat, effects, errors)


def percentile_us(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    rank = max(1, min(len(sorted_ns), round(q / 100 * len(sorted_ns) + 0.5)))
    return sorted_ns[rank - 1] / 1000
