"""The engine's side of the providers: one supervised child process per declared provider.

    host = ProviderHost(policy.providers, os.environ, log=log)
    host.start()
    result = host.get_secret("vault", "stripe", field="api_key")      # blocking, bounded by the timeout
    result = await host.acall("vault", "get_secret", {...})            # from the event loop
    if isinstance(result, ProviderFailure): deny with result.pipeline_code  (CREDENTIAL_UNAVAILABLE)

Guarantees:
- Nothing here raises into the caller: every call resolves, by its deadline at the latest, to a result
  or a `ProviderFailure` with a stable code. A call to a provider whose process is down fails at once.
- A crashed child is restarted with exponential backoff (reset once a child has stayed up a while).
- Health is HEALTHY | DEGRADED | DOWN with the last error, probed periodically and updated by calls.
- Secrets (the resolved `$env` references, the AWS credentials of the engine's environment) reach the
  child only over the socketpair, and every error or log line is redacted of them.
- This module imports no SDK: boto3 and hvac are imported by the children only.

Threads: per provider one supervisor (spawns, reads replies, restarts), and per child incarnation a
writer and a stderr relay; one ticker for the whole host (call deadlines, periodic probes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeVar

from faramesh.engine.providers.protocol import (
    MAX_SIGN_MESSAGE,
    PROTOCOL_VERSION,
    PROVIDER_DOWN_CODES,
    REQUEST_SCOPED,
    EmitResult,
    FailureCode,
    Health,
    HealthResult,
    ProtocolError,
    ProviderFailure,
    ProviderStatus,
    PublicKeyResult,
    Redactor,
    SecretRef,
    SecretResult,
    SecretValue,
    SignResult,
    b64d,
    b64e,
    backend_module,
    encode_frame,
    failure_code,
    recv_frame,
)
from faramesh.engine.wal.signer import SigningFailed

Outcome = SecretResult | SignResult | PublicKeyResult | EmitResult | HealthResult | ProviderFailure
T = TypeVar("T", SecretResult, SignResult, PublicKeyResult, EmitResult, HealthResult)

DEFAULT_TIMEOUT: Final = 5.0
START_TIMEOUT: Final = 30.0  # spawn + import of the SDK + configure; boto3 alone takes ~0.5 s on a busy box
HEALTH_INTERVAL: Final = 10.0
MISSED_PROBES_BEFORE_KILL: Final = 3  # a child that answers nothing for this many probes is killed
STDERR_LINES_PER_CHILD: Final = 200
STDERR_LINE_MAX: Final = 1000
CHILD_MODULE: Final = "faramesh.engine.providers.child"

# The engine's environment variables an SDK's default credential chain reads. The secret ones travel over
# the socket (never argv or the child's environment); the others are plain settings the child inherits.
AWS_SECRET_ENV: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_PLAIN_ENV: Final = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CA_BUNDLE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    "AWS_ENDPOINT_URL_STS",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)
# hvac reads these file paths at import (TLS trust and client certificates); none is a secret.
VAULT_PLAIN_ENV: Final = ("VAULT_CACERT", "VAULT_CAPATH", "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY")
COMMON_PLAIN_ENV: Final = (
    "HOME",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NO_PROXY",
    "no_proxy",
)


@dataclass(frozen=True)
class Backoff:
    """Restart delays: initial × factor^(n-1), capped; no jitter (a handful of children per engine)."""

    initial: float = 0.2
    factor: float = 2.0
    maximum: float = 30.0
    reset_after: float = 60.0  # a child that stayed up this long was not crash-looping
    crash_loop: int = 5  # this many quick restarts in a row are reported as a crash loop

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * self.factor ** max(0, attempt - 1)))


def _default_restart_wait(name: str, delay: float, stop: threading.Event) -> None:
    stop.wait(delay)


# ---------------------------------------------------------------------------------------------------
# Configuration: resolve `$env` references against the engine's own environment


@dataclass(frozen=True)
class ResolvedConfig:
    config: dict[str, Any]
    secret_fields: tuple[str, ...]
    error: str | None  # why this provider cannot start (a missing variable); never contains a value


def resolve_config(name: str, config: Mapping[str, Any], environ: Mapping[str, str]) -> ResolvedConfig:
    """Pure: `{"$env": "X"}` → environ["X"]. A missing variable is reported, not raised."""
    out: dict[str, Any] = {}
    secret_fields: list[str] = []
    missing: list[str] = []
    for key, value in config.items():
        if isinstance(value, Mapping) and set(value) == {"$env"}:
            var = str(value["$env"])
            secret_fields.append(key)
            if var in environ and environ[var] != "":
                out[key] = environ[var]
            else:
                missing.append(f"{var} (for `{key}`)")
        else:
            out[key] = _thaw(value)
    error = None
    if missing:
        error = f'provider "{name}" cannot start: environment variable {", ".join(missing)} is not set'
    return ResolvedConfig(out, tuple(secret_fields), error)


def _thaw(value: Any) -> Any:
    """Compiled policies are frozen (mappingproxy, tuples); the wire wants plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value


