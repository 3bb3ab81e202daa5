"""The agent client (engine/client.py) against a real `faramesh dev` engine and against fake engines.

Real engine: each test that needs one starts `faramesh dev` on a small stack in tmp_path, with
FARAMESH_RUNTIME_DIR / FARAMESH_STATE_DIR in tmp_path, waits for READY and stops it (SIGTERM, exit 0).
Operator actions (approve, deny) go over the same dev socket, as the operator verbs.

Fake engines: a tiny Unix-socket server in a thread answering garbage, a mismatched call_id, nothing,
half a line, DAEMON_NOT_READY…: every such answer raises EngineUnavailable and the governed function
never runs. The client is also imported in a bare interpreter (`-I -S`, empty environment) from a lone
copy named faramesh_client.py, to prove it needs nothing but the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faramesh.engine import client as fc

REPO = Path(__file__).resolve().parent.parent
CLIENT_SOURCE = REPO / "engine" / "client.py"
EXAMPLE = REPO / "examples" / "support-bot"
FARAMESH = Path(sys.executable).with_name("faramesh")

STACK = """\
agent "support-bot" {
  default deny
  rules {
    permit knowledgebase/search
    permit refund if amount < $25
    defer refund if amount < $500
    deny refund reason "refunds of $500 or more go through finance"
    deny shell/* reason "no shell access"
  }
  rate_limit "refund": 1000 per minute
  budget daily { max $1000 on_exceed defer }
}
"""


# --------------------------------------------------------------------------------------------- fixtures


def _cli() -> list[str]:
    return [str(FARAMESH)] if FARAMESH.exists() else [sys.executable, "-m", "faramesh.launchers.main"]


class DevEngine:
    """`faramesh dev` as a subprocess; start() may be called again after stop()/kill() and serves
    the same socket path (same stack, same runtime dir)."""

    def __init__(self, root: Path) -> None:
        self.stack = root / "stack"
        self.stack.mkdir()
        (self.stack / "governance.fms").write_text(STACK)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_")}
        self.env["FARAMESH_RUNTIME_DIR"] = str(root / "run")
        self.env["FARAMESH_STATE_DIR"] = str(root / "state")
        self.log = root / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = ""

    def start(self) -> str:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*_cli(), "dev", "--dir", str(self.stack)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        pattern = re.compile(r"export FARAMESH_SOCKET=(\S+)")
        while True:
            assert self.proc.poll() is None, f"faramesh dev exited {self.proc.returncode}:\n{self.log.read_text()}"
            found = pattern.findall(self.log.read_text(errors="replace"))
            if found and os.path.exists(found[-1]):
                break
            assert time.monotonic() < deadline, f"no socket announced:\n{self.log.read_text()}"
            time.sleep(0.02)
        self.socket = found[-1]
        with fc.Client(self.socket) as probe:
            probe.wait_ready(timeout=20)
        return self.socket

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def operator(self, message: dict[str, Any]) -> dict[str, Any]:
        """One operator request on the dev socket (which serves both roles in dev)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.socket)
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, "the engine closed the operator connection"
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply

    def pending(self) -> list[dict[str, Any]]:
        approvals: list[dict[str, Any]] = self.operator({"type": "approvals_list"})["approvals"]
        return approvals

    def resolve_when_pending(self, verb: str, reason: str | None = None, timeout: float = 10) -> threading.Thread:
        """In a thread: wait for one pending approval, then approve or deny it."""

        def work() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pending = self.pending()
                if pending:
                    message: dict[str, Any] = {"type": verb, "approval_id": pending[0]["id"], "approver": "alice"}
                    if reason:
                        message["reason"] = reason
                    reply = self.operator(message)
                    assert "approval" in reply, reply
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread

    def dprs(self) -> list[dict[str, Any]]:
        records, block = [], None
        for line in self.log.read_text(errors="replace").splitlines():
            if line == "{":
                block = [line]
            elif block is not None:
                block.append(line)
                if line == "}":
                    records.append(json.loads("\n".join(block)))
                    block = None
        return records


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[DevEngine]:
    dev = DevEngine(tmp_path)
    dev.start()
    yield dev
    if dev.proc is not None and dev.proc.poll() is None:
        assert dev.stop() == 0, dev.log.read_text()


@pytest.fixture
def client(engine: DevEngine) -> Iterator[fc.Client]:
    with fc.Client(engine.socket, agent_id="support-bot", timeout=5, poll_interval=0.05) as c:
        yield c


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FARAMESH_SOCKET", "FARAMESH_SOCKET_FD", "FARAMESH_AGENT_ID", "FARAMESH_SESSION_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for fake-engine sockets (sun_path is 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fmc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------- mapping


def test_permit_defer_deny_mapping(client: fc.Client) -> None:
    permit = client.govern("knowledgebase/search", {"query": "reset password"}, call_id="call-1")
    assert isinstance(permit, fc.Permit)
    assert permit.effect == "PERMIT" and permit.tool == "knowledgebase/search" and permit.call_id == "call-1"
    assert re.fullmatch(r"[0-9A-Z]{26}", permit.action_id)
    assert isinstance(permit.latency_us, int) and permit.latency_us >= 0
    assert permit.round_trip_us is not None and permit.round_trip_us >= permit.latency_us
    assert permit.credential is None

    with pytest.raises(fc.ToolDenied) as deferred:
        client.govern("refund", {"amount": 100})
    d = deferred.value
    assert not isinstance(d, fc.EngineUnavailable)
    assert (d.effect, d.code) == ("DEFER", "POLICY_DEFER")
    assert d.rule_ref == "governance.fms:6"
    assert d.resolution["type"] == "pending_approval"
    assert d.approval_id is not None and d.approval_id.startswith("apr-")
    assert d.resolution["approval_id"] == d.approval_id
    assert d.action_id and d.action_id != permit.action_id
    assert d.tool == "refund"

    with pytest.raises(fc.ToolDenied) as denied:
        client.govern("refund", {"amount": 1000})
    e = denied.value
    assert (e.effect, e.code, e.rule_ref) == ("DENY", "POLICY_DENY", "governance.fms:7")
    assert e.human_message == "refunds of $500 or more go through finance"
    assert e.resolution == {"type": "rule_block"}
    assert e.approval_id is None and e.action_id
    assert str(e) == "refund: POLICY_DENY: refunds of $500 or more go through finance (governance.fms:7)"

    restored = pickle.loads(pickle.dumps(e))
    assert type(restored) is fc.ToolDenied and restored.__dict__ == e.__dict__ and str(restored) == str(e)

    with pytest.raises(fc.ToolDenied) as shell:
        client.govern("shell/exec", {"cmd": "id"})
    assert shell.value.human_message == "no shell access"

    with pytest.raises(fc.ToolDenied) as unknown:
        client.govern("email/send", {})
    assert unknown.value.code == "POLICY_DENY" and "default deny" in unknown.value.human_message


def test_identity_and_invalid_requests_are_denials_not_outages(client: fc.Client, engine: DevEngine) -> None:
    # the dev socket needs an agent id: without one the engine denies (a decision, recorded)
    with fc.Client(engine.socket, timeout=5) as anonymous, pytest.raises(fc.ToolDenied) as exc:
        anonymous.govern("knowledgebase/search", {"query": "x"})
    assert exc.value.code == "INVALID_REQUEST" and not isinstance(exc.value, fc.EngineUnavailable)
    # an error envelope (tool id too long) is a refusal; the connection stays usable
    with pytest.raises(fc.ToolDenied) as envelope:
        client.govern("x" * 300, {})
    assert envelope.value.code == "INVALID_REQUEST" and not isinstance(envelope.value, fc.EngineUnavailable)
    assert client.govern("knowledgebase/search", {"query": "still fine"}).effect == "PERMIT"


def test_args_that_are_not_json_are_refused_locally(client: fc.Client) -> None:
    ran = []

    @fc.governed("knowledgebase/search", client=client)
    def search(query: Any) -> None:
        ran.append(query)

    for bad in (object(), float("nan"), {"k": {1, 2}}, "\udcff"):
        with pytest.raises(fc.ToolDenied) as exc:
            search(bad)
        assert exc.value.code == "INVALID_REQUEST"
    assert ran == []


# --------------------------------------------------------------------------------------------- defer


def test_block_mode_waits_for_operator_approval(client: fc.Client, engine: DevEngine) -> None:
    approver = engine.resolve_when_pending("approve")
    started = time.monotonic()
    permit = client.govern("refund", {"amount": 120}, call_id="refund-120", on_defer="block", defer_timeout=15)
    approver.join(5)
    assert permit.effect == "PERMIT" and permit.call_id == "refund-120"
    assert time.monotonic() - started < 10
    # the retry's DPR names the approver and the approval
    record = next(r for r in engine.dprs() if r.get("id") == permit.action_id)
    assert record["code"] == "APPROVED" and record["approver"] == f"uid:{os.getuid()} (alice)"
    assert record["approval_id"].startswith("apr-") and record["call_id"] == "refund-120"
    # approved once: the same call defers again afterwards
    with pytest.raises(fc.ToolDenied) as again:
        client.govern("refund", {"amount": 120})
    assert again.value.effect == "DEFER" and again.value.approval_id != record["approval_id"]


def test_block_mode_operator_deny_raises_with_reason(client: fc.Client, engine: DevEngine) -> None:
    engine.resolve_when_pending("deny", reason="not on a Friday")
    with pytest.raises(fc.ToolDenied) as exc:
        client.govern("refund", {"amount": 130}, on_defer="block", defer_timeout=15)
    e = exc.value
    assert (e.effect, e.code, e.human_message) == ("DENY", "POLICY_DENY", "not on a Friday")
    assert e.approval_id is not None and e.approval_id.startswith("apr-") and e.action_id
    assert e.rule_ref == "governance.fms:6"


def test_raise_mode_retry_after_operator_deny_carries_reason(client: fc.Client, engine: DevEngine) -> None:
    with pytest.raises(fc.ToolDenied) as first:
        client.govern("refund", {"amount": 140})
    token = first.value.approval_id
    assert token is not None
    assert client.poll_defer(token) == fc.DeferStatus("pending", token)
    engine.operator({"type": "deny", "approval_id": token, "reason": "customer already refunded"})
    status = client.poll_defer(token)
    assert (status.status, status.reason) == ("denied", "customer already refunded")
    with pytest.raises(fc.ToolDenied) as retry:
        client.govern("refund", {"amount": 140})
    assert (retry.value.effect, retry.value.code) == ("DENY", "POLICY_DENY")
    assert retry.value.human_message == "customer already refunded"
    with pytest.raises(fc.EngineError) as unknown:
        client.poll_defer("apr-00000000000000000000000000")
    assert unknown.value.code == "INVALID_REQUEST"


def test_block_mode_times_out_with_policy_defer(client: fc.Client) -> None:
    started = time.monotonic()
    with pytest.raises(fc.ToolDenied) as exc:
        client.govern("refund", {"amount": 150}, on_defer="block", defer_timeout=0.4)
    assert 0.3 < time.monotonic() - started < 3
    e = exc.value
    assert (e.effect, e.code) == ("DEFER", "POLICY_DEFER") and not isinstance(e, fc.EngineUnavailable)
    assert e.approval_id and "within 0.4s" in e.human_message
    with pytest.raises(ValueError):
        client.govern("refund", {"amount": 150}, on_defer="wait")


def test_complete_settles_a_permit(client: fc.Client) -> None:
    permit = client.govern("knowledgebase/search", {"query": "billing"})
    assert client.complete(permit.action_id, {"cost_cents": 7}) == {"action_id": permit.action_id, "settled_cents": 7}
    with pytest.raises(fc.EngineError) as again:
        client.complete(permit.action_id, {"cost_cents": 7})
    assert again.value.code == "INVALID_REQUEST"
    assert client.status()["daemon"]["state"] == "READY"


# --------------------------------------------------------------------------------------------- decorator


def test_decorator_runs_only_after_a_permit(client: fc.Client) -> None:
    ran: list[int] = []

    @fc.governed("refund", client=client)
    def refund(amount: int, currency: str = "usd") -> str:
        ran.append(amount)
        return f"refunded {amount} {currency}"

    assert refund(10) == "refunded 10 usd"
    with pytest.raises(fc.ToolDenied) as deferred:
        refund(amount=200)
    assert deferred.value.effect == "DEFER"
    with pytest.raises(fc.ToolDenied):
        refund(5000, currency="eur")
    assert ran == [10]
    assert refund.faramesh_tool == "refund"  # type: ignore[attr-defined]
    assert refund.__name__ == "refund"

    @client.governed("knowledgebase/search", pass_permit=True)
    def search(query: str, *, permit: fc.Permit) -> str:
        return permit.action_id

    action_id = search("x")  # type: ignore[call-arg]  # the decorator supplies `permit`
    assert re.fullmatch(r"[0-9A-Z]{26}", action_id)
    with pytest.raises(TypeError):
        fc.governed("x", pass_permit=True)(lambda query: query)


class _FakeEngine:
    """A tiny engine impostor: `respond(request)` → (bytes to send, close the connection after?)."""

    def __init__(self, path: Path, respond: Callable[[dict[str, Any]], tuple[bytes, bool]]) -> None:
        self.path = str(path)
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(16)
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            for line in conn.makefile("rb"):
                request = json.loads(line)
                self.requests.append(request)
                data, close = self.respond(request)
                if data:
                    conn.sendall(data)
                if close:
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        self.server.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


def _permit_echo(request: dict[str, Any]) -> tuple[bytes, bool]:
    if request.get("type") != "govern":
        return json.dumps({"status": "pending"}).encode() + b"\n", False
    reply = {"call_id": request["call_id"], "effect": "PERMIT", "action_id": "01FAKE", "latency_us": 3}
    return json.dumps(reply).encode() + b"\n", False


@pytest.fixture
def fake(short_dir: Path) -> Iterator[Callable[[Callable[[dict[str, Any]], tuple[bytes, bool]]], _FakeEngine]]:
    made: list[_FakeEngine] = []

    def make(respond: Callable[[dict[str, Any]], tuple[bytes, bool]]) -> _FakeEngine:
        server = _FakeEngine(short_dir / f"e{len(made)}.sock", respond)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_decorator_maps_call_arguments_to_tool_args(fake: Any) -> None:
    server = fake(_permit_echo)
    c = fc.Client(server.path, agent_id="support-bot", session_id="s-1")

    @c.governed("refund")
    def refund(amount: int, card: dict[str, str] | None = None, *notes: str, **extra: Any) -> int:
        return amount

    class Desk:
        @c.governed("ticket/read")
        def read(self, ticket: int) -> int:
            return ticket

    assert refund(10, {"last4": "4242"}, "a", "b", reason="late") == 10
    assert Desk().read(42) == 42
    first, second = server.requests
    assert first == {
        "type": "govern",
        "v": 1,
        "call_id": first["call_id"],
        "agent_id": "support-bot",
        "session_id": "s-1",
        "tool_id": "refund",
        "args": {"amount": 10, "card": {"last4": "4242"}, "notes": ["a", "b"], "reason": "late"},
    }
    assert second["tool_id"] == "ticket/read" and second["args"] == {"ticket": 42}
    assert len({first["call_id"], second["call_id"]}) == 2
    assert server.connections == 1  # one connection, reused


# --------------------------------------------------------------------------------------------- asyncio


def test_async_client(engine: DevEngine) -> None:
    async def main() -> None:
        async with fc.AsyncClient(engine.socket, agent_id="support-bot", timeout=5, poll_interval=0.05) as c:
            permit = await c.govern("knowledgebase/search", {"query": "x"})
            assert permit.effect == "PERMIT"
            with pytest.raises(fc.ToolDenied) as denied:
                await c.govern("refund", {"amount": 900})
            assert denied.value.human_message == "refunds of $500 or more go through finance"
            with pytest.raises(fc.ToolDenied) as deferred:
                await c.govern("refund", {"amount": 160})
            token = deferred.value.approval_id
            assert token is not None and (await c.poll_defer(token)).status == "pending"
            # block mode with the approval arriving from another thread
            engine.resolve_when_pending("approve")
            approved = await c.govern("refund", {"amount": 160}, on_defer="block", defer_timeout=15)
            assert approved.effect == "PERMIT"
            assert (await c.complete(approved.action_id, {"cost_cents": 1}))["settled_cents"] == 1
            # many tasks share one connection; each gets its own answer
            results = await asyncio.gather(
                *(c.govern("knowledgebase/search", {"query": str(i)}, call_id=f"t{i}") for i in range(40))
            )
            assert [r.call_id for r in results] == [f"t{i}" for i in range(40)]

            ran: list[int] = []

            @c.governed("refund")
            async def refund(amount: int) -> int:
                ran.append(amount)
                return amount

            assert await refund(12) == 12
            with pytest.raises(fc.ToolDenied):
                await refund(2000)
            assert ran == [12]
            assert (await c.status())["daemon"]["state"] == "READY"

    asyncio.run(main())
    # a second event loop: the same client object is usable again (a new connection)
    shared = fc.AsyncClient(engine.socket, agent_id="support-bot")

    async def once() -> str:
        return (await shared.govern("knowledgebase/search", {"query": "y"})).effect

    assert asyncio.run(once()) == "PERMIT"
    assert asyncio.run(once()) == "PERMIT"


def test_sync_client_in_async_decorator_and_threads(client: fc.Client) -> None:
    @fc.governed("knowledgebase/search", client=client)
    async def search(query: str) -> str:
        return query

    assert asyncio.run(search("q")) == "q"

    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                call_id = f"w{n}-{i}"
                assert client.govern("knowledgebase/search", {"query": call_id}, call_id=call_id).call_id == call_id
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --------------------------------------------------------------------------------------------- inherited fd


def test_inherited_fd_in_process(engine: DevEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(engine.socket)
    fd = sock.detach()
    monkeypatch.setenv("FARAMESH_SOCKET_FD", str(fd))
    monkeypatch.setenv("FARAMESH_AGENT_ID", "support-bot")
    c = fc.Client()
    assert "FARAMESH_SOCKET_FD" not in os.environ  # claimed: children and later clients do not reuse it
    assert c.govern("knowledgebase/search", {"query": "fd"}).effect == "PERMIT"
    assert not os.get_inheritable(fd)
    # a second client has neither the fd nor a path: it raises, it does not guess
    with pytest.raises(fc.EngineUnavailable):
        fc.Client().govern("knowledgebase/search", {"query": "fd"})
    c.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the client owned the fd and closed it


def test_inherited_fd_in_a_child_process(engine: DevEngine, short_dir: Path) -> None:
    shutil.copyfile(CLIENT_SOURCE, short_dir / "faramesh_client.py")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(engine.socket)
    script = (
        "import os, faramesh_client as f\n"
        "c = f.Client(agent_id='support-bot')\n"
        "assert 'FARAMESH_SOCKET_FD' not in os.environ\n"
        "print(c.govern('knowledgebase/search', {'query': 'child'}).effect)\n"
        "try:\n"
        "    c.govern('shell/exec', {'cmd': 'id'})\n"
        "except f.ToolDenied as e:\n"
        "    print(e.code, e.human_message)\n"
    )
    with sock:
        proc = subprocess.run(
            [sys.executable, "-S", "-c", script],
            env={"PYTHONPATH": str(short_dir), "FARAMESH_SOCKET_FD": str(sock.fileno())},
            pass_fds=[sock.fileno()],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["PERMIT", "POLICY_DENY no shell access"]


def test_inherited_fd_that_is_not_a_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    with open(tmp_path / "f", "w") as not_a_socket:
        monkeypatch.setenv("FARAMESH_SOCKET_FD", str(not_a_socket.fileno()))
        c = fc.Client()

        @c.governed("knowledgebase/search")
        def search(query: str) -> None:
            ran.append(query)

        with pytest.raises(fc.EngineUnavailable, match="not a socket"):
            search("x")
    monkeypatch.setenv("FARAMESH_SOCKET_FD", "seven")
    with pytest.raises(fc.EngineUnavailable, match="not a file descriptor"):
        fc.Client().govern("knowledgebase/search", {})
    assert ran == []


# --------------------------------------------------------------------------------------------- fail closed


def test_no_engine_never_runs_the_function(short_dir: Path) -> None:
    ran = False
    for c in (fc.Client(str(short_dir / "absent.sock"), timeout=1), fc.Client(timeout=1)):

        @c.governed("refund")
        def refund(amount: int) -> None:
            nonlocal ran
            ran = True

        with pytest.raises(fc.EngineUnavailable) as exc:
            refund(1)
        e = exc.value
        assert isinstance(e, fc.ToolDenied)
        assert (e.code, e.effect, e.tool) == ("DAEMON_NOT_READY", None, "refund")
        assert e.action_id is None
    with pytest.raises(fc.EngineUnavailable, match="set FARAMESH_SOCKET"):
        fc.Client().govern("refund", {})

    async def main() -> None:
        async_ran = False

        @fc.AsyncClient(str(short_dir / "absent.sock")).governed("refund")
        async def refund(amount: int) -> None:
            nonlocal async_ran
            async_ran = True

        with pytest.raises(fc.EngineUnavailable):
            await refund(1)
        assert not async_ran

    asyncio.run(main())
    assert ran is False


def test_engine_killed_then_restarted_on_the_same_socket(engine: DevEngine, client: fc.Client) -> None:
    ran: list[str] = []

    @client.governed("knowledgebase/search")
    def search(query: str) -> str:
        ran.append(query)
        return query

    assert search("before") == "before"
    path = engine.socket
    engine.kill()  # SIGKILL: no drain
    with pytest.raises(fc.EngineUnavailable):
        search("while down")
    assert ran == ["before"]
    engine.start()
    assert engine.socket == path
    assert search("after restart") == "after restart"  # the same client reconnects
    assert ran == ["before", "after restart"]


def test_call_in_flight_when_the_engine_dies_raises(engine: DevEngine, client: fc.Client) -> None:
    assert client.govern("knowledgebase/search", {"query": "warm"}).effect == "PERMIT"
    assert engine.proc is not None
    outcome: list[BaseException | fc.Permit] = []
    os.kill(engine.proc.pid, signal.SIGSTOP)
    try:

        def call() -> None:
            try:
                outcome.append(client.govern("knowledgebase/search", {"query": "in flight"}))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.3)
        assert outcome == []  # the request is waiting for its answer
        started = time.monotonic()
        engine.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.proc.pid, signal.SIGCONT)
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], fc.EngineUnavailable)
    assert time.monotonic() - started < 3  # noticed at once, not at the 5 s timeout
    engine.start()
    assert client.govern("knowledgebase/search", {"query": "back"}).effect == "PERMIT"


def test_graceful_restart_next_call_succeeds(engine: DevEngine, client: fc.Client) -> None:
    loop = asyncio.new_event_loop()
    async_client = fc.AsyncClient(engine.socket, agent_id="support-bot", timeout=5)
    try:
        assert client.govern("knowledgebase/search", {"query": "1"}).effect == "PERMIT"
        assert loop.run_until_complete(async_client.govern("knowledgebase/search", {"query": "1"})).effect == "PERMIT"
        assert engine.stop() == 0
        engine.start()
        # the old connections were closed by the draining engine; the next calls open new ones
        assert client.govern("knowledgebase/search", {"query": "2"}).effect == "PERMIT"
        assert loop.run_until_complete(async_client.govern("knowledgebase/search", {"query": "2"})).effect == "PERMIT"
    finally:
        loop.run_until_complete(async_client.close())
        loop.close()


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _permit_for(request: dict[str, Any], **changes: Any) -> dict[str, Any]:
    reply = {"call_id": request.get("call_id"), "effect": "PERMIT", "action_id": "01FAKE", "latency_us": 1}
    reply.update(changes)
    return {k: v for k, v in reply.items() if v is not None}


FAKE_ANSWERS: dict[str, Callable[[dict[str, Any]], tuple[bytes, bool]]] = {
    "garbage": lambda r: (b"this is not json\n", False),
    "not an object": lambda r: (b"[1, 2]\n", False),
    "mismatched call_id": lambda r: (_line(_permit_for(r, call_id="someone-else")), False),
    "no call_id": lambda r: (_line(_permit_for(r, call_id=None)), False),
    "closes early": lambda r: (b"", True),
    "half a line then close": lambda r: (b'{"call_id": "', True),
    "not ready": lambda r: (_line({"error": {"code": "DAEMON_NOT_READY", "message": "the engine is STARTING"}}), False),
    "permit without action_id": lambda r: (_line(_permit_for(r, action_id=None)), False),
    "unknown effect": lambda r: (_line(_permit_for(r, effect="MAYBE")), False),
    "credential not an object": lambda r: (_line(_permit_for(r, credential="secret")), False),
    "two answers": lambda r: (_line(_permit_for(r)) * 2, False),
    "silence": lambda r: (b"", False),
    "endless line": lambda r: (b"x" * (fc.MAX_REPLY + 65536), False),
}


@pytest.mark.parametrize("answer", sorted(FAKE_ANSWERS))
def test_bad_answers_raise_and_never_run_the_function(answer: str, fake: Any) -> None:
    server = fake(FAKE_ANSWERS[answer])
    ran: list[str] = []
    c = fc.Client(server.path, agent_id="support-bot", timeout=0.5)

    @c.governed("refund")
    def refund(amount: int) -> None:
        ran.append("sync")

    with pytest.raises(fc.EngineUnavailable) as exc:
        refund(1)
    assert exc.value.code == "DAEMON_NOT_READY" and exc.value.tool == "refund"

    async def main() -> None:
        ac = fc.AsyncClient(server.path, agent_id="support-bot", timeout=0.5)

        @ac.governed("refund")
        async def arefund(amount: int) -> None:
            ran.append("async")

        with pytest.raises(fc.EngineUnavailable):
            await arefund(1)
        await ac.close()

    asyncio.run(main())
    assert ran == []


def test_a_bad_answer_drops_the_connection_and_the_next_call_reconnects(fake: Any) -> None:
    answers = iter([lambda r: (b"garbage\n", False)] + [_permit_echo] * 5)
    server = fake(lambda r: next(answers)(r))
    c = fc.Client(server.path, agent_id="support-bot", timeout=1)
    with pytest.raises(fc.EngineUnavailable):
        c.govern("refund", {"amount": 1})
    assert c.govern("refund", {"amount": 1}).action_id == "01FAKE"
    assert c.govern("refund", {"amount": 1}).action_id == "01FAKE"
    assert server.connections == 2


def test_not_ready_then_ready_on_one_connection(fake: Any) -> None:
    replies = iter([_line({"error": {"code": "DAEMON_NOT_READY", "message": "INITIALIZING"}})])

    def respond(request: dict[str, Any]) -> tuple[bytes, bool]:
        return next(replies, None) or _permit_echo(request)[0], False

    server = fake(respond)
    c = fc.Client(server.path, agent_id="support-bot")
    with pytest.raises(fc.EngineUnavailable, match="not ready"):
        c.govern("refund", {"amount": 1})
    assert c.govern("refund", {"amount": 1}).effect == "PERMIT"
    assert server.connections == 1  # an error envelope does not break the connection


def test_block_mode_rides_out_poll_failures_until_the_deadline(fake: Any) -> None:
    def respond(request: dict[str, Any]) -> tuple[bytes, bool]:
        if request["type"] == "govern":
            denial = {"code": "POLICY_DEFER", "resolution": {"type": "pending_approval", "approval_id": "apr-1"}}
            return _line(
                {**_permit_for(request, effect="DEFER"), "defer_token": "apr-1", "structured_denial": denial}
            ), False
        return b"", True  # every poll breaks the connection

    server = fake(respond)
    c = fc.Client(server.path, agent_id="support-bot", poll_interval=0.05)
    started = time.monotonic()
    with pytest.raises(fc.EngineUnavailable):
        c.govern("refund", {"amount": 100}, on_defer="block", defer_timeout=0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert sum(r["type"] == "poll_defer" for r in server.requests) >= 3


# --------------------------------------------------------------------------------------------- stdlib only


def test_client_imports_with_only_the_standard_library(short_dir: Path) -> None:
    shutil.copyfile(CLIENT_SOURCE, short_dir / "faramesh_client.py")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(short_dir)!r})\n"
        "import faramesh_client as f\n"
        "outside = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
        " - {'__main__', 'faramesh_client'})\n"
        "assert not outside, outside\n"
        "assert 'asyncio' not in sys.modules, 'asyncio is imported lazily'\n"
        "c = f.Client('/nonexistent/engine.sock', timeout=0.2)\n"
        "try:\n"
        "    c.govern('refund', {'amount': 1})\n"
        "except f.EngineUnavailable as e:\n"
        "    print(e.code)\n"
        "import asyncio\n"
        "async def main():\n"
        "    try:\n"
        "        await f.AsyncClient('/nonexistent/engine.sock').govern('refund', {})\n"
        "    except f.EngineUnavailable as e:\n"
        "        print(e.code)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], env={}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DAEMON_NOT_READY", "DAEMON_NOT_READY"]
    source = CLIENT_SOURCE.read_text()
    assert "from ." not in source and "import faramesh" not in source and "orjson" not in source


# --------------------------------------------------------------------------------------------- example


def test_example_agent_against_the_example_stack(tmp_path: Path) -> None:
    """`make demo`'s script end to end: dev engine on examples/support-bot, the agent under
    `python -S`, approval through the real CLI, SIGTERM → exit 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "demo.py"), "--dev"],  # as root, plain demo.py takes the apply tour
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_")},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "smoke test passed" in out and "demo passed" in out
    assert re.search(r"refund\s+PERMIT\s+APPROVED\s+governance\.fms:24\s+apr-\S+ approved by uid:\d+", out)
    assert "FAIL" not in out
