"""The engine's side of the egress proxy (engine/proxy.py): spawns the proxy child, restarts it when it dies,
and talks to it over a Unix SOCK_SEQPACKET socketpair.

The host is the source of truth for what the proxy serves: it keeps every agent's egress rules and limits
and its own duplicate of every listening socket, so a fresh child (after a crash, a kill or an OOM) gets
all of them again and agents' connections queue in the listeners' backlogs meanwhile instead of failing.
Events the proxy sends (one per connection, aggregated under flood) go to the callback the engine gives,
which turns them into DPRs. Runs on the engine's asyncio loop; nothing here parses agent traffic.

The child is `python -I -m faramesh.engine.proxy` with an environment of PATH and LANG only: the engine's
environment holds secret references (`$env`) that the proxy must never see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from faramesh.engine.egress import compile_proxy_egress
from faramesh.engine.proxy import MAX_CONTROL_MESSAGE, AgentLimits

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-I", "-m", "faramesh.engine.proxy")
READY_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 5.0  # a proxy that does not answer a control message in this time is killed
STABLE_AFTER_S = 30.0  # a child that lived this long resets the restart backoff


class ProxyError(Exception):
    """A typed failure of the proxy or of a control request (`code` is stable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProxyUnavailable(ProxyError):
    def __init__(self, message: str) -> None:
        super().__init__("PROXY_UNAVAILABLE", message)


EventCallback = Callable[[dict[str, Any]], None]


class ProxyHost:
    """Owns the proxy child. `on_event(event)` runs on the loop for every event the proxy reports.

    `command` replaces the child's command line (tests run a child with a test resolver; the engine never
    passes one); `--control-fd N` is appended to it."""

    def __init__(
        self,
        on_event: EventCallback,
        *,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff: tuple[float, float] = (0.1, 5.0),
        ready_timeout: float = READY_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.on_event = on_event
        self.command = tuple(command) if command is not None else DEFAULT_COMMAND
        self.env = dict(env) if env is not None else {"PATH": os.defpath, "LANG": "C.UTF-8"}
        self.log = log or (lambda line: print(f"faramesh-engine: proxy: {line}", file=sys.stderr, flush=True))
        self.clock = clock
        self.backoff = backoff
        self.ready_timeout = ready_timeout
        self.request_timeout = request_timeout
        self.rules: dict[str, tuple[dict[str, Any], dict[str, int]]] = {}
        self.listeners: dict[int, tuple[str, socket.socket]] = {}
        self.restarts = 0
        self.last_exit: int | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._next_listener = 1
        self._ready = asyncio.Event()
        self._exited: asyncio.Future[None] | None = None
        self._child_ready: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()  # one state change or resync on the wire at a time
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._first_start: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Spawns the proxy and waits until it is ready; ProxyUnavailable when the first start fails (the
        host keeps retrying in the background either way)."""
        loop = asyncio.get_running_loop()
        self._first_start = loop.create_future()
        self._supervisor = loop.create_task(self._supervise())
        await self._first_start

    async def close(self) -> None:
        """Stops the child (SIGTERM, then SIGKILL) and releases every kept listener."""
        self._closing = True
        self._ready.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._stop_child()
        for _, sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def status(self) -> dict[str, Any]:
        """What `status` shows without asking the child (see `stats` for connections and refusals)."""
        return {
            "running": self.ready,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "agents": len(self.rules),
            "listeners": len(self.listeners),
        }

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    # ------------------------------------------------------------------ state the proxy serves

    async def set_rules(
        self, agent_id: str, egress: Mapping[str, Any], limits: AgentLimits | Mapping[str, Any] | None = None
    ) -> None:
        """Installs an agent's egress block (entries may carry ports) and limits. EgressConfigError /
        ValueError here, before anything is sent, when they are unusable."""
        compile_proxy_egress(egress)
        parsed = limits if isinstance(limits, AgentLimits) else AgentLimits.from_mapping(limits)
        block = {"allow": list(egress.get("allow") or ()), "deny": list(egress.get("deny") or ())}
        self.rules[agent_id] = (block, parsed.to_mapping())
        await self._send_state({"op": "rules", "agent_id": agent_id, "egress": block, "limits": parsed.to_mapping()})

    async def add_listener(self, agent_id: str, sock: socket.socket | int) -> int:
        """Serves a listening TCP socket for `agent_id` (its connections are that agent's). The host keeps a
        duplicate (re-sent after a proxy restart); the caller may close its own. Returns the listener id."""
        fd = sock if isinstance(sock, int) else sock.fileno()
        kept = socket.socket(fileno=os.dup(fd))
        try:
            if kept.type != socket.SOCK_STREAM or kept.family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError("a proxy listener must be a TCP socket")
            if not kept.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ValueError("a proxy listener must be listening")
        except BaseException:
            kept.close()
            raise
        listener_id = self._next_listener
        self._next_listener += 1
        self.listeners[listener_id] = (agent_id, kept)
        await self._send_state({"op": "listen", "listener_id": listener_id, "agent_id": agent_id}, kept.fileno())
        return listener_id

    async def remove_listener(self, listener_id: int) -> None:
        entry = self.listeners.pop(listener_id, None)
        if entry is None:
            return
        entry[1].close()
        await self._send_state({"op": "unlisten", "listener_id": listener_id})

    async def forget_agent(self, agent_id: str) -> None:
        """The agent stopped: its rules, listeners and open connections go."""
        self.rules.pop(agent_id, None)
        for listener_id, (owner, sock) in list(self.listeners.items()):
            if owner == agent_id:
                sock.close()
                del self.listeners[listener_id]
        await self._send_state({"op": "forget", "agent_id": agent_id})

    async def grant(self, agent_id: str, grant: Mapping[str, Any]) -> None:
        """A proxy-tier credential for one request (placeholder, host, method, path, header, value, ttl).
        Not kept for a restart: a grant lives seconds, and one lost with a crashed child is a refused
        request (the placeholder names no grant), never a leak. ProxyError when refused or unavailable."""
        await self._request({"op": "grant", "agent_id": agent_id, "grant": dict(grant)})

    async def stats(self) -> dict[str, Any]:
        """The proxy's counters (open connections and refusals per agent) plus `status()`."""
        if not self.ready:
            raise ProxyUnavailable("the egress proxy is restarting")
        result = await self._request({"op": "stats"})
        return {**self.status(), **(result if isinstance(result, dict) else {})}

    # ------------------------------------------------------------------ the child

    async def _supervise(self) -> None:
        failures = 0
        while not self._closing:
            started = self.clock()
            failure: Exception | None = None
            try:
                await self._spawn()
                async with self._lock:
                    await self._resync()
                    self._ready.set()  # under the lock: a change waiting on it is sent, not skipped
                if self._first_start is not None and not self._first_start.done():
                    self._first_start.set_result(None)
                assert self._exited is not None
                await self._exited
            except (ProxyError, OSError, TimeoutError) as exc:
                failure = exc
            self._ready.clear()
            await self._stop_child()
            if failure is not None:
                message = f"the egress proxy failed to start: {failure} (exit status {self.last_exit})"
                self.log(message)
                if self._first_start is not None and not self._first_start.done():
                    self._first_start.set_exception(ProxyUnavailable(message))
            if self._closing:
                return
            failures = 0 if self.clock() - started >= STABLE_AFTER_S else failures + 1
            delay = min(self.backoff[1], self.backoff[0] * 2 ** max(0, failures - 1))
            self.restarts += 1
            self.log(f"the egress proxy exited (status {self.last_exit}); restarting in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [*self.command, "--control-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=self.env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self._proc.pid
        ours.setblocking(False)
        self._sock = ours
        self._exited = loop.create_future()
        self._child_ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._readable)
        try:
            async with asyncio.timeout(self.ready_timeout):
                await asyncio.shield(self._child_ready)
        except TimeoutError:
            raise ProxyUnavailable(f"the egress proxy did not report ready in {self.ready_timeout:g} s") from None
        if self._exited.done():
            raise ProxyUnavailable("the egress proxy exited while starting")

    async def _resync(self) -> None:
        """Everything the proxy serves, again: rules first, so no connection is seen without them."""
        for agent_id, (block, limits) in list(self.rules.items()):
            await self._resend({"op": "rules", "agent_id": agent_id, "egress": block, "limits": limits})
        for listener_id, (agent_id, sock) in list(self.listeners.items()):
            await self._resend({"op": "listen", "listener_id": listener_id, "agent_id": agent_id}, sock.fileno())

    async def _resend(self, message: dict[str, Any], fd: int | None = None) -> None:
        try:
            await self._request(message, fd)
        except ProxyUnavailable:
            raise
        except ProxyError as exc:  # refused by this child: restarting would not change that
            self.log(f"the egress proxy refused {message['op']} for agent {message['agent_id']}: {exc}")

    async def _stop_child(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        self._fail_pending(ProxyUnavailable("the egress proxy exited"))
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)
        proc = self._proc  # cleared only once reaped: a cancelled wait is finished by close()
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, proc.wait, 2.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await loop.run_in_executor(None, proc.wait)
        self.last_exit = proc.returncode
        self._proc = None
        self.pid = None

    def _kill_hung_child(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.log("the egress proxy stopped answering; killing it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    # ------------------------------------------------------------------ wire

    async def _send_state(self, message: dict[str, Any], fd: int | None = None) -> None:
        """A state change: recorded already, sent now if the child is up (else the resync sends it)."""
        async with self._lock:
            if not self.ready:
                return
            with contextlib.suppress(ProxyUnavailable):  # the child died: the resync sends the state again
                await self._request(message, fd)

    async def _request(self, message: dict[str, Any], fd: int | None = None) -> Any:
        sock = self._sock
        if sock is None:
            raise ProxyUnavailable("the egress proxy is not running")
        loop = asyncio.get_running_loop()
        request_id = self._next_id
        self._next_id += 1
        data = orjson.dumps({**message, "id": request_id})
        if len(data) > MAX_CONTROL_MESSAGE:
            raise ProxyError("PROXY_MESSAGE_TOO_LARGE", f"a control message of {len(data)} bytes is too large")
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[request_id] = future
        try:
            await self._send(sock, data, fd)
            async with asyncio.timeout(self.request_timeout):
                return await future
        except TimeoutError:
            self._kill_hung_child()
            raise ProxyUnavailable("the egress proxy did not answer") from None
        except OSError as exc:
            raise ProxyUnavailable(f"the egress proxy's control socket failed: {exc}") from None
        finally:
            self._pending.pop(request_id, None)

    async def _send(self, sock: socket.socket, data: bytes, fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if fd is None:
                    sock.send(data)
                else:
                    socket.send_fds(sock, [data], [fd])
                return
            except BlockingIOError:
                await self._writable(loop, sock)

    @staticmethod
    async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        writable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not writable.done():
                writable.set_result(None)

        loop.add_writer(sock.fileno(), wake)
        try:
            await writable
        finally:
            loop.remove_writer(sock.fileno())

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data, fds, _flags, _ = socket.recv_fds(sock, MAX_CONTROL_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:  # the proxy never sends descriptors
                os.close(fd)
            if not data:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                if self._exited is not None and not self._exited.done():
                    self._exited.set_result(None)
                if self._child_ready is not None and not self._child_ready.done():
                    self._child_ready.set_result(None)
                return
            try:
                message = orjson.loads(data)
            except orjson.JSONDecodeError:
                self.log("the egress proxy sent an unreadable message")
                continue
            if isinstance(message, dict):
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "event":
            event = message.get("event")
            if isinstance(event, dict):
                try:
                    self.on_event(event)
                except Exception as exc:  # the engine's sink failing must not stop the channel
                    self.log(f"the proxy event callback failed: {type(exc).__name__}: {exc}")
        elif op == "reply":
            future = self._pending.get(message.get("id", -1))
            if future is None or future.done():
                return
            if message.get("ok"):
                future.set_result(message.get("result"))
            else:
                error = message.get("error") or {}
                future.set_exception(ProxyError(str(error.get("code")), str(error.get("message"))))
        elif op == "ready" and self._child_ready is not None and not self._child_ready.done():
            self._child_ready.set_result(None)

    def _fail_pending(self, exc: ProxyError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
