"""The engine's egress service: the proxy child (engine/proxy_host.py), the intake socket through which
launches hand over each sandbox's listener, and proxy events turned into DPRs.

Intake (`<runtime>/egress.sock`, SOCK_SEQPACKET, the engine's own 0600): the launch sequence's C1 connects
while it is still the launching user (root, or the engine's own user for an unprivileged stack), and
after S3 sends `{"agent_id": …}` with the listening socket it made on 127.0.0.1:<proxy port> inside the
sandbox's network namespace (SCM_RIGHTS). SO_PEERCRED is checked: only uid 0 and the engine's own uid may
hand over listeners. The listener stays served for as long as that connection is open — C1 holds it
until its agent exits — so an ended sandbox never leaves a listener (and its network namespace) behind.
The engine knows the agent by the listener a connection arrives on, never by anything the agent sends.

An agent with no `egress` block gets no listener: its network namespace stays empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from faramesh.engine.egress import EgressConfigError
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.proxy_host import ProxyError, ProxyHost

MAX_INTAKE_MESSAGE = 4096
STATS_INTERVAL = 2.0
_PEERCRED = struct.Struct("3i")

RecordSink = Callable[[dict[str, Any]], Awaitable[None]]


def egress_blocks(policy: CompiledPolicy) -> dict[str, dict[str, Any]]:
    return {aid: dict(a.settings["egress"]) for aid, a in policy.agents.items() if a.settings.get("egress") is not None}


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """A proxy event → the DPR fields (the caller adds id, time, policy version, dev)."""
    effect = "DENY" if event.get("effect") == "deny" else "PERMIT"
    record = {
        "action_type": "egress",
        "tier": "proxy",
        "agent_id": event.get("agent_id"),
        "effect": effect,
        "code": "EGRESS_DENIED" if effect == "DENY" else "EGRESS_PERMITTED",
        "reason_code": event.get("reason_code"),
        "reason": event.get("reason"),
    }
    for key in ("host", "port", "address", "rule", "method", "outcome", "requests", "bytes_up", "bytes_down",
                "started_ms", "ended_ms", "count", "aggregated", "credentials"):
        record[key] = event.get(key)
    return record


class EgressService:
    def __init__(
        self,
        intake_path: Path,
        record: RecordSink,
        *,
        log: Callable[[str], None],
        proxy: ProxyHost | None = None,
    ) -> None:
        self.intake_path = intake_path
        self.record = record
        self.log = log
        self.proxy = proxy or ProxyHost(self._on_event, log=lambda line: log(f"egress proxy: {line}"))
        if proxy is not None:
            proxy.on_event = self._on_event
        self._intake: socket.socket | None = None
        self._conns: dict[int, tuple[socket.socket, list[int]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats: dict[str, Any] = {}
        self._stats_task: asyncio.Task[None] | None = None
        self.handed_over = 0
        self.refused_handovers = 0
        self.dropped_records = 0

    # --- lifecycle --------------------------------------------------------------------------------------
    async def start(self, policy: CompiledPolicy) -> None:
        try:
            await self.proxy.start()
        except ProxyError as exc:  # it keeps retrying; until then listeners queue nothing and agents get no egress
            self.log(f"the egress proxy did not start ({exc}); it is retried in the background")
        await self.apply_policy(policy, previous=None)
        self._bind()
        self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats())

    async def apply_policy(self, policy: CompiledPolicy, previous: CompiledPolicy | None) -> None:
        """Rules for every agent with an egress block; agents that lost theirs are forgotten (their listeners
        closed: the sandbox keeps an empty network)."""
        blocks = egress_blocks(policy)
        for agent_id, block in blocks.items():
            try:
                await self.proxy.set_rules(agent_id, block)
            except (EgressConfigError, ValueError) as exc:
                self.log(f'agent "{agent_id}": egress rules refused by the proxy: {exc}')
            except ProxyError as exc:
                self.log(f'agent "{agent_id}": egress rules not delivered yet ({exc}); re-sent when the proxy is up')
        gone = set(egress_blocks(previous)) - set(blocks) if previous is not None else set()
        for agent_id in sorted(gone):
            with contextlib.suppress(ProxyError):
                await self.proxy.forget_agent(agent_id)

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        loop = asyncio.get_running_loop()
        if self._intake is not None:
            loop.remove_reader(self._intake.fileno())
            self._intake.close()
            self._intake = None
            with contextlib.suppress(FileNotFoundError):
                self.intake_path.unlink()
        for fd, (conn, _) in list(self._conns.items()):
            loop.remove_reader(fd)
            conn.close()
        self._conns.clear()
        await self.proxy.close()

    def status(self) -> dict[str, Any]:
        """The host's view (running, pid, restarts, listeners) and the child's last counters (open
        connections, and per agent: refusals, permits, bytes), refreshed every STATS_INTERVAL."""
        host = self.proxy.status()
        return {
            **host,
            "agents_with_rules": host.pop("agents", 0),
            "open_connections": self._stats.get("open_connections", 0),
            "agents": self._stats.get("agents", {}),
            "events_suppressed": self._stats.get("events_suppressed", 0),
            "intake": str(self.intake_path),
            "handed_over": self.handed_over,
            "refused_handovers": self.refused_handovers,
            "dropped_records": self.dropped_records,
        }

    # --- intake -----------------------------------------------------------------------------------------
    def _bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.intake_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.intake_path))
        finally:
            os.umask(old)
        sock.listen(64)
        self._intake = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._intake is not None
        try:
            conn, _ = self._intake.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, os.geteuid()):
            self.refused_handovers += 1
            self.log(f"egress intake: refused a connection from uid {uid}")
            conn.close()
            return
        self._conns[conn.fileno()] = (conn, [])
        asyncio.get_running_loop().add_reader(conn.fileno(), self._readable, conn)

    def _readable(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_INTAKE_MESSAGE, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:  # the launch ended (C1 exited): its listeners go
            for fd in fds:
                os.close(fd)
            self._drop(conn)
            return
        task = asyncio.get_running_loop().create_task(self._adopt(conn, data, fds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        reply: dict[str, Any]
        try:
            message = orjson.loads(data)
            agent_id = message.get("agent_id") if isinstance(message, dict) else None
            if len(fds) != 1 or not isinstance(agent_id, str):
                raise ValueError("a hand-over is {\"agent_id\": …} with exactly one listening socket")
            if agent_id not in self.proxy.rules:
                raise ValueError(f'agent "{agent_id}" has no egress rules: its sandbox keeps an empty network')
            listener_id = await self.proxy.add_listener(agent_id, fds[0])
        except (ValueError, orjson.JSONDecodeError, ProxyError) as exc:
            self.refused_handovers += 1
            reply = {"error": str(exc)[:300]}
        else:
            entry = self._conns.get(conn.fileno())
            if entry is None or entry[0] is not conn:  # the launch ended meanwhile
                with contextlib.suppress(ProxyError):
                    await self.proxy.remove_listener(listener_id)
                return
            entry[1].append(listener_id)
            self.handed_over += 1
            reply = {"ok": True, "listener_id": listener_id}
        finally:
            for fd in fds:
                os.close(fd)  # the proxy host keeps its own duplicate
        with contextlib.suppress(OSError):
            conn.send(orjson.dumps(reply))

    def _drop(self, conn: socket.socket) -> None:
        entry = self._conns.pop(conn.fileno(), None)
        asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()
        if entry is None:
            return
        for listener_id in entry[1]:
            task = asyncio.get_running_loop().create_task(self._remove(listener_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _remove(self, listener_id: int) -> None:
        with contextlib.suppress(ProxyError):
            await self.proxy.remove_listener(listener_id)

    # --- events and stats -------------------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._record(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, event: dict[str, Any]) -> None:
        try:
            await self.record(event_record(event))
        except Exception as exc:  # any failure of the sink: the connection already happened; count, say so
            self.dropped_records += 1
            self.log(f"an egress event could not be recorded: {type(exc).__name__}: {exc}")

    async def _refresh_stats(self) -> None:
        while True:
            with contextlib.suppress(ProxyError):
                self._stats = await self.proxy.stats()
            await asyncio.sleep(STATS_INTERVAL)