def child_environment(module: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The child's whole environment: plain settings only. No secret ever goes through here."""
    env = {"PATH": environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
    names: Iterable[str] = COMMON_PLAIN_ENV
    if module == "faramesh.engine.providers.aws":
        names = (*COMMON_PLAIN_ENV, *AWS_PLAIN_ENV)
    elif module == "faramesh.engine.providers.vault":
        names = (*COMMON_PLAIN_ENV, *VAULT_PLAIN_ENV)
    for key in names:
        if key in environ:
            env[key] = environ[key]
    return env


def child_ambient(module: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The secret part of the engine's environment a child's SDK needs; sent over the socket."""
    if module != "faramesh.engine.providers.aws":
        return {}
    return {k: environ[k] for k in AWS_SECRET_ENV if environ.get(k)}


# ---------------------------------------------------------------------------------------------------
# Deadlines and periodic work


class _Ticker:
    """One thread that runs callbacks at monotonic instants. Callbacks must be short and never raise."""

    def __init__(self, monotonic: Callable[[], float], on_error: Callable[[str], None]) -> None:
        self._monotonic = monotonic
        self._on_error = on_error
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="provider-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), callback))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = self._monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, callback = heapq.heappop(self._heap)
                        break
                    self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - now))
            try:
                callback()
            except Exception as exc:  # a dead ticker would leave every later call without a deadline
                self._on_error(f"provider host: internal error in a timer callback: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------------
# One provider


_STARTING, _UP, _BACKOFF, _FAILED, _STOPPED = "starting", "up", "backoff", "failed", "stopped"


@dataclass(eq=False)
class _Call:
    verb: str
    args: dict[str, Any]
    future: concurrent.futures.Future[Outcome]
    deadline: float
    timeout: float
    id: int = 0
    probe: bool = False


@dataclass(eq=False)
class _Child:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    started_at: float
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    pending: dict[int, _Call] = field(default_factory=dict)


class _Provider:
    def __init__(self, host: ProviderHost, name: str, declared: Mapping[str, Any]) -> None:
        self.host = host
        self.name = name
        self.type = str(declared.get("type", "?"))
        self.module = backend_module(declared)
        resolved = resolve_config(name, declared, host.environ)
        self.config = resolved.config
        self.secret_fields = resolved.secret_fields
        self.ambient = child_ambient(self.module, host.environ)
        self.env = child_environment(self.module, host.environ)
        self.redact = Redactor()
        for key in self.secret_fields:
            value = self.config.get(key)
            if isinstance(value, str):
                self.redact.add(value)
        for value in self.ambient.values():
            self.redact.add(value)
        raw_timeout = declared.get("timeout")
        self.timeout = float(raw_timeout) if isinstance(raw_timeout, int | float) and raw_timeout > 0 else None
        self.fatal: tuple[FailureCode, str] | None = None
        if resolved.error is not None:
            self.fatal = (FailureCode.CONFIG, resolved.error)
        elif self.module is None:
            backend = f' backend "{declared.get("backend")}"' if self.type == "kms" else ""
            self.fatal = (
                FailureCode.UNSUPPORTED,
                f'provider type "{self.type}"{backend} is not available in this build',
            )

        self.cond = threading.Condition()
        self.state = _STOPPED
        self.child: _Child | None = None
        self.waiting: list[_Call] = []
        self.health = Health.DOWN  # until the first health check says otherwise
        self.last_error: str | None = None
        self.since = host.wall()
        self.restarts = 0
        self.missed_probes = 0
        self.probes = 0  # completed health probes since start(), whatever their outcome
        self.ids = itertools.count(2)  # 1 is `configure`
        self.thread: threading.Thread | None = None
        self.spawning: socket.socket | None = None  # the socket of a child still being configured

    # ---- status
    def status(self) -> ProviderStatus:
        with self.cond:
            pid = self.child.proc.pid if self.child is not None and self.state == _UP else None
            return ProviderStatus(self.name, self.type, self.health, self.last_error, self.since, self.restarts, pid)

    def _set_health(self, health: Health, error: str | None) -> None:
        """Call with self.cond held. Logs a change of health or of the error, not a repeat of either."""
        changed = health != self.health or (error is not None and error != self.last_error)
        if error is not None:
            self.last_error = error
        if health != self.health:
            self.health = health
            self.since = self.host.wall()
        if changed:
            self.host._log(f'provider "{self.name}": {health}' + (f" ({error})" if error else ""))
        self.host._notify()

    def _fail(self, call: _Call, code: FailureCode, message: str) -> ProviderFailure:
        return ProviderFailure(self.name, call.verb, code, self.redact(message))

    @staticmethod
    def _resolve(call: _Call, outcome: Outcome) -> None:
        # The call was removed from `pending`/`waiting` under the lock by whoever resolves it, so at most
        # one party gets here per call; the check only guards against a caller having cancelled it.
        if not call.future.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                call.future.set_result(outcome)

    def _down_message(self) -> str:
        return self.last_error or "the provider process is not running"

    # ---- calls
    def submit(self, call: _Call) -> None:
        with self.cond:
            if self.state == _UP and self.child is not None:
                refused = self._send_locked(call)
                if refused is not None:
                    self._resolve(call, refused)
                    return
            elif self.state == _STARTING:
                self.waiting.append(call)
            else:
                code = self.fatal[0] if self.fatal else FailureCode.DOWN
                failure = self._fail(call, code, self._down_message())
                self._resolve(call, failure)
                return
        self.host._ticker.at(call.deadline, lambda: self._expire(call))

    def _send_locked(self, call: _Call) -> ProviderFailure | None:
        """Queue the request for the writer; a request that cannot be encoded is refused, not raised."""
        assert self.child is not None
        call.id = next(self.ids)
        try:
            frame = encode_frame({"id": call.id, "verb": call.verb, "args": call.args})
        except (ProtocolError, TypeError) as exc:
            return self._fail(call, FailureCode.BAD_REQUEST, f"the request cannot be sent: {exc}")
        self.child.pending[call.id] = call
        self.child.outbox.put(frame)
        return None

    def _expire(self, call: _Call) -> None:
        with self.cond:
            child = self.child
            if child is not None and child.pending.get(call.id) is call:
                del child.pending[call.id]
            elif call in self.waiting:
                self.waiting.remove(call)
            else:
                return  # already answered
            kill = False
            if call.probe:
                self.missed_probes += 1
                self.probes += 1
                kill = self.missed_probes >= MISSED_PROBES_BEFORE_KILL and child is not None
            message = f"no answer within {call.timeout:g} s"
            if kill:
                message += f"; the provider process missed {self.missed_probes} health checks and is restarted"
            if self.health == Health.HEALTHY or kill:
                self._set_health(Health.DOWN if kill else Health.DEGRADED, f"{FailureCode.TIMEOUT}: {message}")
        if kill and child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        self._resolve(call, self._fail(call, FailureCode.TIMEOUT, message))

    def _on_reply(self, child: _Child, frame: Mapping[str, Any]) -> None:
        raw_id = frame.get("id")
        with self.cond:
            call = child.pending.pop(raw_id, None) if isinstance(raw_id, int) else None
        if call is None:
            return  # answered after its deadline: the caller already has a TIMEOUT
        outcome = self._outcome(call, frame)
        with self.cond:
            if call.probe:
                self.probes += 1
                self.missed_probes = 0
            if isinstance(outcome, ProviderFailure):
                if outcome.code in PROVIDER_DOWN_CODES:
                    self._set_health(Health.DOWN, f"{outcome.code}: {outcome.message}")
                elif outcome.code not in REQUEST_SCOPED:
                    self._set_health(
                        Health.DOWN if self.health == Health.DOWN else Health.DEGRADED,
                        f"{outcome.code}: {outcome.message}",
                    )
                else:
                    self.host._notify()
            else:
                self._set_health(Health.HEALTHY, None)
        self._resolve(call, outcome)

    def _outcome(self, call: _Call, frame: Mapping[str, Any]) -> Outcome:
        if frame.get("ok") is not True:
            return self._fail(call, failure_code(frame.get("code")), str(frame.get("message", "")))
        result = frame.get("result")
        try:
            if not isinstance(result, dict):
                raise ProtocolError("the result is not an object")
            return self._typed(call, result)
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            return self._fail(call, FailureCode.PROTOCOL, f"malformed {call.verb} result: {exc}")

    def _typed(self, call: _Call, result: Mapping[str, Any]) -> Outcome:
        if call.verb == "get_secret":
            value = result["value"]
            if not isinstance(value, str | dict):
                raise ProtocolError("a secret is a string or an object")
            version = result.get("version")
            return SecretResult(
                self.name, str(call.args["name"]), SecretValue(value), None if version is None else str(version)
            )
        if call.verb == "sign":
            return SignResult(
                self.name, str(result["key_id"]), str(result["algorithm"]), b64d(result["signature"], "signature")
            )
        if call.verb == "get_public_key":
            from faramesh.engine.providers.signing import UnsupportedKey, algorithm_of

            der = b64d(result["der"], "der")
            try:
                algorithm = algorithm_of(der)
            except UnsupportedKey as exc:
                return self._fail(call, FailureCode.UNSUPPORTED, str(exc))
            if algorithm != result.get("algorithm"):
                raise ProtocolError(f"the key is {algorithm}, the provider said {result.get('algorithm')}")
            return PublicKeyResult(self.name, str(result["key_id"]), algorithm, der)
        if call.verb == "emit":
            accepted = result["accepted"]
            if not isinstance(accepted, int):
                raise ProtocolError("`accepted` is not an integer")
            return EmitResult(self.name, accepted)
        return HealthResult(self.name, str(result.get("detail", "")))

    # ---- lifecycle
    def start(self) -> None:
        with self.cond:
            if self.fatal is not None:
                self.state = _FAILED
                self._set_health(Health.DOWN, f"{self.fatal[0]}: {self.fatal[1]}")
                return
            self.state = _STARTING
        self.thread = threading.Thread(target=self._supervise, name=f"provider-{self.name}", daemon=True)
        self.thread.start()

    def _supervise(self) -> None:
        attempt = 0
        stop = self.host._stop
        while not stop.is_set():
            with self.cond:
                self.state = _STARTING
            child, reason = self._spawn()
            up_for = 0.0
            if child is not None:
                with self.cond:
                    if stop.is_set():
                        self.child = child
                        break
                    self.child = child
                    self.state = _UP
                    waiting, self.waiting = self.waiting, []
                    refused = [(call, self._send_locked(call)) for call in waiting]
                for call, failure in refused:
                    if failure is not None:
                        self._resolve(call, failure)
                self.host._probe_soon(self)
                reason = self._read_replies(child)
                up_for = self.host.monotonic() - child.started_at
                self._retire(child)
                reason = f"{reason} ({self._exit_description(child.proc)})"
            if stop.is_set():
                break
            if self.fatal is not None:
                with self.cond:
                    self.state = _FAILED
                    self._set_health(Health.DOWN, f"{self.fatal[0]}: {self.fatal[1]}")
                    waiting, self.waiting = self.waiting, []
                for call in waiting:
                    self._resolve(call, self._fail(call, self.fatal[0], self.fatal[1]))
                return
            attempt = 1 if up_for >= self.host.backoff.reset_after else attempt + 1
            delay = self.host.backoff.delay(attempt)
            loop = " (crash loop)" if attempt >= self.host.backoff.crash_loop else ""
            message = self.redact(f"{reason}; restart {attempt} in {delay:g} s{loop}")
            with self.cond:
                self.state = _BACKOFF
                self.restarts += 1
                self._set_health(Health.DOWN, f"{FailureCode.DOWN}: {message}")
                waiting, self.waiting = self.waiting, []
            for call in waiting:
                self._resolve(call, self._fail(call, FailureCode.DOWN, message))
            self.host._restart_wait(self.name, delay, stop)
        with self.cond:
            self.state = _STOPPED
            child, self.child = self.child, None
            waiting, self.waiting = self.waiting, []
        if child is not None:
            self._retire(child)
        for call in waiting:
            self._resolve(call, self._fail(call, FailureCode.DOWN, "the engine is shutting down"))

    def _spawn(self) -> tuple[_Child | None, str]:
        """Start a child and configure it. (child, "") or (None, why not)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = child_sock.fileno()
        cmd = [self.host.python, "-I", "-m", CHILD_MODULE, "--fd", str(fd), "--parent", str(os.getpid())]
        try:
            proc = subprocess.Popen(
                cmd,
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self.env,
                close_fds=True,
            )
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            return None, f"cannot start the provider process: {exc.strerror or exc}"
        finally:
            if child_sock.fileno() != -1:
                child_sock.close()
        child = _Child(proc, parent_sock, self.host.monotonic())
        with self.cond:
            self.spawning = parent_sock
        assert proc.stderr is not None
        threading.Thread(
            target=self._relay_stderr, args=(proc.pid, proc.stderr), name=f"provider-{self.name}-stderr", daemon=True
        ).start()
        configure = {
            "id": 1,
            "verb": "configure",
            "args": {
                "name": self.name,
                "protocol": PROTOCOL_VERSION,
                "config": self.config,
                "secret_fields": list(self.secret_fields),
                "ambient": self.ambient,
            },
        }
        try:
            parent_sock.settimeout(self.host.start_timeout)
            parent_sock.sendall(encode_frame(configure))
            reply = recv_frame(parent_sock)
            parent_sock.settimeout(None)
        except TimeoutError:
            if self.host._stop.is_set():
                self._retire(child)
                return None, "the engine is shutting down"
            self._retire(child)
            return None, f"the provider process did not start within {self.host.start_timeout:g} s"
        except (OSError, ProtocolError) as exc:
            self._retire(child)
            if self.host._stop.is_set():
                return None, "the engine is shutting down"
            return None, f"the provider process failed during start-up ({self._exit_description(proc)}: {exc})"
        finally:
            with self.cond:
                self.spawning = None
        if reply is None:
            self._retire(child)
            return None, f"the provider process exited during start-up ({self._exit_description(proc)})"
        if reply.get("ok") is not True:
            code = failure_code(reply.get("code"))
            message = self.redact(str(reply.get("message", "")))
            self._retire(child)
            if code in (FailureCode.CONFIG, FailureCode.UNSUPPORTED):
                self.fatal = (code, message)  # a restart cannot fix the configuration
            return None, f"{code}: {message}"
        threading.Thread(target=self._write, args=(child,), name=f"provider-{self.name}-writer", daemon=True).start()
        self.host._log(f'provider "{self.name}": process {proc.pid} started')
        return child, ""

    def _write(self, child: _Child) -> None:
        while True:
            data = child.outbox.get()
            if data is None:
                return
            try:
                child.sock.sendall(data)
            except OSError:
                return  # the reader sees the same end of the connection and handles it

    def _read_replies(self, child: _Child) -> str:
        while True:
            try:
                frame = recv_frame(child.sock)
            except ProtocolError as exc:
                return f"the provider process broke the protocol ({exc})"
            except OSError as exc:
                return f"lost the connection to the provider process ({exc.strerror or exc})"
            if frame is None:
                return "the provider process exited"
            self._on_reply(child, frame)

    def _retire(self, child: _Child) -> None:
        """Close the connection, make sure the process is gone, fail its in-flight calls."""
        child.outbox.put(None)
        with contextlib.suppress(OSError):
            child.sock.shutdown(socket.SHUT_RDWR)
        child.sock.close()
        proc = child.proc
        try:
            proc.wait(timeout=1.0)  # the child leaves by itself on EOF
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        with self.cond:
            pending = list(child.pending.values())
            child.pending.clear()
            if self.child is child:
                self.child = None
        why = f"the provider process exited ({self._exit_description(proc)})"
        for call in pending:
            self._resolve(call, self._fail(call, FailureCode.DOWN, why))

    @staticmethod
    def _exit_description(proc: subprocess.Popen[bytes]) -> str:
        rc = proc.poll()
        if rc is None:
            return "still running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit status {rc}"

    def _relay_stderr(self, pid: int, stream: IO[bytes]) -> None:
        lines = 0
        with stream:
            for raw in stream:
                lines += 1
                if lines > STDERR_LINES_PER_CHILD:
                    continue  # keep draining so the child never blocks on a full pipe
                text = raw.decode("utf-8", "replace").rstrip()[:STDERR_LINE_MAX]
                if lines == STDERR_LINES_PER_CHILD:
                    text = "(further output of this process is not logged)"
                if text:
                    self.host._log(f'provider "{self.name}" [{pid}]: {self.redact(text)}')

    def stop(self) -> None:
        with self.cond:
            socks = [s for s in (self.child.sock if self.child else None, self.spawning) if s is not None]
        for sock in socks:
            # EOF makes the child leave; _supervise's reader then returns and retires it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self.thread is not None:
            self.thread.join(10)


# ---------------------------------------------------------------------------------------------------
# The host


class ProviderHost:
    def __init__(
        self,
        providers: Mapping[str, Mapping[str, Any]],
        environ: Mapping[str, str],
        *,
        log: Callable[[str], None] | None = None,
        python: str = sys.executable,
        backoff: Backoff | None = None,
        health_interval: float = HEALTH_INTERVAL,
        start_timeout: float = START_TIMEOUT,
        default_timeout: float = DEFAULT_TIMEOUT,
        restart_wait: Callable[[str, float, threading.Event], None] = _default_restart_wait,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`providers`: the compiled `provider` blocks this host runs (see protocol.hosted); `environ`: the
        engine's own environment, which `$env` references are resolved against."""
        self.environ = dict(environ)
        self.python = python
        self.backoff = backoff or Backoff()
        self.health_interval = health_interval
        self.start_timeout = start_timeout
        self.default_timeout = default_timeout
        self.monotonic = monotonic
        self.wall = wall
        self._restart_wait = restart_wait
        self._log_sink = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._generation = 0
        self._ticker = _Ticker(monotonic, self._log)
        self._started = False
        self._providers = {name: _Provider(self, name, cfg) for name, cfg in providers.items()}
        self._redact = Redactor()
        for p in self._providers.values():
            for key in p.secret_fields:
                value = p.config.get(key)
                if isinstance(value, str):
                    self._redact.add(value)
            for value in p.ambient.values():
                self._redact.add(value)

    # ---- lifecycle
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._ticker.start()
        for p in self._providers.values():
            p.start()
            self._schedule_probe(p)

    def close(self) -> None:
        self._stop.set()
        for p in self._providers.values():
            p.stop()
        self._ticker.stop()
        self._notify()

    def __enter__(self) -> ProviderHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- status
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._providers)

    def status(self) -> list[ProviderStatus]:
        return [p.status() for p in self._providers.values()]

    def status_of(self, name: str) -> ProviderStatus | None:
        p = self._providers.get(name)
        return p.status() if p is not None else None

    def wait_for(self, predicate: Callable[[ProviderHost], bool], timeout: float) -> bool:
        """Wait until `predicate(self)` holds (re-checked on every provider state change)."""
        # The predicate takes provider locks, and providers notify while holding theirs: so it runs
        # outside `_changed`, and a generation counter catches a change that lands in between.
        deadline = self.monotonic() + timeout
        while True:
            with self._changed:
                generation = self._generation
            if predicate(self):
                return True
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                if self._generation == generation:
                    self._changed.wait(min(remaining, 0.5))

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every provider has either answered (or missed) its first health check or failed to
        start: the moment `status` becomes meaningful after start-up."""

        def settled(_: ProviderHost) -> bool:
            return all(p.probes > 0 or p.state in (_FAILED, _BACKOFF) for p in self._providers.values())

        return self.wait_for(settled, timeout)

    def probe(self, name: str, timeout: float | None = None) -> ProviderStatus | None:
        """Run a health check now and return the status it leaves (blocking)."""
        p = self._providers.get(name)
        if p is None:
            return None
        self._wait(name, "health", {}, timeout, probe=True)
        return p.status()

    # ---- calls (each resolves to a result or a ProviderFailure, by its deadline)
    def submit(
        self, provider: str, verb: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> concurrent.futures.Future[Outcome]:
        return self._call(provider, verb, dict(args or {}), timeout)

    async def acall(
        self, provider: str, verb: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Outcome:
        return await asyncio.wrap_future(self.submit(provider, verb, args, timeout))

    def get_secret(
        self,
        provider: str,
        name: str,
        *,
        field: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
    ) -> SecretResult | ProviderFailure:
        args: dict[str, Any] = {"name": name}
        if field is not None:
            args["field"] = field
        if version is not None:
            args["version"] = version
        return self._expect(self._wait(provider, "get_secret", args, timeout), SecretResult)

    def get_secret_ref(self, ref: SecretRef, timeout: float | None = None) -> SecretResult | ProviderFailure:
        return self.get_secret(ref.provider, ref.name, field=ref.field, timeout=timeout)

    def sign(self, provider: str, message: bytes, timeout: float | None = None) -> SignResult | ProviderFailure:
        if len(message) > MAX_SIGN_MESSAGE:
            return ProviderFailure(
                provider, "sign", FailureCode.BAD_REQUEST, f"a signed message is at most {MAX_SIGN_MESSAGE} bytes"
            )
        return self._expect(self._wait(provider, "sign", {"message": b64e(message)}, timeout), SignResult)

    def get_public_key(
        self, provider: str, key_id: str | None = None, timeout: float | None = None
    ) -> PublicKeyResult | ProviderFailure:
        args = {"key_id": key_id} if key_id else {}
        return self._expect(self._wait(provider, "get_public_key", args, timeout), PublicKeyResult)

    def emit(
        self, provider: str, records: list[dict[str, Any]], timeout: float | None = None
    ) -> EmitResult | ProviderFailure:
        return self._expect(self._wait(provider, "emit", {"records": records}, timeout), EmitResult)

    # ---- internals
    def _limit(self, provider: str, timeout: float | None) -> float:
        if timeout is not None and timeout > 0:
            return timeout
        p = self._providers.get(provider)
        return (p.timeout if p is not None else None) or self.default_timeout

    def _wait(
        self, provider: str, verb: str, args: dict[str, Any], timeout: float | None, *, probe: bool = False
    ) -> Outcome:
        """Block for the outcome. The ticker resolves every call by its deadline; the backstop only
        matters if that machinery itself broke, and even then the caller gets a typed failure."""
        future = self._call(provider, verb, args, timeout, probe=probe)
        try:
            return future.result(timeout=self._limit(provider, timeout) + 5.0)
        except concurrent.futures.TimeoutError:
            return ProviderFailure(provider, verb, FailureCode.TIMEOUT, "no answer (the deadline was not enforced)")

    @staticmethod
    def _expect(outcome: Outcome, kind: type[T]) -> T | ProviderFailure:
        if isinstance(outcome, kind | ProviderFailure):
            return outcome
        raise AssertionError(f"a {type(outcome).__name__} answered a call expecting {kind.__name__}")

    def _call(
        self, provider: str, verb: str, args: dict[str, Any], timeout: float | None, *, probe: bool = False
    ) -> concurrent.futures.Future[Outcome]:
        future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        p = self._providers.get(provider)
        if p is None:
            message = f'no provider named "{provider}" is declared'
            future.set_result(ProviderFailure(provider, verb, FailureCode.CONFIG, message))
            return future
        if not self._started or self._stop.is_set():
            state = "stopped" if self._stop.is_set() else "not started"
            future.set_result(ProviderFailure(provider, verb, FailureCode.DOWN, f"the provider host is {state}"))
            return future
        limit = self._limit(provider, timeout)
        p.submit(_Call(verb, args, future, self.monotonic() + limit, limit, probe=probe))
        return future

    def _schedule_probe(self, p: _Provider) -> None:
        def tick() -> None:
            if self._stop.is_set():
                return
            with p.cond:
                up = p.state == _UP
            if up:
                self._call(p.name, "health", {}, None, probe=True)
            self._schedule_probe(p)

        self._ticker.at(self.monotonic() + self.health_interval, tick)

    def _probe_soon(self, p: _Provider) -> None:
        if not self._stop.is_set():
            self._call(p.name, "health", {}, None, probe=True)

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _log(self, line: str) -> None:
        with contextlib.suppress(Exception):  # a broken log sink must not break a provider
            self._log_sink(self._redact(line))


# ---------------------------------------------------------------------------------------------------
# Checkpoint signing through a KMS provider


class RemoteSigner:
    """Signs through a `kms` provider; the engine never holds the private key. The public key is fetched
    once and pinned; every signature is verified against it before it is handed out, so a swapped or
    rotated key shows up as PROVIDER_KEY_MISMATCH instead of as checkpoints `audit verify` rejects later."""

    def __init__(self, host: ProviderHost, provider: str, *, timeout: float | None = None) -> None:
        self.host = host
        self.provider = provider
        self.timeout = timeout
        self.pinned: PublicKeyResult | None = None

    def pin(self) -> PublicKeyResult | ProviderFailure:
        if self.pinned is not None:
            return self.pinned
        result = self.host.get_public_key(self.provider, timeout=self.timeout)
        if isinstance(result, PublicKeyResult):
            self.pinned = result
        return result

    def sign(self, message: bytes) -> SignResult | ProviderFailure:
        from faramesh.engine.providers.signing import verify

        pinned = self.pin()
        if isinstance(pinned, ProviderFailure):
            return ProviderFailure(self.provider, "sign", pinned.code, pinned.message)
        result = self.host.sign(self.provider, message, timeout=self.timeout)
        if isinstance(result, ProviderFailure):
            return result
        if result.key_id != pinned.key_id or not verify(pinned.algorithm, pinned.der, message, result.signature):
            return ProviderFailure(
                self.provider,
                "sign",
                FailureCode.KEY_MISMATCH,
                f"the signature from key {result.key_id} does not verify against the pinned key {pinned.key_id} "
                f"({pinned.fingerprint})",
            )
        return result


class SigningUnavailable(SigningFailed):
    """The KMS could not sign (down, timed out, key changed). The WAL keeps the checkpoint queued."""

    def __init__(self, failure: ProviderFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class CheckpointSigner:
    """The WAL's signer interface (`fingerprint`, `public_b64`, `sign(message) -> base64`, as
    faramesh.engine.wal.signer.LocalSigner) over a `kms` provider. `sign` blocks for one KMS round trip
    (bounded by the provider's timeout) and raises SigningUnavailable instead of returning a bad value;
    call it off the event loop. Stored checkpoints verify with signing.verify_checkpoint."""

    def __init__(self, remote: RemoteSigner, pinned: PublicKeyResult) -> None:
        from faramesh.engine.providers.signing import checkpoint_public_b64

        self.signer = remote
        self.provider = remote.provider
        self.key_id = pinned.key_id
        self.algorithm = pinned.algorithm
        self.fingerprint = pinned.fingerprint
        self.public_b64 = checkpoint_public_b64(pinned.algorithm, pinned.der)
        # The WAL's signer interface: a network round trip, never on the event loop.
        self.remote = True

    @classmethod
    def connect(
        cls, host: ProviderHost, provider: str, *, timeout: float | None = None
    ) -> CheckpointSigner | ProviderFailure:
        remote = RemoteSigner(host, provider, timeout=timeout)
        pinned = remote.pin()
        if isinstance(pinned, ProviderFailure):
            return pinned
        return cls(remote, pinned)

    @classmethod
    def from_pin(
        cls, host: ProviderHost, provider: str, key_id: str, der: bytes, *, timeout: float | None = None
    ) -> CheckpointSigner:
        """A signer for a key pinned earlier (recorded in the WAL), without asking the KMS now: an engine
        restarting while its KMS is down keeps its pin, queues checkpoints, and signs once the KMS is back
        (every signature still verified against this pin)."""
        from faramesh.engine.providers.signing import algorithm_of

        pinned = PublicKeyResult(provider, key_id, algorithm_of(der), der)
        remote = RemoteSigner(host, provider, timeout=timeout)
        remote.pinned = pinned
        return cls(remote, pinned)

    def sign(self, message: bytes) -> str:
        result = self.signer.sign(message)
        if isinstance(result, ProviderFailure):
            raise SigningUnavailable(result)
        return b64e(result.signature)
