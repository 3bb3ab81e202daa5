"""Shared helpers for tests that start real engines (imported by the engine test files; others may use it).

Two ways to run an engine:

- `InProcessEngine`: an `EngineServer` on its own event loop in a background thread of the test process.
  Fast, and everything is injectable: the clock, the store (memory or SQLite, with its fault hooks), the
  idle-partial-line timeout, a slow initialisation.
- `EngineProcess`: the real `faramesh serve` in a subprocess. It is started through this file run as a
  script (`python tests/engine_harness.py serve --dir … --policy …`), a **test-only launcher** that installs
  hooks read from `FARAMESH_TEST_*` variables and then calls the production entry point
  (`faramesh.launchers.serve.main`). The production engine reads none of these variables: a hook that
  sleeps or fails inside a WAL transaction must never be reachable by setting an environment variable on a
  production host, so the hooks live here, in tests/, and nowhere in the shipped code.

Launcher variables (all optional):
    FARAMESH_TEST_COMMIT_SLEEP=S      sleep S seconds inside every WAL transaction (after the inserts,
                                      before COMMIT)
    FARAMESH_TEST_COMMIT_FLAG=PATH    while inside that sleep the file says "in", after it "out"
    FARAMESH_TEST_FAULT_FILE=PATH     while PATH exists, every WAL commit fails inside its transaction
    FARAMESH_TEST_COMMIT_LOG=PATH     append the number of records of every committed transaction
    FARAMESH_TEST_INIT_DELAY=S        the start-up (open, verify, replay) sleeps S seconds first
    FARAMESH_TEST_IDLE_TIMEOUT=S      close a connection whose partial line is idle for S seconds
    FARAMESH_TEST_CHECKPOINT_INTERVAL=S  periodic checkpoints every S seconds instead of 1
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

# The test stack: one agent with every effect, rate limit and redaction; one to test identity; one with a budget.
DEFAULT_POLICY = """\
runtime {
  backend = "sqlite"
  wal_sync = "%(wal_sync)s"
  approval_ttl = "%(approval_ttl)s"
  cold_start_deny_window = "%(cold_start)s"
}

agent "bot" {
  default deny
  rules {
    permit search
    permit ticket/read
    permit refund if amount < $25
    defer refund if amount < $500
    deny refund reason "refunds of $500 or more are never allowed"
  }
  rate_limit "search": 5 per minute
  redact refund args: ["card.number", "card.cvv"]
}

agent "other" {
  default deny
  rules {
    permit ticket/read
    defer refund
  }
}

