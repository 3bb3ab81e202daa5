"""Faramesh agent client: ask the enforcement engine before every tool call.

Standard library only, no relative imports: an agent can use this file without installing Faramesh.
The launcher puts a copy of it on the agent's ``PYTHONPATH`` as ``faramesh_client``::

    from faramesh_client import Client, ToolDenied, governed

    client = Client()                      # FARAMESH_SOCKET, or an inherited FARAMESH_SOCKET_FD

    @governed("refund", client=client)
    def refund(amount, card=None):         # the call's arguments become the tool args
        ...                                # runs only after the engine answered PERMIT

    try:
        refund(10)
    except ToolDenied as denied:           # DENY, DEFER, or no engine at all
        print(denied.code, denied.human_message)

Fail closed, always: every path that does not end in a PERMIT read from the engine raises. No engine,
an engine that is not READY (``{"error": {"code": "DAEMON_NOT_READY"}}``), a broken connection, a
timeout, or an answer that cannot be read or does not match the request raises
:class:`EngineUnavailable` (a :class:`ToolDenied` with code ``DAEMON_NOT_READY``); a decorated function
then never runs.

Connections. One Unix-socket connection per client, opened on first use and guarded by a lock, so a
:class:`Client` can be shared between threads (requests on one connection are serialised; the
engine answers them in order). A connection the engine has closed (it restarted, or it closed an
idle connection) is noticed before the next request is written and replaced by a new one, so the
next call after an engine restart succeeds once the engine is READY again; a call that was in
flight when the connection broke raises (its outcome is unknown, so nothing runs). An inherited
connection (``FARAMESH_SOCKET_FD``, used where the sandbox has no mount namespace) belongs to the
first client that uses it: that client removes the variable from ``os.environ`` (so child processes
and later clients do not reuse the stream) and, once the connection is gone, reconnects through
``FARAMESH_SOCKET`` when that is set, else keeps raising :class:`EngineUnavailable`.

Wire protocol v1 (DESIGN.md §4): one JSON object per line, typed form (``{"type": "govern", "v": 1,
...}``). Replies are matched to requests by ``call_id`` (govern) or by shape (the other verbs).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import select
import socket
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    import asyncio  # imported where used: agents that only block never pay for asyncio
    from typing import ParamSpec

    P = ParamSpec("P")

R = TypeVar("R")
T = TypeVar("T")

__all__ = [
    "DEFAULT_DEFER_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "Client",
    "DeferStatus",
    "EngineError",
    "EngineUnavailable",
    "FarameshError",
    "Permit",
    "ToolDenied",
    "default_async_client",
    "default_client",
    "governed",
]

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT = 10.0  # seconds for one request: connect, send, answer
DEFAULT_DEFER_TIMEOUT = 300.0  # seconds on_defer="block" waits for an operator
DEFAULT_POLL_INTERVAL = 0.25  # first pause between poll_defer requests; grows to MAX_POLL_INTERVAL
MAX_POLL_INTERVAL = 2.0
MAX_REPLY = 4 * 1024 * 1024  # longest answer line accepted (a permit may carry a credential)

ENV_SOCKET = "FARAMESH_SOCKET"
ENV_SOCKET_FD = "FARAMESH_SOCKET_FD"
ENV_AGENT_ID = "FARAMESH_AGENT_ID"
ENV_SESSION_ID = "FARAMESH_SESSION_ID"

NOT_READY = "DAEMON_NOT_READY"
PERMIT, DEFER, DENY = "PERMIT", "DEFER", "DENY"
_EFFECTS = (PERMIT, DEFER, DENY)
_POLL_STATES = ("pending", "approved", "denied", "expired")
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

log = logging.getLogger("faramesh.client")


# --------------------------------------------------------------------------------------------- results


class FarameshError(Exception):
    """Base of every error this client raises; ``code`` is a Faramesh code such as ``POLICY_DENY``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only attributes survive pickling (e.g. across a process pool)
        return (_restore_error, (type(self), dict(self.__dict__)))


def _restore_error(cls: type[FarameshError], state: dict[str, Any]) -> FarameshError:
    error = cls.__new__(cls)
    Exception.__init__(error, f"{state.get('code')}: {state.get('message')}")
    error.__dict__.update(state)
    return error


