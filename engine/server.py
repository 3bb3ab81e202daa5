"""The engine daemon: asyncio Unix-socket server, lifecycle, framing bounds, WAL-first replies.

Lifecycle STARTING → INITIALIZING → READY → DRAINING → HALT. Sockets are bound at STARTING so a
client gets DAEMON_NOT_READY (never a permit) until the WAL is open, verified and replayed.
Authorization is by which socket a peer reached (DESIGN.md §2): an agent socket fixes the agent id
and accepts only agent verbs; the operator socket accepts every verb; in dev one socket serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from faramesh.engine.pipeline import EngineState, Peer
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.protocol import (
    AGENT_VERBS,
    MAX_FRAME,
    Message,
    ProtocolError,
    decode,
    encode_error,
    encode_result,
)
from faramesh.engine.wal.log import Wal, decode_body, new_ulid, rfc3339
from faramesh.engine.wal.store import StoreError
from faramesh.engine.wal.verify import verify_chain

IDLE_PARTIAL_LINE_S = 10.0
MAX_TOTAL_BUFFERED = 64 * 1024 * 1024
READ_CHUNK = 65536
STARTING, INITIALIZING, READY, DRAINING, HALT = "STARTING", "INITIALIZING", "READY", "DRAINING", "HALT"


@dataclass(frozen=True)
class SocketSpec:
    path: Path
    role: str  # agent | operator | dev
    agent_id: str | None = None
    mode: int = 0o600
    gid: int | None = None


@dataclass
class ServerConfig:
    sockets: list[SocketSpec]
    dev: bool = False
    cold_start_deny_window: float = 30.0
    pretty_dprs: bool = False
    wal_description: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    stack_dir: str | None = None


class ChainBroken(Exception):
    code = "WAL_CHAIN_BROKEN"


class EngineServer:
    def __init__(
        self,
        policy: CompiledPolicy,
        wal: Wal,
        state: EngineState,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.time,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
        random_bytes: Callable[[int], bytes] = os.urandom,
        policy_loader: Callable[[str], CompiledPolicy] | None = None,
    ) -> None:
        self.policy = policy
        self.wal = wal
        self.state = state
        self.config = config
        self.clock = clock
        self.clock_ns = clock_ns
        self.random_bytes = random_bytes
        self.policy_loader = policy_loader
        self.lifecycle = STARTING
        self.started_at = clock()
        self.applied_at = rfc3339(self.started_at)
        self.buffered = 0
        self.connections: set[asyncio.StreamWriter] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.exit_code = 0

    # ---- lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        await self._bind()
        self.lifecycle = INITIALIZING
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self._initialise), self.config.cold_start_deny_window)
        except TimeoutError:
            self._log(f"engine not READY within cold_start_deny_window ({self.config.cold_start_deny_window}s): HALT")
            self.lifecycle = HALT
            await self._close_sockets()
            return 4
        except (ChainBroken, StoreError) as exc:
            self._log(f"refusing to start: {exc}")
            self.lifecycle = HALT
            await self._close_sockets()
            return 1
        self.wal.start()
        self.lifecycle = READY
        self._log(f"READY: policy {self.policy.version[:16]}, WAL {self.wal.store.description}")
        await self._stop.wait()
        await self.drain()
        return self.exit_code

    def _initialise(self) -> None:
        """Open the WAL, verify from the last checkpoint, replay state, sign any unsigned tail."""
        self.wal.open()
        checkpoints = self.wal.store.checkpoints()
        start_seq, prev = 1, None
        if checkpoints:
            last = checkpoints[-1]
            start_seq, prev = last.seq + 1, last.head_hash
        report = verify_chain(
            self.wal.chain_id, self.wal.store.records(start_seq), [], start_seq=start_seq, start_prev_hash=prev
        )
        if not report.ok:
            raise ChainBroken(
                f"WAL chain broken at seq {report.offender_seq} (record {report.offender_id}): {report.problem}"
            )
        now = self.clock()
        recent = (decode_body(r.body) for r in self.wal.store.records(max(1, self.wal.seq - 200_000)))
        self.state.replay(recent, self.wal.store.approvals(), now)
        if self.wal.recovery_checkpoint_needed():
            self.wal.write_checkpoint_sync("recovery")

    async def drain(self) -> None:
        if self.lifecycle in (DRAINING, HALT):
            return
        self.lifecycle = DRAINING
        for server in self._servers:
            server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 10)
        await self.wal.close()
        await self._close_sockets()
        self.lifecycle = HALT
        self._log("drained; HALT")

    async def _close_sockets(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self.connections):
            writer.close()
        for spec in self.config.sockets:
            with contextlib.suppress(FileNotFoundError):
                spec.path.unlink()

    async def _bind(self) -> None:
        for spec in self.config.sockets:
            ensure_private_dir(spec.path.parent, 0o755 if spec.role == "agent" else 0o700)
            with contextlib.suppress(FileNotFoundError):
                spec.path.unlink()
            old_umask = os.umask(0o177)
            try:
                server = await asyncio.start_unix_server(self._handler_for(spec), path=str(spec.path), limit=MAX_FRAME)
            finally:
                os.umask(old_umask)
            os.chmod(spec.path, spec.mode)
            if spec.gid is not None:
                os.chown(spec.path, -1, spec.gid)
            self._servers.append(server)

    def _handler_for(self, spec: SocketSpec) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._handle(reader, writer, spec)

        return handler

    def _log(self, message: str) -> None:
        sys.stderr.write(f"faramesh engine: {message}\n")
        sys.stderr.flush()

    # ---- connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: SocketSpec) -> None:
        uid, pid = _peer_credentials(writer)
        peer = Peer(spec.role, spec.agent_id, uid, pid, str(spec.path))
        self.connections.add(writer)
        buf = bytearray()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(READ_CHUNK), IDLE_PARTIAL_LINE_S if buf else None)
                except TimeoutError:
                    break  # a stalled half line: close rather than hold its memory
                if not chunk:
                    break
                if self.buffered + len(chunk) > MAX_TOTAL_BUFFERED:
                    writer.write(encode_error("FRAME_TOO_LARGE", "engine input buffers are full; reconnect later"))
                    break
                buf += chunk
                self.buffered += len(chunk)
                while True:
                    newline = buf.find(b"\n")
                    if newline < 0:
                        break
                    line = bytes(buf[:newline])
                    del buf[: newline + 1]
                    self.buffered -= newline + 1
                    if line.strip():
                        writer.write(await self._dispatch(line, peer))
                        await writer.drain()
                if len(buf) >= MAX_FRAME:
                    writer.write(
                        encode_error("FRAME_TOO_LARGE", f"a request line reached {MAX_FRAME} bytes without a newline")
                    )
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.buffered -= len(buf)
            self.connections.discard(writer)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await writer.drain()
            writer.close()

    async def _dispatch(self, line: bytes, peer: Peer) -> bytes:
        try:
            message = decode(line)
        except ProtocolError as exc:
            return encode_error(exc.code, exc.message, rpc=exc.rpc, rpc_id=exc.rpc_id)
        if self.lifecycle != READY:
            return encode_error(
                "DAEMON_NOT_READY", f"the engine is {self.lifecycle}", rpc=message.rpc, rpc_id=message.rpc_id
            )
        if peer.role == "agent" and message.verb not in AGENT_VERBS:
            return encode_error(
                "INVALID_REQUEST", f"`{message.verb}` is an operator verb; it is not accepted on an agent socket",
                rpc=message.rpc, rpc_id=message.rpc_id,
            )  # fmt: skip
        self._inflight += 1
        self._idle.clear()
        try:
            handler = getattr(self, f"_verb_{message.verb}")
            result: dict[str, Any] = await handler(message, peer)
            return encode_result(message, result)
        except _VerbError as exc:
            return encode_error(exc.code, exc.message, rpc=message.rpc, rpc_id=message.rpc_id)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _ids(self) -> tuple[float, str, str]:
        now = self.clock()
        return now, new_ulid(now, self.random_bytes), rfc3339(now)

    # ---- verbs
    async def _verb_govern(self, message: Message, peer: Peer) -> dict[str, Any]:
        started = self.clock_ns()
        now, _, timestamp = self._ids()
        self.state.expire_reservations(now)
        verdict = self.state.govern(
            message.fields,
            peer,
            now=now,
            new_id=lambda: new_ulid(now, self.random_bytes),
            timestamp=timestamp,
            started_ns=started,
            clock_ns=self.clock_ns,
        )
        verdict.record["epoch_ms"] = int(now * 1000)
        try:
            await self.wal.append(verdict.record, verdict.args_bytes, verdict.approval_writes)
        except StoreError:
            # WAL-first: a decision that is not on disk was never made.
            return {
                "call_id": message.fields.get("call_id"),
                "effect": "DENY",
                "action_id": None,
                "latency_us": (self.clock_ns() - started) // 1000,
                "structured_denial": {
                    "code": "WAL_WRITE_FAILURE",
                    "rule_ref": None,
                    "human_message": "the decision could not be recorded, so the call is denied",
                    "resolution": {"type": "retry_after"},
                },
            }
        if self.config.pretty_dprs:
            sys.stderr.write(
                orjson.dumps(verdict.record, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
            )
        return verdict.reply

    async def _verb_poll_defer(self, message: Message, peer: Peer) -> dict[str, Any]:
        approval = self.state.approvals.get(message.fields["defer_token"])
        if approval is None or (peer.role == "agent" and approval.agent_id != peer.agent_id):
            raise _VerbError("INVALID_REQUEST", "unknown defer token")  # never reveal other agents' tokens
        status = approval.effective_status(self.clock())
        shown = {"PENDING": "pending", "APPROVED": "approved", "USED": "approved", "DENIED": "denied"}.get(
            status, "expired"
        )
        out: dict[str, Any] = {"status": shown, "approval_id": approval.id}
        if shown == "denied" and approval.reason:
            out["reason"] = approval.reason
        return out

    async def _verb_complete(self, message: Message, peer: Peer) -> dict[str, Any]:
        from faramesh.engine.policy.limits import estimate_cost_cents

        action_id = message.fields["action_id"]
        reservation = self.state.reservations.get(action_id)
        if reservation is None or (peer.role == "agent" and reservation.agent_id != peer.agent_id):
            raise _VerbError("INVALID_REQUEST", "unknown or already settled action_id")
        usage = message.fields.get("usage") or {}
        actual = usage.get("cost_cents")
        if type(actual) is not int or actual < 0:
            model_args = {
                "model": usage.get("model"),
                "input_tokens": usage.get("input_tokens"),
                "max_tokens": usage.get("output_tokens"),
            }
            actual = estimate_cost_cents(model_args, reservation.cents)
        now, record_id, timestamp = self._ids()
        delta = actual
        self.state.settle(action_id, actual, now)
        record = {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "settlement",
            "agent_id": reservation.agent_id,
            "settles": action_id,
            "cost_delta_cents": delta,
            "dev": self.state.dev,
        }
        try:
            await self.wal.append(record)
        except StoreError as exc:
            raise _VerbError("WAL_WRITE_FAILURE", "the settlement could not be recorded") from exc
        return {"action_id": action_id, "settled_cents": actual}

    async def _verb_status(self, message: Message, peer: Peer) -> dict[str, Any]:
        return self.status()

    async def _verb_approvals_list(self, message: Message, peer: Peer) -> dict[str, Any]:
        now = self.clock()
        everything = bool(message.fields.get("all"))
        items = [
            a.public(now) for a in self.state.approvals.values() if everything or a.effective_status(now) == "PENDING"
        ]
        items.sort(key=lambda a: str(a["created_at"]))
        return {"approvals": items}

    async def _verb_approve(self, message: Message, peer: Peer) -> dict[str, Any]:
        return await self._resolve(message, peer, approve=True)

    async def _verb_deny(self, message: Message, peer: Peer) -> dict[str, Any]:
        return await self._resolve(message, peer, approve=False)

    async def _resolve(self, message: Message, peer: Peer, *, approve: bool) -> dict[str, Any]:
        now, record_id, timestamp = self._ids()
        approver = message.fields.get("approver")
        who = f"uid:{peer.uid}" + (f" ({approver})" if isinstance(approver, str) and approver else "")
        try:
            approval = self.state.resolve_approval(
                message.fields["approval_id"], approve, who, message.fields.get("reason"), now, timestamp
            )
        except KeyError:
            raise _VerbError("NOT_FOUND", f"no approval {message.fields['approval_id']}") from None
        except ValueError as exc:
            raise _VerbError("APPROVAL_NOT_PENDING", str(exc)) from None
        record = {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "approval_resolved",
            "agent_id": approval.agent_id,
            "tool": approval.tool,
            "approval_id": approval.id,
            "effect": "PERMIT" if approve else "DENY",
            "code": "APPROVED" if approve else "OPERATOR_DENIED",
            "approver": who,
            "identity": {"method": "socket", "role": peer.role, "peer_uid": peer.uid, "peer_pid": peer.pid},
            "dev": self.state.dev,
        }
        try:
            await self.wal.append(record, None, [approval.to_row()])
        except StoreError as exc:
            approval.status = "PENDING"  # not recorded, not resolved
            raise _VerbError("WAL_WRITE_FAILURE", "the resolution could not be recorded") from exc
        return {"approval": approval.public(now)}

    async def _verb_reload(self, message: Message, peer: Peer) -> dict[str, Any]:
        version = message.fields.get("policy_version")
        if self.policy_loader is None or type(version) is not str:
            raise _VerbError("INVALID_REQUEST", "reload needs the policy_version `apply` installed")
        try:
            policy = self.policy_loader(version)
        except Exception as exc:
            raise _VerbError("RELOAD_REFUSED", f"the running policy stays: {exc}") from None
        self.policy = policy
        self.state.policy = policy
        self.applied_at = rfc3339(self.clock())
        return {"policy_version": policy.version}

    async def _verb_shutdown(self, message: Message, peer: Peer) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self._stop.set)
        return {"state": DRAINING}

    def status(self) -> dict[str, Any]:
        now = self.clock()
        pending = self.state.pending_approvals(now)
        oldest = None
        if pending:
            from datetime import datetime

            first = min(a.created_at for a in pending)
            oldest = int(
                now
                - datetime.strptime(first, "%Y-%m-%dT%H:%M:%S.%fZ")
                .replace(tzinfo=__import__("datetime").UTC)
                .timestamp()
            )
        degraded = self.wal.failures > 0
        budgets = []
        for (agent_id, name), usage in sorted(self.state.budgets.items()):
            budget = (
                next((b for b in self.policy.agents[agent_id].budgets if b.name == name), None)
                if agent_id in self.policy.agents
                else None
            )
            budgets.append(
                {
                    "agent_id": agent_id,
                    "name": name,
                    "spent_cents": usage.spent_cents,
                    "reserved_cents": usage.reserved_cents,
                    "calls": usage.calls,
                    "max_cents": budget.max_cents if budget else None,
                    "max_calls": budget.max_calls if budget else None,
                }
            )
        return {
            "daemon": {
                "state": self.lifecycle,
                "degraded": degraded,
                "last_error": self.wal.last_error,
                "pid": os.getpid(),
                "uptime_seconds": int(now - self.started_at),
                "socket": str(self.config.sockets[0].path) if self.config.sockets else None,
                "sockets": [{"path": str(s.path), "role": s.role, "agent_id": s.agent_id} for s in self.config.sockets],
                "policy_version": self.policy.version,
                "applied_at": self.applied_at,
                "mode": self.state.mode,
                "dev": self.config.dev,
                "os_tier": bool(self.policy.runtime.get("os_tier", False)),
                "wal": {**self.config.wal_description, "seq": self.wal.seq, "signed_through": self.wal.signed_seq},
                "logs": self.config.logs,
            },
            "providers": [],
            "budgets": budgets,
            "approvals": {"pending": len(pending), "oldest_age_seconds": oldest},
        }


class _VerbError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None]:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return uid, pid


def ensure_private_dir(path: Path, mode: int) -> None:
    """Create `path` (and parents) owned by us; refuse a path another user controls or a symlink."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.geteuid()}; refusing to use it")
    os.chmod(path, mode)
