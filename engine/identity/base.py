"""What every identity verifier shares: the result type, the typed codes, health, and the background fetch.

A verifier never does network I/O on the caller's thread. Key material (a JWKS, a Workload API snapshot)
is fetched by `Fetch`, on a daemon thread of its own, and swapped in as one immutable object; a decision
reads whatever snapshot is current. When a decision needs material it does not have, it waits for the
fetch at most `timeout` seconds and is then denied (fail closed); the fetch carries on, bounded by its own
socket timeout, and helps the calls that come after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

# Wire codes (engine/protocol.py's list; the first is DESIGN.md §2's, the other two are new).
IDENTITY_MISMATCH = "IDENTITY_MISMATCH"  # a verified identity that is not this agent's
IDENTITY_INVALID = "IDENTITY_INVALID"  # a credential that failed verification (expired, bad signature, …)
IDENTITY_UNAVAILABLE = "IDENTITY_UNAVAILABLE"  # the verifier could not decide in time (issuer or Workload API down)

HEALTHY, DEGRADED, DOWN = "HEALTHY", "DEGRADED", "DOWN"

METHOD_PEERCRED = "peercred"
METHOD_OIDC = "oidc"
METHOD_SPIFFE = "spiffe"

DEFAULT_TIMEOUT = 2.0  # the longest a decision waits for key material it does not have yet

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class IdentityConfigError(ValueError):
    """An `identity` block the engine cannot use; raised at start, so the engine refuses to start."""

    code = "IDENTITY_CONFIG"


class FetchError(Exception):
    """Key material could not be fetched. The message is safe to show: it names no token or secret."""


class PeerInfo(Protocol):
    """What the server knows about the connection (engine/pipeline.Peer satisfies it)."""

    @property
    def role(self) -> str: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def socket(self) -> str: ...


@dataclass(frozen=True, slots=True)
class IdentityResult:
    """The outcome of one verification.

    `claims` are what conditions see as `principal.*` (empty unless ok). `record` is what the DPR's
    `identity` object gains: strings and integers only, never a token or a claim beyond who and by whom.
    `reason` refines `code` for people and tests (expired, audience, unknown_kid, …)."""

    ok: bool
    method: str
    subject: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    code: str | None = None
    reason: str | None = None
    message: str = ""
    record: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)


def denied(method: str, code: str, reason: str, message: str, **record: Any) -> IdentityResult:
    return IdentityResult(
        ok=False,
        method=method,
        code=code,
        reason=reason,
        message=message,
        record=MappingProxyType({"method": method, "failure": reason, **record}),
    )


T = TypeVar("T")


class Fetch(Generic[T]):
    """Runs a blocking fetch on a daemon thread; callers that ask while one is running share it.

    A daemon thread rather than a pool: a fetch stuck on a dead peer must never hold the engine's exit."""

    def __init__(self, name: str, fetch: Callable[[], T], on_done: Callable[[T | None, BaseException | None], None]):
        self._name = name
        self._fetch = fetch
        self._on_done = on_done
        self._lock = threading.Lock()
        self._running: concurrent.futures.Future[None] | None = None

    def trigger(self) -> concurrent.futures.Future[None]:
        with self._lock:
            if self._running is not None and not self._running.done():
                return self._running
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()  # running: a waiter that gives up cannot cancel it for others
            self._running = future
        threading.Thread(target=self._run, args=(future,), name=f"identity-{self._name}", daemon=True).start()
        return future

    def _run(self, future: concurrent.futures.Future[None]) -> None:
        try:
            value = self._fetch()
        except Exception as exc:  # any failure of the fetch is reported to the verifier, never raised into a thread
            self._on_done(None, exc)
        else:
            self._on_done(value, None)
        finally:
            future.set_result(None)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running is not None and not self._running.done()

    async def wait(self, timeout: float) -> bool:
        """Trigger a fetch (or join the running one) and wait up to `timeout`; False when it did not finish."""
        future = self.trigger()
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except TimeoutError:
            return False
        return True


def safe_error(exc: BaseException) -> str:
    """A one-line description of a fetch failure for `status` and denials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_field(value: Any, environ: Mapping[str, str], what: str) -> Any:
    """A compiled `{"$env": "X"}` reference resolved from the engine's environment (DESIGN.md §4)."""
    if isinstance(value, Mapping) and set(value) == {"$env"}:
        name = str(value["$env"])
        if name not in environ:
            raise IdentityConfigError(f"{what} refers to ${name}, which is not set in the engine's environment")
        return environ[name]
    return value