class ToolDenied(FarameshError):
    """The call was not permitted: the tool must not run.

    Attributes mirror the engine's ``structured_denial``:

    - ``code``: ``POLICY_DENY``, ``POLICY_DEFER``, ``RATE_EXCEEDED``, ``BUDGET_EXCEEDED``,
      ``BUDGET_UNAVAILABLE``, ``EGRESS_DENIED``, ``CREDENTIAL_UNAVAILABLE``, ``SIGNING_UNAVAILABLE``,
      ``IDENTITY_MISMATCH``, ``IDENTITY_INVALID``, ``IDENTITY_UNAVAILABLE``, ``WAL_WRITE_FAILURE``,
      ``INVALID_REQUEST``, ``DAEMON_NOT_READY`` …
    - ``human_message``: why, in words (an operator's reason when an operator denied the call).
    - ``rule_ref``: the rule that decided (``governance.fms:24``), or None.
    - ``resolution``: what would change the answer, e.g. ``{"type": "pending_approval",
      "approval_id": "apr-…"}``, ``{"type": "retry_after", "retry_after_seconds": 12}``.
    - ``approval_id``: the approval a deferred call waits on (also its ``poll_defer`` token).
    - ``action_id``: the id of the DPR recording the decision (None when no decision was recorded).
    - ``effect``: ``"DENY"`` or ``"DEFER"``; None when no decision was received (engine unavailable).
    - ``tool``, ``call_id``: the request this answers; ``reply``: the raw answer, if any.
    """

    def __init__(
        self,
        code: str,
        human_message: str,
        *,
        effect: str | None = DENY,
        rule_ref: str | None = None,
        resolution: Mapping[str, Any] | None = None,
        approval_id: str | None = None,
        action_id: str | None = None,
        tool: str | None = None,
        call_id: str | None = None,
        reply: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(code, human_message)
        self.human_message = human_message
        self.effect = effect
        self.rule_ref = rule_ref
        self.resolution: dict[str, Any] = dict(resolution or {})
        self.approval_id = approval_id
        self.action_id = action_id
        self.tool = tool
        self.call_id = call_id
        self.reply: dict[str, Any] = dict(reply or {})

    def __str__(self) -> str:
        where = f" ({self.rule_ref})" if self.rule_ref else ""
        subject = f"{self.tool}: " if self.tool else ""
        return f"{subject}{self.code}: {self.human_message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, human_message={self.human_message!r}, "
            f"effect={self.effect!r}, rule_ref={self.rule_ref!r}, approval_id={self.approval_id!r}, "
            f"action_id={self.action_id!r})"
        )

    @property
    def retry_after_seconds(self) -> float | None:
        """For ``RATE_EXCEEDED``: how long until a retry can succeed."""
        value = self.resolution.get("retry_after_seconds")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class EngineUnavailable(ToolDenied):
    """No decision could be obtained (no engine, not READY, broken connection, timeout, unreadable or
    mismatched answer). Code ``DAEMON_NOT_READY``; ``effect`` is None. The call must not run."""

    def __init__(self, message: str, *, tool: str | None = None, call_id: str | None = None) -> None:
        super().__init__(NOT_READY, message, effect=None, tool=tool, call_id=call_id)


class EngineError(FarameshError):
    """The engine refused a request that is not a tool call (``poll_defer``, ``complete``,
    ``status``) with an error envelope, e.g. ``INVALID_REQUEST`` for an unknown defer token."""


@dataclass(frozen=True)
class Permit:
    """The engine permitted the call. ``action_id`` names its DPR (pass it to ``complete``);
    ``credential`` is what the credential broker issued for this call (or None); ``latency_us`` is
    the engine's decision time; ``round_trip_us`` what the client measured around the request."""

    action_id: str
    tool: str
    call_id: str
    latency_us: int | None = None
    credential: dict[str, Any] | None = None
    approval_id: str | None = None
    round_trip_us: int | None = None
    reply: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def effect(self) -> str:
        return PERMIT


@dataclass(frozen=True)
class DeferStatus:
    """Answer to ``poll_defer``: ``status`` is ``pending``, ``approved``, ``denied`` or ``expired``;
    ``reason`` is the operator's reason on a deny."""

    status: str
    approval_id: str | None = None
    reason: str | None = None
    reply: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


class _Unreadable(Exception):
    """Internal: the engine's answer could not be read or does not match the request."""


# --------------------------------------------------------------------------------------------- protocol