agent "spender" {
  default deny
  rules {
    permit llm/*
  }
  budget daily { max $1 on_exceed deny }
}
"""


def policy_text(wal_sync: str = "normal", approval_ttl: str = "24h", cold_start: str = "10s") -> str:
    return DEFAULT_POLICY % {"wal_sync": wal_sync, "approval_ttl": approval_ttl, "cold_start": cold_start}


def short_tmpdir(prefix: str = "fmt") -> Path:
    """A short directory under /tmp: socket paths must fit sun_path (107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def make_stack(root: Path, text: str | None = None, name: str = "stack") -> Path:
    stack = root / name
    stack.mkdir(parents=True, exist_ok=True)
    (stack / "governance.fms").write_text(text if text is not None else policy_text(), encoding="utf-8")
    return stack


def compile_policy(stack: Path, out: Path | None = None, text: str | None = None) -> tuple[Any, Path | None]:
    """Compile `stack` (after replacing its governance.fms by `text`, when given); write JSON to `out`."""
    from faramesh.engine.policy.stack import compile_stack

    if text is not None:
        (stack / "governance.fms").write_text(text, encoding="utf-8")
    policy = compile_stack(stack, env={}).policy
    if out is not None:
        out.write_bytes(policy.to_json())
    return policy, out


# ---------------------------------------------------------------- clients


class Conn:
    """A blocking line-protocol client on a Unix socket (tests only; the product's client is engine/client.py)."""

    def __init__(self, path: Path | str, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""

    def send(self, message: Mapping[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def recv_line(self) -> bytes | None:
        """One reply line, or None when the engine closed the connection."""
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def recv(self) -> dict[str, Any]:
        line = self.recv_line()
        if line is None:
            raise ConnectionError("the engine closed the connection")
        reply = json.loads(line)
        assert isinstance(reply, dict), reply
        return reply

    def call(self, message: Mapping[str, Any] | bytes) -> dict[str, Any]:
        self.send(message)
        return self.recv()

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the engine closes the connection within `timeout` (data before the EOF is skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def govern(
    tool: str, args: Mapping[str, Any] | None = None, agent_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "govern", "v": 1, "tool_id": tool, "args": dict(args or {})}
    if agent_id is not None:
        msg["agent_id"] = agent_id
    msg.update(extra)
    return msg


# ---------------------------------------------------------------- in-process engine


class FakeClock:
    """A settable wall clock shared by the engine and its WAL."""

    def __init__(self, start: float = 1_780_315_200.0) -> None:  # 2026-06-01T12:00:00Z
        self.t = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds


class InProcessEngine:
    """EngineServer on its own loop in a daemon thread. Sockets: `dev` (one socket, both roles) or
    `serve` (operator.sock plus agents/<h>/agent.sock for every declared agent, as the runner lays out)."""

    def __init__(
        self,
        policy: Any,
        runtime_dir: Path,
        *,
        store: Any = None,
        layout: str = "serve",
        clock: Callable[[], float] | None = None,
        hmac_key: bytes = b"k" * 32,
        idle_timeout: float | None = None,
        cold_start_deny_window: float = 30.0,
        init_hook: Callable[[], None] | None = None,
        checkpoint_interval: float | None = None,
    ) -> None:
        from faramesh.engine.paths import agent_dir_name
        from faramesh.engine.pipeline import EngineState
        from faramesh.engine.server import EngineServer, ServerConfig, SocketSpec
        from faramesh.engine.wal.log import Wal
        from faramesh.engine.wal.signer import ephemeral_signer
        from faramesh.engine.wal.store import MemoryStore

        self.runtime_dir = runtime_dir
        self.clock = clock or time.time
        self.store = store if store is not None else MemoryStore()
        wal_kwargs: dict[str, Any] = {}
        if checkpoint_interval is not None:
            wal_kwargs["checkpoint_interval"] = checkpoint_interval
        self.wal = Wal(self.store, ephemeral_signer(), clock=self.clock, **wal_kwargs)
        self.state = EngineState(policy, hmac_key=hmac_key, dev=layout == "dev")
        if layout == "dev":
            sockets = [SocketSpec(runtime_dir / "dev.sock", "dev")]
        else:
            sockets = [SocketSpec(runtime_dir / "operator.sock", "operator", None, 0o660)]
            for agent_id in sorted(policy.agents):
                path = runtime_dir / "agents" / agent_dir_name(agent_id) / "agent.sock"
                sockets.append(SocketSpec(path, "agent", agent_id, 0o666))
        self.sockets = {s.agent_id or s.role: s.path for s in sockets}
        path = getattr(self.store, "path", None)
        wal_info = {"backend": "sqlite" if path else "memory", "path": str(path) if path else None,
                    "sync": getattr(self.store, "sync", None)}  # fmt: skip
        config = ServerConfig(
            sockets=sockets,
            dev=layout == "dev",
            cold_start_deny_window=cold_start_deny_window,
            wal_description=wal_info,
        )
        if idle_timeout is not None:
            config.idle_partial_line_s = idle_timeout
        self.server = EngineServer(policy, self.wal, self.state, config, clock=self.clock)
        if init_hook is not None:
            original = self.server._initialise

            def slow_initialise() -> None:
                init_hook()
                original()

            self.server._initialise = slow_initialise  # type: ignore[method-assign]
        self.loop = asyncio.new_event_loop()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.exit_code = self.loop.run_until_complete(self.server.run())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> InProcessEngine:
        self._thread.start()
        if wait_ready:
            self.wait_state("READY", timeout)
        return self

    def wait_state(self, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.server.lifecycle != state:
            if not self._thread.is_alive():
                raise RuntimeError(f"engine exited ({self.exit_code}, {self.error!r}) before {state}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine is {self.server.lifecycle}, not {state}")
            time.sleep(0.005)

    def call_in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine's loop (for touching engine state without racing it)."""
        done = threading.Event()
        box: list[Any] = []

        def wrapper() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self.loop.call_soon_threadsafe(wrapper)
        done.wait(10)
        return box[0] if box else None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.server._stop.set)
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.exit_code

    def join(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return self.exit_code

    def conn(self, who: str = "operator", timeout: float = 15.0) -> Conn:
        return Conn(self.sockets[who], timeout)


# ---------------------------------------------------------------- subprocess engine


@dataclass
class EngineDirs:
    """Relocated state and runtime roots (FARAMESH_STATE_DIR / FARAMESH_RUNTIME_DIR)."""

    state_root: Path
    runtime_root: Path

    @classmethod
    def fresh(cls) -> EngineDirs:
        return cls(short_tmpdir("fms"), short_tmpdir("fmr"))

    def env(self) -> dict[str, str]:
        return {"FARAMESH_STATE_DIR": str(self.state_root), "FARAMESH_RUNTIME_DIR": str(self.runtime_root)}

    def cleanup(self) -> None:
        shutil.rmtree(self.state_root, ignore_errors=True)
        shutil.rmtree(self.runtime_root, ignore_errors=True)


class EngineProcess:
    """`faramesh serve` in a subprocess, started through the test-only launcher below."""

    def __init__(
        self,
        stack: Path,
        policy_file: Path,
        dirs: EngineDirs,
        *,
        hooks: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        from faramesh.engine.paths import stack_paths

        self.stack = stack
        self.policy_file = policy_file
        self.dirs = dirs
        self.hooks = dict(hooks or {})
        self.env = {**os.environ, **dirs.env(), **self.hooks}
        self.env.pop("FARAMESH_SOCKET", None)
        self.paths = stack_paths(stack, env=self.env)
        self.log_path = log_path or (dirs.state_root / "engine-stderr.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [PYTHON, str(HERE), "serve", "--dir", str(self.stack), "--policy", str(self.policy_file)]

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> EngineProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.argv(), env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=str(self.stack)
            )
        finally:
            log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        try:
            with Conn(self.paths.operator_socket, timeout) as c:
                return c.call({"type": "status"})
        except (OSError, ValueError, ConnectionError):
            return None

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode} before READY:\n{self.log()}")
            reply = self.status(2.0) if self.paths.operator_socket.exists() else None
            if reply is not None and reply.get("daemon", {}).get("state") == "READY":
                return reply
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine not READY within {timeout}s:\n{self.log()}")
            time.sleep(0.01)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def agent(self, agent_id: str, timeout: float = 15.0) -> Conn:
        return Conn(self.paths.agent_socket(agent_id), timeout)

    def operator(self, timeout: float = 15.0) -> Conn:
        return Conn(self.paths.operator_socket, timeout)

    @property
    def wal_path(self) -> Path:
        runtime = json.loads(self.policy_file.read_bytes()).get("runtime", {})
        return self.paths.wal_path(runtime.get("wal_dir"))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def running(engine: EngineProcess, **start: Any) -> Iterator[EngineProcess]:
    try:
        yield engine.start(**start)
    finally:
        engine.ensure_stopped()


def read_wal(path: Path) -> tuple[str, list[Any], list[Any]]:
    """(chain_id, records, checkpoints) of a SQLite WAL, read through a read-only connection."""
    import sqlite3

    from faramesh.engine.wal.store import Checkpoint, StoredRecord

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        chain_row = conn.execute("SELECT value FROM meta WHERE key='chain_id'").fetchone()
        records = [StoredRecord(*r) for r in conn.execute("SELECT * FROM records ORDER BY seq")]
        checkpoints = [Checkpoint(*r) for r in conn.execute("SELECT * FROM checkpoints ORDER BY seq")]
    finally:
        conn.close()
    return (chain_row[0] if chain_row else ""), records, checkpoints


def verify_wal_file(path: Path, pinned: dict[str, str] | None = None) -> Any:
    """What `faramesh audit verify` checks, over the whole file: engine/wal/verify.verify_chain."""
    from faramesh.engine.wal.verify import verify_chain

    chain_id, records, checkpoints = read_wal(path)
    return verify_chain(chain_id, records, checkpoints, pinned_keys=pinned)


def pinned_key(state_dir: Path) -> dict[str, str]:
    from faramesh.engine.wal.signer import load_or_create_signer

    signer = load_or_create_signer(state_dir / "signing.key")
    return {signer.fingerprint: signer.public_b64}


# ---------------------------------------------------------------- the test-only launcher


def _install_test_hooks(env: Mapping[str, str]) -> None:
    """Patch the engine's classes as the runner uses them. Runs only in this test launcher."""
    import sqlite3

    from faramesh.engine import runner, server
    from faramesh.engine.wal import log as wal_log
    from faramesh.engine.wal import store as wal_store

    commit_sleep = float(env.get("FARAMESH_TEST_COMMIT_SLEEP") or 0)
    flag = env.get("FARAMESH_TEST_COMMIT_FLAG")
    fault_file = env.get("FARAMESH_TEST_FAULT_FILE")
    commit_log = env.get("FARAMESH_TEST_COMMIT_LOG")
    if commit_sleep or fault_file or commit_log:
        flag_fd = os.open(flag, os.O_WRONLY | os.O_CREAT, 0o600) if flag else None

        def hook() -> None:
            if fault_file and os.path.exists(fault_file):
                raise sqlite3.OperationalError("injected fault: disk I/O error")
            if commit_sleep:
                if flag_fd is not None:
                    os.pwrite(flag_fd, b"in ", 0)
                time.sleep(commit_sleep)
                if flag_fd is not None:
                    os.pwrite(flag_fd, b"out", 0)

        log_fd = os.open(commit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if commit_log else None

        class HookedStore(wal_store.SqliteStore):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                if commit_sleep or fault_file:
                    self.fault_hook = hook

            def commit(self, batch: wal_store.Batch) -> None:
                super().commit(batch)
                if log_fd is not None and batch.records:  # one line per committed transaction
                    os.write(log_fd, f"{len(batch.records)}\n".encode())

        runner.SqliteStore = HookedStore  # type: ignore[misc]

    interval = env.get("FARAMESH_TEST_CHECKPOINT_INTERVAL")
    if interval or commit_sleep:

        class TestWal(wal_log.Wal):
            def __init__(self, *a: Any, **kw: Any) -> None:
                if interval:
                    kw["checkpoint_interval"] = float(interval)
                if commit_sleep:
                    # A sleeping commit models a slow fdatasync, which the engine never runs on its
                    # event loop: keep it on the writer thread whatever the sync level.
                    kw["commit_inline"] = False
                super().__init__(*a, **kw)

        runner.Wal = TestWal  # type: ignore[misc]

    init_delay = float(env.get("FARAMESH_TEST_INIT_DELAY") or 0)
    idle = env.get("FARAMESH_TEST_IDLE_TIMEOUT")
    if init_delay or idle:

        class TestServer(server.EngineServer):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                if idle:
                    self.config.idle_partial_line_s = float(idle)

            def _initialise(self) -> None:
                time.sleep(init_delay)
                super()._initialise()

        runner.EngineServer = TestServer  # type: ignore[misc]


def _launcher_main(argv: list[str]) -> int:
    if not argv or argv[0] != "serve":
        sys.stderr.write("usage: engine_harness.py serve --dir DIR --policy FILE\n")
        return 64
    _install_test_hooks(os.environ)
    from faramesh.launchers.serve import main as serve_main

    return serve_main(argv[1:])


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))
