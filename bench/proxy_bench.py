"""Egress proxy overhead: the engine's proxy child (engine/proxy.py, driven by engine/proxy_host.py) beside a
direct loopback connection to the same origin, measured in one run.

    .venv/bin/python bench/proxy_bench.py            # full run (part of `make bench`), about 10 s
    .venv/bin/python bench/proxy_bench.py --quick    # a smoke run, a few seconds
    .venv/bin/python bench/run.py --proxy-only [--quick]

Processes, all on 127.0.0.1 (nothing else is dialled):
- origin (`proxy_bench.py --origin`): blocking sockets, a thread per connection, four listeners: echo,
  bulk (sends N MiB on request), HTTP/1.1 (200 with a 1 KiB body, keep-alive) and one that no rule allows;
- host (`proxy_bench.py --host PORT…`): a ProxyHost, as the engine runs it, which spawns the real proxy child
  (`python -I -m faramesh.engine.proxy`), installs agent "bench" with exactly `127.0.0.1:PORT` allowed for
  the three served origin ports (no byte-rate cap, 1,024 connections) and hands it one listening socket.
  It is a process of its own so that the events it receives never take the GIL from the timing client;
- tinyproxy, as a peer, when it is installed (the bench never installs it);
- this process: the client, timing every sample with time.perf_counter_ns.

Measured, every path against the same origin, interleaved (the paths take turns, the first one rotating)
so drift hits them alike:
1. 64 B round trip on an open connection: a CONNECT tunnel vs a direct connection;
2. a new connection + CONNECT + one 64 B echo vs connect + echo (also the CONNECT → 200 part alone);
3. streaming origin → client through a tunnel vs direct, MB/s (1 MB = 10^6 bytes);
4. a plain-HTTP GET (absolute-form through the proxy, origin-form direct), on a kept-alive connection and
   on a new connection each.
Before timing, the proxy must refuse a CONNECT and a GET to the unlisted origin port (403 EGRESS_DENIED);
after it, its counters must show exactly the connections the client opened and no errors.

Goals: a tunnel adds ≤ 1 ms to the 64 B round trip at p50; tunnel streaming ≥ 500 MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from timing import percentile  # noqa: E402

LOOPBACK = "127.0.0.1"
AGENT = "bench"
MiB = 1 << 20
ECHO_BYTES = 64
HTTP_BODY = 1024
BULK_HEADER = 64  # the bulk origin reads exactly this many bytes: the MiB count, space-padded
GOAL_ADDED_P50_US = 1000.0
GOAL_STREAM_MB_S = 500.0
IO_TIMEOUT_S = 10  # kernel socket timeouts: a stuck peer fails the bench instead of hanging it
HELPER_TIMEOUT_S = 30.0
LIMITS = {"bandwidth_bytes_per_s": 0, "max_connections": 1024}

Clock = Callable[[], int]


class ProxyBenchError(Exception):
    """The bench could not measure (a helper did not start, a peer answered wrongly). `code` is stable."""

    code = "PROXY_BENCH_FAILED"


@dataclass(frozen=True)
class Config:
    rtt_rounds: int  # the paths take turns this many times ...
    rtt_per_round: int  # ... timing this many round trips each
    conn_samples: int  # per path
    stream_runs: int  # per path
    stream_mib: int  # per run
    http_rounds: int
    http_per_round: int
    http_new_samples: int
    warmup: int


FULL = Config(rtt_rounds=20, rtt_per_round=250, conn_samples=1000, stream_runs=5, stream_mib=1024,
              http_rounds=20, http_per_round=150, http_new_samples=1000, warmup=200)  # fmt: skip
QUICK = Config(rtt_rounds=4, rtt_per_round=250, conn_samples=150, stream_runs=3, stream_mib=128,
               http_rounds=4, http_per_round=150, http_new_samples=150, warmup=50)  # fmt: skip


# ---- the origin (a helper process) ---------------------------------------------------------------------

BLOB = b"x" * MiB
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
    + str(HTTP_BODY).encode()
    + b"\r\n\r\n"
    + b"b" * HTTP_BODY
)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed early")
        data += chunk
    return bytes(data)


def _origin_echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _origin_bulk(conn: socket.socket) -> None:
    count = int(_recv_exact(conn, BULK_HEADER))
    view = memoryview(BLOB)
    for _ in range(count):
        conn.sendall(view)


def _origin_http(conn: socket.socket) -> None:
    buf = bytearray()
    while True:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        del buf[: end + 4]  # GET only: no body to skip
        conn.sendall(HTTP_RESPONSE)


def _origin_unlisted(conn: socket.socket) -> None:
    """Never reached through the proxy when its rules hold; closes at once when it is."""


def _origin_conn(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError, ValueError):  # a client that aborts ends its own thread only
        handler(conn)


def _origin_accept(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_origin_conn, args=(handler, conn), daemon=True).start()


def serve_origin() -> int:
    handlers = {"echo": _origin_echo, "bulk": _origin_bulk, "http": _origin_http, "unlisted": _origin_unlisted}
    ports = {}
    for name, handler in handlers.items():
        listener = socket.create_server((LOOPBACK, 0), backlog=1024)
        ports[name] = listener.getsockname()[1]
        threading.Thread(target=_origin_accept, args=(listener, handler), daemon=True).start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # the bench closes our stdin when it is done (or dies): then we go
    return 0


# ---- the proxy host (a helper process) -----------------------------------------------------------------


async def _serve_host(ports: Sequence[int]) -> None:
    from faramesh.engine.proxy_host import ProxyHost

    events = 0

    def on_event(event: dict[str, Any]) -> None:
        nonlocal events
        events += 1

    host = ProxyHost(on_event, log=lambda line: print(f"proxy host: {line}", file=sys.stderr, flush=True))
    await host.start()
    try:
        await host.set_rules(AGENT, {"allow": [f"{LOOPBACK}:{p}" for p in ports]}, LIMITS)
        with socket.create_server((LOOPBACK, 0), backlog=1024) as listener:
            port = listener.getsockname()[1]
            await host.add_listener(AGENT, listener)  # the host keeps a duplicate
        print(json.dumps({"port": port, "proxy_pid": host.pid}), flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.strip() == "stats":
                print(json.dumps({**await host.stats(), "events": events}, default=str), flush=True)
    finally:
        await host.close()


def serve_host(ports: Sequence[int]) -> int:
    asyncio.run(_serve_host(ports))
    return 0


# ---- helper processes, seen from the bench -------------------------------------------------------------


class Helper:
    """A child speaking one JSON line per request on stdout; closing its stdin ends it."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )

    def read(self, timeout: float = HELPER_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise ProxyBenchError(f"{self.name} helper gave no answer (exit {self.proc.poll()}):\n{tail(self.log)}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, request: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Tinyproxy:
    """tinyproxy in the foreground on a loopback port, its own config, privileges dropped to nobody."""

    def __init__(self, exe: str, work: Path) -> None:
        # A port picked by the kernel, released and handed to tinyproxy (its config wants a number): the
        # window in which another process could take it is tiny, and a clash fails loudly below.
        with socket.create_server((LOOPBACK, 0)) as probe:
            self.port = probe.getsockname()[1]
        conf = work / "tinyproxy.conf"
        conf.write_text(
            f"User nobody\nGroup nogroup\nPort {self.port}\nListen {LOOPBACK}\nTimeout 600\nMaxClients 1024\n"
            f"Allow {LOOPBACK}\nDisableViaHeader Yes\nLogLevel Error\n"
        )
        self.log = work / "tinyproxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProxyBenchError(f"tinyproxy exited {self.proc.returncode}:\n{tail(self.log)}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=1):
                return
            time.sleep(0.05)
        raise ProxyBenchError(f"tinyproxy did not listen on {LOOPBACK}:{self.port} within 10 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- the client ----------------------------------------------------------------------------------------


def dial(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Kernel timeouts rather than settimeout(): Python's timeout mode adds a poll() to every call, which
    # would be charged to every sample.
    timeval = struct.pack("ll", IO_TIMEOUT_S, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect((LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Response:
    status: int
    keep_alive: bool
    body: bytes


def read_response(sock: socket.socket, buf: bytearray) -> Response:
    """One HTTP/1.x response framed by Content-Length (or none); what follows it stays in `buf`."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ProxyBenchError(f"the connection closed before a response head (got {bytes(buf[:80])!r})")
        buf += chunk
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    start = lines[0].split(" ", 2)
    if len(start) < 2 or not start[0].startswith("HTTP/1.") or not start[1].isdigit():
        raise ProxyBenchError(f"not an HTTP response: {lines[0][:80]!r}")
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(fields.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ProxyBenchError("the connection closed inside a response body")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    keep = start[0] == "HTTP/1.1" and "close" not in fields.get("connection", "").lower()
    return Response(int(start[1]), keep, body)


@dataclass
class Route:
    """How the client reaches an origin port: directly, or through an HTTP proxy."""

    name: str
    proxy_port: int | None = None
    opened: int = 0  # connections opened through the proxy (the proxy's permit count must match)

    def stream(self, target: int) -> socket.socket:
        """A byte stream to the origin: a direct connection, or a CONNECT tunnel."""
        if self.proxy_port is None:
            return dial(target)
        sock = dial(self.proxy_port)
        try:
            sock.sendall(f"CONNECT {LOOPBACK}:{target} HTTP/1.1\r\nHost: {LOOPBACK}:{target}\r\n\r\n".encode())
            buf = bytearray()
            answer = read_response(sock, buf)
            if answer.status != 200 or buf:
                raise ProxyBenchError(f"{self.name}: CONNECT {LOOPBACK}:{target} answered {answer.status}")
        except BaseException:
            sock.close()
            raise
        self.opened += 1
        return sock

    def http_conn(self, target: int) -> socket.socket:
        sock = dial(self.proxy_port if self.proxy_port is not None else target)
        if self.proxy_port is not None:
            self.opened += 1
        return sock

    def get_request(self, target: int) -> bytes:
        where = f"{LOOPBACK}:{target}"
        path = "/bench" if self.proxy_port is None else f"http://{where}/bench"
        return f"GET {path} HTTP/1.1\r\nHost: {where}\r\nUser-Agent: faramesh-bench\r\n\r\n".encode()


def _turns(paths: Sequence[Route], i: int) -> list[Route]:
    k = i % len(paths)
    return [*paths[k:], *paths[:k]]


def echo_once(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(message)
    got = bytearray()
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        if not chunk:
            raise ProxyBenchError("the echo connection closed")
        got += chunk
    return bytes(got)


def measure_rtt(paths: Sequence[Route], port: int, cfg: Config, clock: Clock) -> dict[str, list[int]]:
    message = bytes(range(ECHO_BYTES))
    socks = {p.name: p.stream(port) for p in paths}
    out: dict[str, list[int]] = {p.name: [] for p in paths}
    try:
        for p in paths:
            if echo_once(socks[p.name], message) != message:
                raise ProxyBenchError(f"{p.name}: the echo came back altered")
            for _ in range(cfg.warmup):
                echo_once(socks[p.name], message)
        gc.collect()
        for r in range(cfg.rtt_rounds):
            for p in _turns(paths, r):
                sock, samples = socks[p.name], out[p.name]
                for _ in range(cfg.rtt_per_round):
                    t0 = clock()
                    echo_once(sock, message)
                    samples.append(clock() - t0)
    finally:
        for s in socks.values():
            s.close()
    return out


def measure_new_conn(
    paths: Sequence[Route], port: int, cfg: Config, clock: Clock
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(connect + CONNECT + echo, connect + CONNECT alone) per path."""
    message = b"c" * ECHO_BYTES
    total: dict[str, list[int]] = {p.name: [] for p in paths}
    opening: dict[str, list[int]] = {p.name: [] for p in paths}
    warm = max(5, cfg.warmup // 10)
    gc.collect()
    for i in range(warm + cfg.conn_samples):
        for p in _turns(paths, i):
            t0 = clock()
            sock = p.stream(port)
            t1 = clock()
            try:
                echo_once(sock, message)
                t2 = clock()
            finally:
                sock.close()
            if i >= warm:
                total[p.name].append(t2 - t0)
                opening[p.name].append(t1 - t0)
    return total, opening


def stream_once(path: Route, port: int, mib: int, clock: Clock) -> float:
    """MB/s of one origin → client transfer of `mib` MiB, from the request to the last byte."""
    sock = path.stream(port)
    try:
        buf = bytearray(MiB)
        total = mib * MiB
        got = 0
        t0 = clock()
        sock.sendall(str(mib).encode().ljust(BULK_HEADER))
        while got < total:
            n = sock.recv_into(buf)
            if n == 0:
                raise ProxyBenchError(f"{path.name}: the stream ended after {got:,} of {total:,} bytes")
            got += n
        elapsed = clock() - t0
    finally:
        sock.close()
    return total / (elapsed / 1e9) / 1e6


def measure_stream(paths: Sequence[Route], port: int, cfg: Config, clock: Clock) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {p.name: [] for p in paths}
    for p in paths:
        stream_once(p, port, min(64, cfg.stream_mib), clock)  # warm-up
    for r in range(cfg.stream_runs):
        for p in _turns(paths, r):
            out[p.name].append(stream_once(p, port, cfg.stream_mib, clock))
    return out


def _get(sock: socket.socket, buf: bytearray, request: bytes, who: str) -> bool:
    sock.sendall(request)
    answer = read_response(sock, buf)
    if answer.status != 200 or len(answer.body) != HTTP_BODY:
        raise ProxyBenchError(f"{who}: GET answered {answer.status} with {len(answer.body)} body bytes")
    return answer.keep_alive


@dataclass
class HttpRun:
    samples: list[int] = field(default_factory=list)
    reconnects: int = 0  # kept-alive runs: the peer closed after a response, the next sample reconnected


def measure_http_keepalive(paths: Sequence[Route], port: int, cfg: Config, clock: Clock) -> dict[str, HttpRun]:
    out = {p.name: HttpRun() for p in paths}
    conns: dict[str, socket.socket | None] = {p.name: None for p in paths}
    bufs = {p.name: bytearray() for p in paths}

    def one(p: Route) -> int:
        t0 = clock()
        sock = conns[p.name]
        if sock is None:
            sock = conns[p.name] = p.http_conn(port)
            bufs[p.name].clear()
            out[p.name].reconnects += 1
        keep = _get(sock, bufs[p.name], p.get_request(port), p.name)
        elapsed = clock() - t0
        if not keep:
            sock.close()
            conns[p.name] = None
        return elapsed

    try:
        for p in paths:
            for _ in range(cfg.warmup):
                one(p)
            out[p.name].reconnects = 0
        gc.collect()
        for r in range(cfg.http_rounds):
            for p in _turns(paths, r):
                samples = out[p.name].samples
                for _ in range(cfg.http_per_round):
                    samples.append(one(p))
    finally:
        for s in conns.values():
            if s is not None:
                s.close()
    return out


def measure_http_new(paths: Sequence[Route], port: int, cfg: Config, clock: Clock) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {p.name: [] for p in paths}
    warm = max(5, cfg.warmup // 10)
    gc.collect()
    for i in range(warm + cfg.http_new_samples):
        for p in _turns(paths, i):
            request = p.get_request(port)
            t0 = clock()
            sock = p.http_conn(port)
            try:
                _get(sock, bytearray(), request, p.name)
                t1 = clock()
            finally:
                sock.close()
            if i >= warm:
                out[p.name].append(t1 - t0)
    return out


def check_refusals(proxy: Route, unlisted: int) -> list[str]:
    """The proxy must refuse a target its rules do not list, for CONNECT and for plain HTTP."""
    problems = []
    attempts = (
        ("CONNECT", f"CONNECT {LOOPBACK}:{unlisted} HTTP/1.1\r\nHost: {LOOPBACK}:{unlisted}\r\n\r\n"),
        ("GET", f"GET http://{LOOPBACK}:{unlisted}/ HTTP/1.1\r\nHost: {LOOPBACK}:{unlisted}\r\n\r\n"),
    )
    assert proxy.proxy_port is not None
    for method, request in attempts:
        with dial(proxy.proxy_port) as sock:
            sock.sendall(request.encode())
            answer = read_response(sock, bytearray())
        if answer.status != 403 or b"EGRESS_DENIED" not in answer.body:
            problems.append(f"{method} to the unlisted port answered {answer.status}, not 403 EGRESS_DENIED")
    return problems


# ---- output --------------------------------------------------------------------------------------------


def _us(v: float) -> str:
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _signed_us(v: float) -> str:
    return ("+" if v >= 0 else "−") + _us(abs(v))


def _mb(v: float) -> str:
    return f"{v:,.0f}"


def table(rows: list[list[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def latency_rows(
    label: str, samples: dict[str, list[int]], goal: Callable[[str, float], str] | None = None
) -> list[list[str]]:
    """One row per path; added = this path's percentile minus direct's (the same percentile)."""
    d = sorted(samples["direct"])
    d50, d99 = percentile(d, 50), percentile(d, 99)
    rows = []
    for n, (name, xs) in enumerate(samples.items()):
        s = sorted(xs)
        p50, p99 = percentile(s, 50), percentile(s, 99)
        direct = name == "direct"
        rows.append(
            [label if n == 0 else "", name, f"{len(s):,}", _us(p50), _us(p99),
             "" if direct else _signed_us(p50 - d50), "" if direct else _signed_us(p99 - d99),
             "" if direct else f"{p50 / d50:.1f}×", "" if direct or goal is None else goal(name, p50 - d50)]
        )  # fmt: skip
    return rows


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


@dataclass
class Results:
    rtt: dict[str, list[int]]
    conn: dict[str, list[int]]
    conn_open: dict[str, list[int]]
    stream: dict[str, list[float]]
    http_keep: dict[str, HttpRun]
    http_new: dict[str, list[int]]


def report(res: Results, cfg: Config, header: list[str], checks: list[str]) -> tuple[list[str], bool]:
    rtt_added = percentile(sorted(res.rtt["faramesh"]), 50) - percentile(sorted(res.rtt["direct"]), 50)
    stream_mb = median(res.stream["faramesh"])
    ok_rtt, ok_stream = rtt_added <= GOAL_ADDED_P50_US, stream_mb >= GOAL_STREAM_MB_S

    def rtt_goal(name: str, added: float) -> str:
        return f"+p50 ≤ {GOAL_ADDED_P50_US:,.0f} µs {verdict(added <= GOAL_ADDED_P50_US)}" if name == "faramesh" else ""

    head = ["latency", "path", "samples", "p50 µs", "p99 µs", "+p50 µs", "+p99 µs", "p50/direct", "goal"]
    rows = [head]
    rows += latency_rows(f"{ECHO_BYTES} B round trip, open connection", res.rtt, rtt_goal)
    rows += latency_rows(f"new connection + CONNECT + {ECHO_BYTES} B echo", res.conn)
    rows += latency_rows("  of which connect + CONNECT → 200", res.conn_open)
    rows += latency_rows(f"HTTP GET ({HTTP_BODY} B body), kept-alive", {k: v.samples for k, v in res.http_keep.items()})
    rows += latency_rows("HTTP GET, new connection each", res.http_new)
    out = [*header, "", table(rows, [False, False, True, True, True, True, True, True, False]), ""]

    direct_mb = median(res.stream["direct"])
    srows = [["streaming origin → client", "path", "runs × MiB", "median MB/s", "slowest MB/s", "vs direct", "goal"]]
    for n, (name, xs) in enumerate(res.stream.items()):
        goal = f"≥ {GOAL_STREAM_MB_S:,.0f} MB/s {verdict(ok_stream)}" if name == "faramesh" else ""
        srows.append(
            ["through a CONNECT tunnel" if n == 0 else "", name, f"{len(xs)} × {cfg.stream_mib:,}", _mb(median(xs)),
             _mb(min(xs)), f"{median(xs) / direct_mb:.2f}×", goal]
        )  # fmt: skip
    out += [table(srows, [False, False, True, True, True, True, False]), ""]

    out.append(f"goal tunnel round trip adds ≤ {GOAL_ADDED_P50_US:,.0f} µs at p50: +{_us(rtt_added)} µs — "
               f"{verdict(ok_rtt)}")  # fmt: skip
    out.append(f"goal tunnel streaming ≥ {GOAL_STREAM_MB_S:,.0f} MB/s: {_mb(stream_mb)} MB/s (median run) — "
               f"{verdict(ok_stream)}")  # fmt: skip
    out += ["", "checks:", *[f"  {c}" for c in checks]]
    for name, run in res.http_keep.items():
        if run.reconnects:
            out.append(f"  {name}: closes the connection after a response, so {run.reconnects:,} of its"
                       f" {len(run.samples):,} kept-alive GETs include a new connection")  # fmt: skip
    out += [
        "",
        "notes:",
        "  - +p50/+p99: the path's percentile minus direct's same percentile (what the proxy adds), in µs.",
        "  - Client, origin, proxy host and proxy child share this machine's CPUs; every sample is one",
        "    request timed in the client with perf_counter_ns (blocking sockets, TCP_NODELAY, GC on). The",
        "    paths take turns in rounds whose first path rotates, so drift hits them alike.",
        "  - The proxy is the engine's: ProxyHost spawns `python -I -m faramesh.engine.proxy`, agent rules are",
        f"    exact `{LOOPBACK}:PORT` entries (loopback is a refused range: only an exact IP literal passes it).",
        "    The per-agent byte-rate cap is off (bandwidth_bytes_per_s 0) so streaming measures the relay;",
        "    the default cap (100 MiB/s) would be the ceiling otherwise.",
        "  - Streaming: the origin sends 1 MiB writes, the client reads into a 1 MiB buffer; MB/s counts",
        "    from the request to the last byte, 1 MB = 10^6 bytes; a 64 MiB warm-up run per path is discarded.",
        "  - HTTP GET: absolute-form `http://…` through the proxy (its upstream is reused for the kept-alive",
        "    requests), origin-form direct; the origin answers 200 with a fixed body and keeps the connection.",
    ]
    return out, ok_rtt and ok_stream


# ---- the run -------------------------------------------------------------------------------------------


def lib_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def tinyproxy_version(exe: str) -> str:
    try:
        done = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"tinyproxy (version unknown: {exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "tinyproxy"


def progress(message: str) -> None:
    sys.stderr.write(f"proxy bench: {message}\n")
    sys.stderr.flush()


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def counter_check(stats: dict[str, Any], opened: int) -> tuple[str, bool]:
    """The proxy's own counters against what the client did: one permit per connection it opened (kept-alive
    requests reuse their upstream), the two refusals of check_refusals, no error, no child restart."""
    agent = stats.get("agents", {}).get(AGENT, {})
    permits, refusals, errors = agent.get("permits"), agent.get("refusals"), agent.get("errors")
    ok = permits == opened and refusals == 2 and errors == 0 and stats.get("restarts") == 0
    line = (
        f"proxy counters: {_n(permits)} permits for the {opened:,} connections the client opened,"
        f" {_n(refusals)} refusals (2 expected), {_n(errors)} errors, {_n(stats.get('restarts'))} child restarts,"
        f" {_n(stats.get('events'))} events delivered to the host (aggregated under flood):"
        f" {'ok' if ok else 'MISMATCH'}"
    )
    return line, ok


def run_all(quick: bool = False, clock: Clock = time.perf_counter_ns) -> tuple[str, bool]:
    cfg = QUICK if quick else FULL
    started = time.perf_counter()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    tiny_exe = shutil.which("tinyproxy")
    peer = tinyproxy_version(tiny_exe) if tiny_exe else "tinyproxy not installed"

    def header() -> list[str]:
        quick_note = " (--quick: few samples, numbers are rough)" if quick else ""
        return [
            f"Egress proxy: engine/proxy.py child (through ProxyHost) vs direct loopback, {LOOPBACK} only{quick_note}",
            f"python {platform.python_version()} · faramesh {lib_version('faramesh')} · {peer} · {platform.system()}"
            f" {platform.machine()} · {cpu_model()} · {os.cpu_count()} CPUs · load {load}",
            f"goals: a CONNECT tunnel adds ≤ {GOAL_ADDED_P50_US:,.0f} µs to a {ECHO_BYTES} B round trip at p50;"
            f" tunnel streaming ≥ {GOAL_STREAM_MB_S:,.0f} MB/s",
        ]

    work = Path(tempfile.mkdtemp(prefix="faramesh-proxybench-"))
    helpers: list[Helper] = []
    tiny: Tinyproxy | None = None
    me = str(Path(__file__).resolve())
    try:
        origin = Helper("origin", [sys.executable, me, "--origin"], work)
        helpers.append(origin)
        ports = origin.read()
        served = [ports["echo"], ports["bulk"], ports["http"]]
        host = Helper("host", [sys.executable, me, "--host", *map(str, served)], work)
        helpers.append(host)
        faramesh = Route("faramesh", host.read()["port"])
        paths = [Route("direct"), faramesh]
        if tiny_exe:
            try:
                tiny = Tinyproxy(tiny_exe, work)
                paths.append(Route("tinyproxy", tiny.port))
            except (ProxyBenchError, OSError) as exc:
                # A broken peer costs its rows, not the measurement of ours.
                peer += f" (failed to start, left out: {' '.join(str(exc).split())[:200] or type(exc).__name__})"

        refused = check_refusals(faramesh, ports["unlisted"])
        checks = refused or ["CONNECT and GET to an origin port no rule lists: 403 EGRESS_DENIED (ok)"]

        progress("64 B round trips")
        rtt = measure_rtt(paths, ports["echo"], cfg, clock)
        progress("new connections")
        conn, conn_open = measure_new_conn(paths, ports["echo"], cfg, clock)
        progress("streaming")
        stream = measure_stream(paths, ports["bulk"], cfg, clock)
        progress("HTTP GET")
        http_keep = measure_http_keepalive(paths, ports["http"], cfg, clock)
        http_new = measure_http_new(paths, ports["http"], cfg, clock)

        counters, counted = counter_check(host.ask("stats"), faramesh.opened)
        checks.append(counters)
    except (ProxyBenchError, OSError, ValueError, KeyError) as exc:
        return "\n".join([*header(), "", f"ERROR: {getattr(exc, 'code', type(exc).__name__)}: {exc}"]), False
    finally:
        if tiny is not None:
            tiny.stop()
        for h in reversed(helpers):
            h.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines, ok = report(Results(rtt, conn, conn_open, stream, http_keep, http_new), cfg, header(), checks)
    lines.append(f"\nproxy bench wall time {time.perf_counter() - started:.1f} s")
    return "\n".join(lines), ok and counted and not refused


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few samples: a smoke run (a few seconds)")
    ap.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)  # helper process modes
    ap.add_argument("--host", type=int, nargs="+", metavar="PORT", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.origin:
        return serve_origin()
    if opts.host:
        return serve_host(opts.host)
    text, ok = run_all(opts.quick)
    print(text, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