def _encode(message: Mapping[str, Any]) -> bytes:
    """One request line. Raises ValueError/TypeError for values JSON cannot carry."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Unreadable(f"the engine's answer is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise _Unreadable("the engine's answer is not a JSON object")
    return data


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _error_of(reply: Mapping[str, Any]) -> tuple[str, str] | None:
    """(code, message) when the answer is an error envelope."""
    if "error" not in reply:
        return None
    err = reply["error"]
    if not isinstance(err, dict):
        raise _Unreadable("the engine's error envelope is malformed")
    code = _opt_str(err.get("code")) or "ENGINE_ERROR"
    message = err.get("message") if isinstance(err.get("message"), str) else ""
    return code, message or code


def _govern_message(
    tool: str,
    args: Mapping[str, Any],
    call_id: str,
    agent_id: str | None,
    session_id: str | None,
    principal_token: str | None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "govern", "v": PROTOCOL_VERSION, "call_id": call_id}
    if agent_id is not None:
        message["agent_id"] = agent_id
    if session_id is not None:
        message["session_id"] = session_id
    message["tool_id"] = tool
    message["args"] = dict(args)
    if principal_token is not None:
        message["principal_token"] = principal_token
    return message


def _interpret_govern(reply: Mapping[str, Any], tool: str, call_id: str, round_trip_us: int) -> Permit | ToolDenied:
    """Map a govern answer to a Permit or to the ToolDenied to raise. Never returns a Permit unless
    the answer is a well-formed PERMIT for this very call_id."""
    error = _error_of(reply)
    if error is not None:
        code, message = error
        if code == NOT_READY:
            return EngineUnavailable(f"the engine is not ready: {message}", tool=tool, call_id=call_id)
        return ToolDenied(code, message, effect=DENY, tool=tool, call_id=call_id, reply=reply)
    if reply.get("call_id") != call_id:
        raise _Unreadable(f"the engine answered call_id {str(reply.get('call_id'))[:80]!r}, expected {call_id!r}")
    effect = reply.get("effect")
    if effect not in _EFFECTS:
        raise _Unreadable(f"the engine's answer has no valid effect ({str(effect)[:40]!r})")
    action_id = reply.get("action_id")
    if action_id is not None and not isinstance(action_id, str):
        raise _Unreadable("the engine's answer has a malformed action_id")
    latency = reply.get("latency_us")
    latency_us = latency if isinstance(latency, int) and not isinstance(latency, bool) else None
    if effect == PERMIT:
        credential = reply.get("credential")
        if not action_id or (credential is not None and not isinstance(credential, dict)):
            raise _Unreadable("the engine's PERMIT is malformed (no action_id, or a malformed credential)")
        return Permit(
            action_id=action_id,
            tool=tool,
            call_id=call_id,
            latency_us=latency_us,
            credential=credential,
            approval_id=_opt_str(reply.get("approval_id")),
            round_trip_us=round_trip_us,
            reply=dict(reply),
        )
    denial = reply.get("structured_denial")
    denial = denial if isinstance(denial, dict) else {}
    resolution = denial.get("resolution")
    resolution = resolution if isinstance(resolution, dict) else {}
    code = _opt_str(denial.get("code")) or ("POLICY_DEFER" if effect == DEFER else "POLICY_DENY")
    message = _opt_str(denial.get("human_message")) or f"{tool} {'deferred' if effect == DEFER else 'denied'}"
    approval_id = _opt_str(reply.get("defer_token")) or _opt_str(resolution.get("approval_id"))
    return ToolDenied(
        code,
        message,
        effect=effect,
        rule_ref=_opt_str(denial.get("rule_ref")),
        resolution=resolution,
        approval_id=approval_id,
        action_id=action_id,
        tool=tool,
        call_id=call_id,
        reply=reply,
    )


def _interpret_poll(reply: Mapping[str, Any], token: str) -> DeferStatus:
    error = _error_of(reply)
    if error is not None:
        if error[0] == NOT_READY:
            raise EngineUnavailable(f"the engine is not ready: {error[1]}")
        raise EngineError(*error)
    status = reply.get("status")
    if status not in _POLL_STATES:
        raise _Unreadable(f"the engine's poll_defer answer has no valid status ({str(status)[:40]!r})")
    approval_id = _opt_str(reply.get("approval_id"))
    if approval_id is not None and approval_id != token:
        raise _Unreadable(f"the engine answered approval {approval_id!r}, expected {token!r}")
    reason = _opt_str(reply.get("reason"))
    return DeferStatus(str(status), approval_id or token, reason, dict(reply))


def _interpret_plain(reply: Mapping[str, Any]) -> dict[str, Any]:
    error = _error_of(reply)
    if error is not None:
        if error[0] == NOT_READY:
            raise EngineUnavailable(f"the engine is not ready: {error[1]}")
        raise EngineError(*error)
    return dict(reply)


def _closes_connection(reply: Mapping[str, Any]) -> bool:
    """The engine closes the connection after FRAME_TOO_LARGE; so do we."""
    err = reply.get("error")
    return isinstance(err, dict) and err.get("code") == "FRAME_TOO_LARGE"


def _interpret_complete(action_id: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def interpret(reply: dict[str, Any]) -> dict[str, Any]:
        out = _interpret_plain(reply)
        if out.get("action_id") != action_id:
            raise _Unreadable("the answer to complete names another action")
        return out

    return interpret


def _interpret_status(reply: dict[str, Any]) -> dict[str, Any]:
    out = _interpret_plain(reply)
    if not isinstance(out.get("daemon"), dict):
        raise _Unreadable("the status answer has no daemon section")
    return out


def _bad_args(tool: str, call_id: str, exc: Exception) -> ToolDenied:
    return ToolDenied(
        "INVALID_REQUEST",
        f"the tool args cannot be sent as JSON ({exc}); the call was not made",
        tool=tool,
        call_id=call_id,
    )


def _defer_denied(defer: ToolDenied, status: DeferStatus) -> ToolDenied:
    return ToolDenied(
        "POLICY_DENY",
        status.reason or "denied by an operator",
        effect=DENY,
        rule_ref=defer.rule_ref,
        resolution={"type": "rule_block", "approval_id": defer.approval_id},
        approval_id=defer.approval_id,
        action_id=defer.action_id,
        tool=defer.tool,
        call_id=defer.call_id,
        reply=status.reply,
    )


def _defer_unresolved(defer: ToolDenied, why: str) -> ToolDenied:
    return ToolDenied(
        "POLICY_DEFER",
        why,
        effect=DEFER,
        rule_ref=defer.rule_ref,
        resolution=defer.resolution,
        approval_id=defer.approval_id,
        action_id=defer.action_id,
        tool=defer.tool,
        call_id=defer.call_id,
        reply=defer.reply,
    )


def _check_on_defer(on_defer: str) -> None:
    if on_defer not in ("raise", "block"):
        raise ValueError(f'on_defer must be "raise" or "block", not {on_defer!r}')


def _claim_inherited_fd() -> tuple[int | None, str | None]:
    """Take FARAMESH_SOCKET_FD out of the environment: (fd, None), (None, problem) or (None, None)."""
    raw = os.environ.pop(ENV_SOCKET_FD, None)
    if raw is None or not raw.strip():
        return None, None
    try:
        fd = int(raw)
    except ValueError:
        return None, f"{ENV_SOCKET_FD}={raw[:20]!r} is not a file descriptor number"
    if fd < 0:
        return None, f"{ENV_SOCKET_FD}={fd} is not a file descriptor number"
    return fd, None


def _wrap_fd(fd: int) -> socket.socket:
    """A socket object owning the inherited, already connected Unix stream `fd`."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise OSError(f"inherited fd {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise OSError(f"inherited fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"inherited fd {fd} is not a Unix stream socket")
    os.set_inheritable(fd, False)  # tools the agent spawns must not share the engine connection
    return sock


def _has_input(fd: int) -> bool:
    """True when `fd` is readable right now. Between requests nothing is owed to us, so readable
    means the engine closed the connection (EOF) or sent something unsolicited: either way the
    connection is not safe to reuse."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, errored = select.select([fd], [], [fd], 0)
        return bool(readable or errored)
    except (OSError, ValueError):
        return True


def _resolve_endpoint(
    socket_path: str | os.PathLike[str] | None, fd: int | None
) -> tuple[str | None, int | None, str | None]:
    """(socket path, inherited fd, problem with FARAMESH_SOCKET_FD) for a new client."""
    env_path = os.environ.get(ENV_SOCKET) or None
    if socket_path is not None:
        return os.fspath(socket_path), fd, None
    if fd is not None:
        return env_path, fd, None
    inherited, problem = _claim_inherited_fd()
    return env_path, inherited, problem


def _tool_args(
    sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any], skip_first: bool
) -> dict[str, Any]:
    """The decorated function's call arguments, as the tool args: parameter name → value, defaults
    applied, ``*args`` as a list under its name, ``**kwargs`` merged in."""
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        if index == 0 and skip_first:
            continue
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = list(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------- sync


class _Channel:
    """One blocking connection to the engine, serialised by a lock."""

    def __init__(self, path: str | None, fd: int | None, fd_problem: str | None) -> None:
        self.path = path
        self.fd = fd
        self.fd_problem = fd_problem
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid = os.getpid()
        self.buf = bytearray()
        _channels.add(self)

    def where(self) -> str:
        if self.sock is None and self.fd is not None:
            return f"inherited fd {self.fd}"
        return self.path or f"inherited fd {ENV_SOCKET_FD}"

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self.buf.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _open(self, deadline: float) -> socket.socket:
        if self.fd is not None:
            fd, self.fd = self.fd, None  # an inherited connection is used once, never re-wrapped
            sock = _wrap_fd(fd)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            return sock
        if self.path is None:
            raise OSError(self.fd_problem or f"no engine socket is configured (set {ENV_SOCKET})")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, payload: bytes, timeout: float, interpret: Callable[[dict[str, Any]], T]) -> T:
        """Send one line, read one line, return ``interpret(answer)``. Runs under the lock. A
        failure to send or read closes the connection and raises EngineUnavailable; an answer that
        cannot be read (``_Unreadable``, also from ``interpret``) closes it and re-raises."""
        deadline = time.monotonic() + timeout
        with self.lock:
            if self.sock is not None and (self.pid != os.getpid() or self.buf or _has_input(self.sock.fileno())):
                log.debug("faramesh: the engine connection was closed; reconnecting")
                self.close()
            try:
                if self.sock is None:
                    self.sock = self._open(deadline)
                    self.pid = os.getpid()
                sock = self.sock
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(payload, _NOSIGNAL)
                line = self._read_line(sock, deadline)
                reply = _decode(line)
                if _closes_connection(reply):
                    self.close()
                return interpret(reply)
            except FarameshError:
                raise  # a well-formed refusal: the connection stays usable
            except _Unreadable:
                self.close()
                raise
            except OSError as exc:
                self.close()
                if isinstance(exc, (TimeoutError, socket.timeout)):
                    raise EngineUnavailable(
                        f"no answer from the engine at {self.where()} within {timeout:g}s"
                    ) from None
                raise EngineUnavailable(f"cannot reach the engine at {self.where()}: {exc}") from None
            except BaseException:
                self.close()  # interrupted mid-request: a late answer must not reach the next caller
                raise

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes:
        buf = self.buf
        while True:
            newline = buf.find(b"\n")
            if newline >= 0:
                line = bytes(buf[:newline])
                del buf[: newline + 1]
                if buf:
                    raise _Unreadable("the engine sent more than one answer to one request")
                return line
            if len(buf) > MAX_REPLY:
                raise _Unreadable(f"the engine's answer exceeds {MAX_REPLY} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the engine closed the connection before answering")
            buf += chunk


_channels: weakref.WeakSet[_Channel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock held by another thread at fork() would never be released in the child."""
    global _defaults_lock
    _defaults_lock = threading.Lock()
    for channel in list(_channels):
        channel.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """Blocking client for one engine socket. Thread-safe; one connection, reopened as needed.

    ``socket_path``: the engine socket; default ``$FARAMESH_SOCKET``. When no path is given and
    ``$FARAMESH_SOCKET_FD`` names an inherited, connected Unix socket, that connection is used first
    (``fd=`` passes one explicitly). ``timeout``: seconds for one request (connect, send, answer).
    ``agent_id``: sent with each call (default ``$FARAMESH_AGENT_ID``; an agent socket knows its
    agent and denies a call naming another; the dev socket needs it). ``session_id``: default
    ``$FARAMESH_SESSION_ID``, else a fresh random id per client. ``poll_interval``: the first pause
    between ``poll_defer`` requests when blocking on a defer.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        agent_id: str | None = None,
        session_id: str | None = None,
        fd: int | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        path, inherited, problem = _resolve_endpoint(socket_path, fd)
        self.socket_path = path
        self.timeout = float(timeout)
        self.agent_id = agent_id if agent_id is not None else (os.environ.get(ENV_AGENT_ID) or None)
        self.session_id = session_id or os.environ.get(ENV_SESSION_ID) or uuid.uuid4().hex
        self.poll_interval = float(poll_interval)
        self._channel = _Channel(path, inherited, problem)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._channel.where()!r}, agent_id={self.agent_id!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        with self._channel.lock:
            self._channel.close()

    # ---- requests
    def _call(self, message: Mapping[str, Any], interpret: Callable[[dict[str, Any]], T]) -> T:
        try:
            return self._channel.request(_encode(message), self.timeout, interpret)
        except _Unreadable as exc:
            raise EngineUnavailable(f"unreadable answer from the engine: {exc}") from None

    def _govern_once(
        self, tool: str, args: Mapping[str, Any], call_id: str, principal_token: str | None
    ) -> Permit | ToolDenied:
        message = _govern_message(tool, args, call_id, self.agent_id, self.session_id, principal_token)
        try:
            payload = _encode(message)
        except (TypeError, ValueError) as exc:
            return _bad_args(tool, call_id, exc)
        started = time.perf_counter_ns()

        def interpret(reply: dict[str, Any]) -> Permit | ToolDenied:
            return _interpret_govern(reply, tool, call_id, (time.perf_counter_ns() - started) // 1000)

        try:
            return self._channel.request(payload, self.timeout, interpret)
        except _Unreadable as exc:
            return EngineUnavailable(f"unreadable answer from the engine: {exc}", tool=tool, call_id=call_id)
        except EngineUnavailable as exc:
            exc.tool, exc.call_id = tool, call_id
            return exc

    def govern(
        self,
        tool: str,
        args: Mapping[str, Any] | None = None,
        *,
        call_id: str | None = None,
        principal_token: str | None = None,
        on_defer: str = "raise",
        defer_timeout: float = DEFAULT_DEFER_TIMEOUT,
        poll_interval: float | None = None,
    ) -> Permit:
        """Ask the engine whether ``tool`` may run with ``args``; return the :class:`Permit` or raise.

        Raises :class:`ToolDenied` on DENY and DEFER, :class:`EngineUnavailable` when no decision
        could be obtained. With ``on_defer="block"`` a DEFER is waited out: ``poll_defer`` is
        polled (every ``poll_interval`` s, growing to 2 s) until an operator approves — then the
        identical call (same tool, args and call_id) is sent again, the engine permits it once, and
        that Permit is returned — or denies (``ToolDenied`` ``POLICY_DENY`` carrying the operator's
        reason), or the approval expires or ``defer_timeout`` passes (``ToolDenied``
        ``POLICY_DEFER``). Polls that fail while the engine restarts are retried until
        ``defer_timeout``; if the last one failed, that ``EngineUnavailable`` is raised.
        """
        _check_on_defer(on_defer)
        call_id = call_id or uuid.uuid4().hex
        args = {} if args is None else args
        deadline = time.monotonic() + defer_timeout
        interval = self.poll_interval if poll_interval is None else poll_interval
        while True:
            result = self._govern_once(tool, args, call_id, principal_token)
            if isinstance(result, Permit):
                return result
            if on_defer != "block" or result.effect != DEFER or not result.approval_id:
                raise result
            waiter = _DeferWait(result, deadline, defer_timeout, interval)
            while (pause := waiter.step(self._try_poll(waiter.token))) is not None:
                time.sleep(pause)

    def _try_poll(self, token: str) -> DeferStatus | FarameshError:
        try:
            return self.poll_defer(token)
        except FarameshError as exc:
            return exc

    def poll_defer(self, token: str) -> DeferStatus:
        """The state of a deferred call's approval (``token`` = ``ToolDenied.approval_id``).
        Raises EngineError for a token the engine does not know (or that is another agent's)."""
        message = {"type": "poll_defer", "v": PROTOCOL_VERSION, "defer_token": token}
        return self._call(message, functools.partial(_interpret_poll, token=token))

    def complete(self, action_id: str, usage: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Report what a permitted call actually used (``{"cost_cents": 42}`` or ``{"model": …,
        "input_tokens": …, "output_tokens": …}``) so its budget reservation settles. Returns the
        engine's answer (``{"action_id", "settled_cents"}``)."""
        message = {"type": "complete", "v": PROTOCOL_VERSION, "action_id": action_id, "usage": dict(usage or {})}
        return self._call(message, _interpret_complete(action_id))

    def status(self) -> dict[str, Any]:
        """The engine's status document (``daemon.state`` is ``READY`` when it serves calls)."""
        return self._call({"type": "status", "v": PROTOCOL_VERSION}, _interpret_status)

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> dict[str, Any]:
        """Poll ``status`` until the engine is READY; return the status, or raise EngineUnavailable."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                current = self.status()
                if current["daemon"].get("state") == "READY":
                    return current
                problem = f"the engine is {current['daemon'].get('state')}"
            except EngineUnavailable as exc:
                problem = exc.human_message
            if time.monotonic() >= deadline:
                raise EngineUnavailable(f"the engine was not READY within {timeout:g}s ({problem})")
            time.sleep(interval)

    def governed(
        self,
        tool: str,
        *,
        on_defer: str = "raise",
        defer_timeout: float = DEFAULT_DEFER_TIMEOUT,
        pass_permit: bool = False,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """``@client.governed("refund")`` — :func:`governed` bound to this client."""
        return governed(tool, client=self, on_defer=on_defer, defer_timeout=defer_timeout, pass_permit=pass_permit)


class _DeferWait:
    """The on_defer="block" state machine shared by Client and AsyncClient. ``step(poll result)``
    returns the pause before the next poll, returns None once the approval is APPROVED (the caller
    re-sends the identical call), or raises the ToolDenied that ends the wait."""

    def __init__(self, defer: ToolDenied, deadline: float, defer_timeout: float, interval: float) -> None:
        self.defer = defer
        self.token = cast(str, defer.approval_id)
        self.deadline = deadline
        self.defer_timeout = defer_timeout
        self.interval = interval

    def step(self, polled: DeferStatus | FarameshError) -> float | None:
        token, defer = self.token, self.defer
        if isinstance(polled, EngineError):
            raise _defer_unresolved(defer, f"cannot wait for approval {token}: {polled.code}: {polled.message}")
        if isinstance(polled, DeferStatus):
            if polled.status == "approved":
                return None
            if polled.status == "denied":
                raise _defer_denied(defer, polled)
            if polled.status == "expired":
                raise _defer_unresolved(defer, f"approval {token} expired before an operator resolved it")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            if isinstance(polled, ToolDenied):  # the engine stayed unavailable until the end
                polled.tool, polled.call_id = defer.tool, defer.call_id
                raise polled
            raise _defer_unresolved(defer, f"no operator resolved approval {token} within {self.defer_timeout:g}s")
        pause = min(self.interval, remaining)
        self.interval = min(self.interval * 1.5, MAX_POLL_INTERVAL)
        return pause


# --------------------------------------------------------------------------------------------- asyncio


class _AsyncChannel:
    """One asyncio connection to the engine, serialised by an asyncio.Lock. A channel is bound to
    the event loop that opened it; used from another loop it starts over."""

    def __init__(self, path: str | None, fd: int | None, fd_problem: str | None) -> None:
        self.path = path
        self.fd = fd
        self.fd_problem = fd_problem
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock: asyncio.Lock | None = None
        self.pid = os.getpid()

    def where(self) -> str:
        if self.writer is None and self.fd is not None:
            return f"inherited fd {self.fd}"
        return self.path or f"inherited fd {ENV_SOCKET_FD}"

    def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    def _lock(self) -> asyncio.Lock:
        import asyncio

        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.lock is None:
            if self.loop is not None and self.loop is not loop:
                self.writer, self.reader = None, None  # belongs to another (possibly closed) loop
            self.loop = loop
            self.lock = asyncio.Lock()
        return self.lock

    def _stale(self) -> bool:
        reader, writer = self.reader, self.writer
        if reader is None or writer is None:
            return False
        if self.pid != os.getpid() or reader.at_eof() or writer.is_closing():
            return True
        if getattr(reader, "_buffer", b""):
            return True  # unsolicited bytes already read by the transport
        sock = writer.get_extra_info("socket")
        return sock is not None and _has_input(sock.fileno())

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import asyncio

        if self.fd is not None:
            fd, self.fd = self.fd, None
            sock = _wrap_fd(fd)
            sock.setblocking(False)
            return await asyncio.open_unix_connection(sock=sock, limit=MAX_REPLY)
        if self.path is None:
            raise OSError(self.fd_problem or f"no engine socket is configured (set {ENV_SOCKET})")
        return await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)

    async def _exchange(self, payload: bytes) -> bytes:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await self._open()
            self.pid = os.getpid()
        self.writer.write(payload)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionResetError("the engine closed the connection before answering")
        if getattr(self.reader, "_buffer", b""):
            raise _Unreadable("the engine sent more than one answer to one request")
        return line[:-1]

    async def request(self, payload: bytes, timeout: float, interpret: Callable[[dict[str, Any]], T]) -> T:
        """See :meth:`_Channel.request`."""
        import asyncio

        async with self._lock():
            if self._stale():
                log.debug("faramesh: the engine connection was closed; reconnecting")
                self.close()
            try:
                line = await asyncio.wait_for(self._exchange(payload), timeout)
                reply = _decode(line)
                if _closes_connection(reply):
                    self.close()
                return interpret(reply)
            except FarameshError:
                raise
            except _Unreadable:
                self.close()
                raise
            except (asyncio.TimeoutError, TimeoutError):  # noqa: UP041 - distinct before Python 3.11
                self.close()
                raise EngineUnavailable(f"no answer from the engine at {self.where()} within {timeout:g}s") from None
            except ValueError:  # readline's LimitOverrunError
                self.close()
                raise EngineUnavailable(f"the engine's answer exceeds {MAX_REPLY} bytes") from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.close()
                raise EngineUnavailable(f"cannot reach the engine at {self.where()}: {exc}") from None
            except BaseException:
                self.close()  # cancelled mid-request: a late answer must not reach the next caller
                raise


class AsyncClient:
    """The asyncio variant of :class:`Client`: the same constructor and methods, as coroutines.
    Safe to share between the tasks of an event loop (requests are serialised on one connection)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        agent_id: str | None = None,
        session_id: str | None = None,
        fd: int | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        path, inherited, problem = _resolve_endpoint(socket_path, fd)
        self.socket_path = path
        self.timeout = float(timeout)
        self.agent_id = agent_id if agent_id is not None else (os.environ.get(ENV_AGENT_ID) or None)
        self.session_id = session_id or os.environ.get(ENV_SESSION_ID) or uuid.uuid4().hex
        self.poll_interval = float(poll_interval)
        self._channel = _AsyncChannel(path, inherited, problem)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._channel.where()!r}, agent_id={self.agent_id!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        writer = self._channel.writer
        self._channel.close()
        if writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                await writer.wait_closed()

    async def _call(self, message: Mapping[str, Any], interpret: Callable[[dict[str, Any]], T]) -> T:
        try:
            return await self._channel.request(_encode(message), self.timeout, interpret)
        except _Unreadable as exc:
            raise EngineUnavailable(f"unreadable answer from the engine: {exc}") from None

    async def _govern_once(
        self, tool: str, args: Mapping[str, Any], call_id: str, principal_token: str | None
    ) -> Permit | ToolDenied:
        message = _govern_message(tool, args, call_id, self.agent_id, self.session_id, principal_token)
        try:
            payload = _encode(message)
        except (TypeError, ValueError) as exc:
            return _bad_args(tool, call_id, exc)
        started = time.perf_counter_ns()

        def interpret(reply: dict[str, Any]) -> Permit | ToolDenied:
            return _interpret_govern(reply, tool, call_id, (time.perf_counter_ns() - started) // 1000)

        try:
            return await self._channel.request(payload, self.timeout, interpret)
        except _Unreadable as exc:
            return EngineUnavailable(f"unreadable answer from the engine: {exc}", tool=tool, call_id=call_id)
        except EngineUnavailable as exc:
            exc.tool, exc.call_id = tool, call_id
            return exc

    async def govern(
        self,
        tool: str,
        args: Mapping[str, Any] | None = None,
        *,
        call_id: str | None = None,
        principal_token: str | None = None,
        on_defer: str = "raise",
        defer_timeout: float = DEFAULT_DEFER_TIMEOUT,
        poll_interval: float | None = None,
    ) -> Permit:
        """See :meth:`Client.govern`."""
        import asyncio

        _check_on_defer(on_defer)
        call_id = call_id or uuid.uuid4().hex
        args = {} if args is None else args
        deadline = time.monotonic() + defer_timeout
        interval = self.poll_interval if poll_interval is None else poll_interval
        while True:
            result = await self._govern_once(tool, args, call_id, principal_token)
            if isinstance(result, Permit):
                return result
            if on_defer != "block" or result.effect != DEFER or not result.approval_id:
                raise result
            waiter = _DeferWait(result, deadline, defer_timeout, interval)
            while (pause := waiter.step(await self._try_poll(waiter.token))) is not None:
                await asyncio.sleep(pause)

    async def _try_poll(self, token: str) -> DeferStatus | FarameshError:
        try:
            return await self.poll_defer(token)
        except FarameshError as exc:
            return exc

    async def poll_defer(self, token: str) -> DeferStatus:
        """See :meth:`Client.poll_defer`."""
        message = {"type": "poll_defer", "v": PROTOCOL_VERSION, "defer_token": token}
        return await self._call(message, functools.partial(_interpret_poll, token=token))

    async def complete(self, action_id: str, usage: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """See :meth:`Client.complete`."""
        message = {"type": "complete", "v": PROTOCOL_VERSION, "action_id": action_id, "usage": dict(usage or {})}
        return await self._call(message, _interpret_complete(action_id))

    async def status(self) -> dict[str, Any]:
        """See :meth:`Client.status`."""
        return await self._call({"type": "status", "v": PROTOCOL_VERSION}, _interpret_status)

    async def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> dict[str, Any]:
        """See :meth:`Client.wait_ready`."""
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            try:
                current = await self.status()
                if current["daemon"].get("state") == "READY":
                    return current
                problem = f"the engine is {current['daemon'].get('state')}"
            except EngineUnavailable as exc:
                problem = exc.human_message
            if time.monotonic() >= deadline:
                raise EngineUnavailable(f"the engine was not READY within {timeout:g}s ({problem})")
            await asyncio.sleep(interval)

    def governed(
        self,
        tool: str,
        *,
        on_defer: str = "raise",
        defer_timeout: float = DEFAULT_DEFER_TIMEOUT,
        pass_permit: bool = False,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """``@client.governed("refund")`` on a coroutine function — :func:`governed` bound here."""
        return governed(tool, client=self, on_defer=on_defer, defer_timeout=defer_timeout, pass_permit=pass_permit)


# --------------------------------------------------------------------------------------------- decorator

_defaults_lock = threading.Lock()
_default_client: Client | None = None
_default_async_client: AsyncClient | None = None


def default_client() -> Client:
    """The process-wide :class:`Client` built from the environment (used by ``@governed`` when no
    client is given). Created on first use."""
    global _default_client
    with _defaults_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


def default_async_client() -> AsyncClient:
    """The process-wide :class:`AsyncClient` built from the environment (``@governed`` on a
    coroutine function without a client). It follows whichever event loop is running."""
    global _default_async_client
    with _defaults_lock:
        if _default_async_client is None:
            _default_async_client = AsyncClient()
        return _default_async_client


def governed(
    tool: str,
    *,
    client: Client | AsyncClient | None = None,
    on_defer: str = "raise",
    defer_timeout: float = DEFAULT_DEFER_TIMEOUT,
    pass_permit: bool = False,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a tool function so that every call is governed first.

    The call's arguments become the tool args (parameter name → value, defaults applied; a leading
    ``self``/``cls`` is left out; ``*args`` becomes a list, ``**kwargs`` is merged in). The
    function runs only after a PERMIT; otherwise the ToolDenied (or EngineUnavailable) propagates
    and the function body never executes. With ``pass_permit=True`` the function receives the
    :class:`Permit` as its ``permit`` keyword argument (left out of the tool args), e.g. to use
    ``permit.credential`` or to ``complete(permit.action_id, …)``. Coroutine functions are
    supported (with an :class:`AsyncClient`, or a :class:`Client` run in a worker thread).
    """
    _check_on_defer(on_defer)
    if not isinstance(tool, str) or not tool:
        raise TypeError('governed() needs the tool id, e.g. @governed("refund")')

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if pass_permit:
            if "permit" not in sig.parameters:
                raise TypeError(f"{fn.__qualname__} has no `permit` parameter for pass_permit=True")
            params = [p for p in params if p.name != "permit"]
            sig = sig.replace(parameters=params)
        skip_first = bool(params) and params[0].name in ("self", "cls")
        options: dict[str, Any] = {"on_defer": on_defer, "defer_timeout": defer_timeout}

        if inspect.iscoroutinefunction(fn):
            afn = cast("Callable[..., Awaitable[Any]]", fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                import asyncio

                tool_args = _tool_args(sig, args, kwargs, skip_first)
                chosen = client if client is not None else default_async_client()
                if isinstance(chosen, AsyncClient):
                    permit = await chosen.govern(tool, tool_args, **options)
                else:
                    loop = asyncio.get_running_loop()
                    call = functools.partial(chosen.govern, tool, tool_args, **options)
                    permit = await loop.run_in_executor(None, call)
                if pass_permit:
                    kwargs["permit"] = permit
                return await afn(*args, **kwargs)

            async_wrapper.faramesh_tool = tool  # type: ignore[attr-defined]
            return cast("Callable[P, R]", async_wrapper)

        if isinstance(client, AsyncClient):
            raise TypeError(
                f"{fn.__qualname__} is not a coroutine function; govern it with a Client, not an AsyncClient"
            )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tool_args = _tool_args(sig, args, kwargs, skip_first)
            chosen = client if isinstance(client, Client) else default_client()
            permit = chosen.govern(tool, tool_args, **options)
            if pass_permit:
                kwargs["permit"] = permit
            return fn(*args, **kwargs)

        wrapper.faramesh_tool = tool  # type: ignore[attr-defined]
        return cast("Callable[P, R]", wrapper)

    return decorate


def operator_request(socket_path: str, message: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
    """One request, one reply line over a Unix socket (the operator socket for `apply`, `unlock` and the
    supervisor); None when nothing answers in time or the reply is not a JSON object."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(_encode(message))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
    except (OSError, ValueError):
        return None
    return reply if isinstance(reply, dict) else None
