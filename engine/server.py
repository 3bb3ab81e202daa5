"""The engine daemon: asyncio Unix-socket server, lifecycle, framing bounds, WAL-first replies.

Lifecycle STARTING → INITIALIZING → READY → DRAINING → HALT. Sockets are bound at STARTING so a
client gets DAEMON_NOT_READY (never a permit) until the WAL is open, verified and replayed.
Authorization is by which socket a peer reached (DESIGN.md §2): an agent socket fixes the agent id
and accepts only agent verbs; the operator socket accepts every verb; in dev one socket serves both.

Providers (`serve`): the declared provider blocks run as supervised children (engine/providers/host.py),
started during INITIALIZING. A permit whose rule names a credential gets it from its provider after the
decision and before the DPR append (a failure or timeout denies with CREDENTIAL_UNAVAILABLE); the value
goes into the reply only, after the commit. `dev` hands out `STUB-<id>` values instead.

Checkpoint signing (`serve` with a SigningSetup): the engine's local key, or the one `kms` provider; the
key in force is pinned in the WAL meta (`signing_key`), KMS keys also in `<state>/checkpoint-keys.json`.
A change of key appends a `provider_change` DPR and the old key signs the checkpoint at that record (the
hand-over); a KMS that is down at start with a known pin keeps its pin (checkpoints queue), one never
pinned is pinned in the background once it answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from faramesh import sdnotify
from faramesh.engine.alerts import AlertConfig, AlertDispatcher
from faramesh.engine.egress import EgressConfigError, validate_policy
from faramesh.engine.egress_service import EgressService, egress_blocks
from faramesh.engine.identity import IdentityVerifier
from faramesh.engine.pipeline import (
    EngineState,
    Peer,
    Reservation,
    Verdict,
    credential_for,
    credential_route,
    credential_ttl,
    deny_credential,
    grant_credential,
)
from faramesh.engine.policy.evaluate import PERMIT
from faramesh.engine.policy.limits import (
    EXPIRED,
    FLEET,
    GRANTED,
    UNAVAILABLE,
    UNKNOWN,
    FleetOutcome,
    FleetSettlement,
    estimate_cost_cents,
)
from faramesh.engine.policy.model import CompiledPolicy, thaw
from faramesh.engine.policy.schema import DEFAULT_FLEET
from faramesh.engine.protocol import (
    AGENT_VERBS,
    MAX_FRAME,
    Message,
    ProtocolError,
    decode,
    encode_error,
    encode_result,
)
from faramesh.engine.providers.host import CheckpointSigner, ProviderHost
from faramesh.engine.providers.protocol import (
    FailureCode,
    Health,
    ProviderFailure,
    SecretResult,
    SecretValue,
    parse_secret_ref,
)
from faramesh.engine.proxy_host import ProxyError
from faramesh.engine.sinks import SinkDispatcher
from faramesh.engine.wal.log import Head, Wal, decode_body, new_ulid, rfc3339
from faramesh.engine.wal.signer import (
    CheckpointKey,
    LocalSigner,
    SignerPin,
    SigningFailed,
    add_pin,
    checkpoint_message,
    key_fingerprint,
    read_pins,
    verify_checkpoint_signature,
)
from faramesh.engine.wal.store import Batch, Checkpoint, StoreError
from faramesh.engine.wal.verify import verify_chain

if TYPE_CHECKING:  # never at run time: psycopg is loaded only when the policy selects PostgreSQL
    from faramesh.engine.wal.pg_store import FleetBudgets

IDLE_PARTIAL_LINE_S = 10.0
MAX_CENTS = 2**53  # DPR integers stay within JSON's exact range (RFC 8785)
MAX_TOTAL_BUFFERED = 64 * 1024 * 1024
READ_CHUNK = 65536
MAX_SOCKET_BUFFERED = MAX_TOTAL_BUFFERED // 4  # per socket, i.e. per agent: one agent cannot fill it all
YIELD_EVERY = 32  # lines served from one read before other connections get a turn
LISTEN_BACKLOG = 4096  # asyncio's default (100) makes connects fail with EAGAIN under 1,000 concurrent clients
STARTING, INITIALIZING, READY, DRAINING, HALT = "STARTING", "INITIALIZING", "READY", "DRAINING", "HALT"
DEFAULT_SIGNING_TIMEOUT = 5.0  # runtime.signing_timeout: how long a permit waits for its checkpoint
PIN_RETRY_S = 2.0  # a KMS never pinned (down at start) is asked for its key again this often
META_SIGNING_KEY = "signing_key"  # WAL meta: the pin of the key that signs this chain's checkpoints


@dataclass(frozen=True)
class SigningSetup:
    """How `serve` signs checkpoints. `provider`: the stack's `kms` provider (None: the local key)."""

    local: LocalSigner  # the engine's own key (state dir): the signer without a kms, the old key of a switch
    provider: str | None = None
    provider_config: Mapping[str, Any] | None = None  # compiled: secrets are `$env` references
    pins_file: Path | None = None
    timeout: float = 10.0  # for pinning the KMS key at start (the provider child may still be starting)


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
    idle_partial_line_s: float = IDLE_PARTIAL_LINE_S  # tests shorten it
    egress_intake: Path | None = None  # where launches hand over sandbox listeners (engine/egress_service.py)


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
        alerts: AlertDispatcher | None = None,
        environ: Mapping[str, str] | None = None,
        providers: ProviderHost | None = None,
        signing: SigningSetup | None = None,
        sinks: SinkDispatcher | None = None,
        identity: IdentityVerifier | None = None,
        fleet: FleetBudgets | None = None,
    ) -> None:
        """`alerts`: the dispatcher (default: one configured from the policy and `environ`, which is the
        engine's own environment unless given; a secret it references but that is unset raises
        MissingEnvironment, a ValueError, so the engine does not start). `providers`: the host of the
        declared provider children (started during INITIALIZING, closed at HALT). `signing`: how
        checkpoints are signed and pinned (None: whatever key `wal` was built with, unpinned)."""
        self.environ = environ if environ is not None else os.environ
        self.providers = providers
        self.signing = signing
        self.signing_timeout = float(policy.runtime.get("signing_timeout", DEFAULT_SIGNING_TIMEOUT))
        self._signer_pin: SignerPin | None = None  # the pin of the key in force (signing setups only)
        self._pending_pin: tuple[SignerPin | None, SigningSetup] | None = None  # a KMS not pinned yet
        self._pin_task: asyncio.Task[None] | None = None
        self._last_pin_error: str | None = None
        self.alerts = alerts or AlertDispatcher(
            AlertConfig.from_policy(policy, self.environ, dev=config.dev), log=self._log
        )
        # Who the caller is, beyond the socket it reached (engine/identity/): a block the engine cannot use
        # raises IdentityConfigError (a ValueError) here, so the engine does not start.
        # dev stubs identity (DESIGN.md §3: spiffe://dev.local/<agent>), like every other provider.
        self.identity = identity or (
            IdentityVerifier(dev=True) if config.dev else IdentityVerifier.from_policy(policy, self.environ)
        )
        self.sinks = sinks  # committed DPRs to the SIEM (engine/sinks/): spooled, off the decision path
        self.fleet = fleet  # fleet budgets (`scope = "fleet"`), in the PostgreSQL database of the WAL
        self._fleet_problem: str | None = None  # logged once per new reason, not once per denied call
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
        self._buffered_by: dict[Path, int] = {}
        self.connections: set[asyncio.StreamWriter] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        self.egress: EgressService | None = None
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
        try:
            await self._bind()
        except OSError as exc:  # a runtime failure (exit 4), reported without a traceback
            self._log(f"cannot bind the engine sockets: {exc}; HALT")
            self.lifecycle = HALT
            await self._close_sockets()
            return 4
        self.lifecycle = INITIALIZING
        try:
            await asyncio.wait_for(self._initialise_in_thread(), self.config.cold_start_deny_window)
        except TimeoutError:
            self._log(f"engine not READY within cold_start_deny_window ({self.config.cold_start_deny_window}s): HALT")
            self.lifecycle = HALT
            await self._close_sockets()
            return 4
        except (ChainBroken, StoreError, sqlite3.Error, ValueError) as exc:
            self._log(f"refusing to start: {exc}")
            self.lifecycle = HALT
            await self._close_sockets()
            # An unreachable database or a chain another engine holds is a runtime failure (4); a broken
            # or unreadable chain is a refusal (1).
            return 4 if getattr(exc, "code", "") in ("WAL_UNAVAILABLE", "WAL_CHAIN_LOCKED") else 1
        self.wal.start()
        if self._pending_pin is not None:
            self._pin_task = asyncio.create_task(self._pin_later(), name="pin-signer")
        self.alerts.start()
        for problem in self.alerts.check_policy(self.policy):
            self._log(problem)
        await self._ensure_egress(None)
        self.identity.start()
        try:
            activated = await self._record_policy_activation(
                "start", self.policy.version, self.wal.meta.get("policy_version")
            )
            if activated is not None:
                self.applied_at = activated
        except StoreError as exc:  # status shows the WAL degraded; every decision is denied until it heals
            self._log(f"could not record the policy activation: {exc}")
        self.lifecycle = READY
        self._log(f"READY: policy {self.policy.version[:16]}, WAL {self.wal.store.description}")
        sdnotify.notify("READY=1", self.environ)
        watchdog = asyncio.create_task(self._watchdog())
        await self._stop.wait()
        sdnotify.notify("STOPPING=1", self.environ)
        watchdog.cancel()
        await self.drain()
        return self.exit_code

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from a timer on the event loop (never from traffic): a wedged loop stops ticking
        and systemd restarts the engine; an idle one keeps ticking."""
        interval = sdnotify.watchdog_interval(self.environ)
        while interval is not None:
            sdnotify.notify("WATCHDOG=1", self.environ)
            await asyncio.sleep(interval)

    async def _initialise_in_thread(self) -> None:
        """Run `_initialise` on a daemon thread: when it hangs past cold_start_deny_window the engine
        still halts and exits (a pool thread would hold the interpreter's exit until it returned)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def target() -> None:
            outcome: BaseException | None = None
            try:
                self._initialise()
            except BaseException as exc:
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the engine already halted
                loop.call_soon_threadsafe(settle, outcome)

        threading.Thread(target=target, name="engine-init", daemon=True).start()
        await done

    def _initialise(self) -> None:
        """Start the providers, open the WAL, verify from the last verified checkpoint, replay state,
        settle the checkpoint signer (pin, or hand over to a new key), sign any unsigned tail."""
        validate_policy(self.policy)  # an egress entry the engine cannot read refuses the start (ValueError)
        if self.providers is not None:
            self.providers.start()
            # READY with every provider's first health check answered (or failed): `status` means something
            # from the first moment, and a provider that cannot start is DOWN, not "not yet known".
            settle = max(1.0, min(15.0, self.config.cold_start_deny_window / 2))
            if not self.providers.wait_settled(settle):
                self._log(f"providers not all settled within {settle:g}s; serving (calls to them wait or fail)")
        self.wal.open()
        head_seq = self.wal.seq
        start_seq, prev = 1, None
        anchor = self._last_verified_checkpoint(head_seq)
        if anchor is not None:
            start_seq, prev = anchor.seq + 1, anchor.head_hash
        report = verify_chain(
            self.wal.chain_id, self.wal.store.records(start_seq), [], start_seq=start_seq, start_prev_hash=prev
        )
        if not report.ok:
            raise ChainBroken(
                f"WAL chain broken at seq {report.offender_seq} (record {report.offender_id}): {report.problem}"
            )
        if (report.last_seq or start_seq - 1) != head_seq:
            raise ChainBroken(f"WAL head moved during verification (expected seq {head_seq})")
        now = self.clock()
        recent = (decode_body(r.body) for r in self.wal.store.records(max(1, self.wal.seq - 200_000)))
        self.state.replay(recent, self.wal.store.approvals(), now)
        if self.fleet is not None and _has_fleet_budgets(self.policy):
            self.fleet.open()  # the tables exist (or the role may not create them: refuse now, not per call)
        applied = self.wal.meta.get("policy_version")
        if applied == self.policy.version and self.wal.meta.get("policy_applied_at"):
            self.applied_at = self.wal.meta["policy_applied_at"]
        if self.sinks is not None:
            # Whatever was committed after the sinks last had it safely spooled (a crash between the WAL
            # commit and the hand-off) is offered again; the sinks de-duplicate by DPR id.
            after = self.sinks.resume_seq(self.wal.chain_id)
            if after is not None and after < self.wal.seq:
                self.sinks.offer_committed(self.wal.chain_id, self.wal.store.records(after + 1))
            self.sinks.start()
        if self.signing is not None:
            self._settle_signer(self.signing)
        if self.wal.recovery_checkpoint_needed() and not self.wal.write_checkpoint_sync("recovery"):
            self._log(f"the recovery checkpoint is queued until the signer answers ({self.wal.signing_error})")

    def _trusted_keys(self) -> dict[str, str]:
        """Keys whose checkpoints anchor start-up verification: the key the WAL was built with, the
        engine's local key and every KMS key it pinned (state dir, not the WAL: a WAL rewritten by someone
        else cannot make the engine trust a key of theirs)."""
        keys: dict[str, str] = {}
        if self.wal.signer is not None:
            keys[self.wal.signer.fingerprint] = self.wal.signer.public_b64
        if self.signing is not None:
            keys[self.signing.local.fingerprint] = self.signing.local.public_b64
            if self.signing.pins_file is not None:
                for pin in read_pins(self.signing.pins_file):
                    keys.setdefault(pin.fingerprint, pin.public_key)
        return keys

    def _last_verified_checkpoint(self, head_seq: int) -> Checkpoint | None:
        """The newest checkpoint a trusted key signed over the head hash stored at its seq; start-up
        verification starts after it. A checkpoint beyond the head means records were removed."""
        trusted = self._trusted_keys()
        for cp in reversed(self.wal.store.checkpoints()):
            if trusted.get(cp.key_fingerprint) != cp.public_key:
                continue
            message = checkpoint_message(self.wal.chain_id, cp.seq, cp.head_hash)
            if not verify_checkpoint_signature(cp.key_fingerprint, cp.public_key, message, cp.signature):
                continue
            if cp.seq > head_seq:
                raise ChainBroken(
                    f"WAL chain broken: a signed checkpoint covers seq {cp.seq} but the last record is seq {head_seq}"
                )
            at = next(iter(self.wal.store.records(cp.seq, cp.seq)), None)
            if at is None or at.record_hash != cp.head_hash:
                continue
            return cp
        return None

    async def _record_policy_activation(self, reason: str, version: str, previous: str | None) -> str | None:
        """Record which policy version is in force, once per change (at start or reload): replayed at
        start-up, so `applied_at` survives restarts. Returns the activation time (None: unchanged)."""
        if previous == version:
            return None
        now, record_id, timestamp = self._ids()
        record = {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "policy_activated",
            "policy_version": version,
            "previous_policy_version": previous,
            "reason": reason,
            "dev": self.state.dev,
        }
        meta = {"policy_version": version, "policy_applied_at": timestamp}
        await self.wal.append(record, meta=meta)
        self.wal.meta.update(meta)
        return timestamp

    # ---- checkpoint signer: pin, keep, or hand over (signing setups, i.e. `serve`)
    def _settle_signer(self, setup: SigningSetup) -> None:
        """Start-up (init thread, before the committer runs): decide which key signs from now on."""
        wal = self.wal
        prev = SignerPin.from_json(wal.meta.get(META_SIGNING_KEY)) or self._pin_from_checkpoints(setup)
        new_key, new_pin = self._connect_signer(setup)
        if new_key is None:
            kept = self._kept_pin(setup, prev)
            if kept is not None:
                new_key, new_pin = kept
                self._log(
                    f"checkpoints stay pinned to {new_pin.key_id} ({new_pin.fingerprint}) and queue until it answers"
                )
        if new_key is None or new_pin is None:
            wal.signer = None
            self._pending_pin = (prev, setup)
            self._log(f'checkpoints queue until the kms provider "{setup.provider}" answers and its key is pinned')
            return
        if prev is None or wal.seq == 0 or prev.fingerprint == new_pin.fingerprint:
            wal.signer = new_key
            self._record_pin(new_pin, prev, sync=True)
            self._record_pin_file(new_pin)
            return
        old_key, temp_host = self._old_signer(setup, prev)
        try:
            stored = wal.append_sync(
                self._change_record(prev, new_pin, old_key is not None), meta={META_SIGNING_KEY: new_pin.to_json()}
            )
            if old_key is not None:
                try:
                    cp = wal.sign_head(old_key, Head(stored.seq, stored.record_hash, "signer_change", self.clock()))
                    wal.commit_checkpoint_sync(cp)
                except SigningFailed as exc:
                    self._log(f"the old key could not sign the hand-over at seq {stored.seq}: {exc}")
        finally:
            if temp_host is not None:
                temp_host.close()
        wal.signer = new_key
        self._signer_pin = new_pin
        self._record_pin_file(new_pin)
        self._log(f"checkpoint signer changed: {prev.key_id} → {new_pin.key_id} (provider_change at seq {stored.seq})")

    def _connect_signer(self, setup: SigningSetup) -> tuple[CheckpointKey | None, SignerPin | None]:
        """The key that should sign now, fetched and pinned (blocking: a KMS round trip)."""
        stamp = rfc3339(self.clock())
        if setup.provider is None:
            return setup.local, SignerPin.of(setup.local, pinned_at=stamp)
        if self.providers is None:
            return None, None
        outcome = CheckpointSigner.connect(self.providers, setup.provider, timeout=setup.timeout)
        if isinstance(outcome, ProviderFailure):
            why = f'checkpoint signer "{setup.provider}" is unavailable: {outcome}'
            if why != self._last_pin_error:  # retried every PIN_RETRY_S: say each new reason once
                self._log(why)
                self._last_pin_error = why
            return None, None
        config = thaw(setup.provider_config) if setup.provider_config is not None else None
        return outcome, SignerPin.of(outcome, setup.provider, config, pinned_at=stamp)

    def _kept_pin(self, setup: SigningSetup, prev: SignerPin | None) -> tuple[CheckpointKey, SignerPin] | None:
        """A KMS that does not answer at start keeps the key pinned for the same provider block."""
        if setup.provider is None or self.providers is None:
            return None
        config = thaw(setup.provider_config) if setup.provider_config is not None else None
        candidates = [prev, *(read_pins(setup.pins_file) if setup.pins_file is not None else [])]
        for pin in candidates:
            if pin is None or pin.provider != setup.provider or pin.config != config:
                continue
            der = _pin_der(pin)
            if der is None:
                continue
            return CheckpointSigner.from_pin(self.providers, setup.provider, pin.key_id, der), pin
        return None

    def _pin_from_checkpoints(self, setup: SigningSetup) -> SignerPin | None:
        """A WAL written before signers were pinned: the key of its last checkpoint."""
        checkpoints = self.wal.store.checkpoints()
        if not checkpoints:
            return None
        last = checkpoints[-1]
        if last.key_fingerprint == setup.local.fingerprint and last.public_key == setup.local.public_b64:
            return SignerPin.of(setup.local)
        if key_fingerprint(last.public_key) != last.key_fingerprint:
            return None
        algorithm = "ed25519" if last.key_fingerprint.startswith("ed25519:") else "ecdsa-p256-sha256"
        return SignerPin(f"unknown:{last.key_fingerprint}", last.key_fingerprint, algorithm, last.public_key)

    def _old_signer(self, setup: SigningSetup, prev: SignerPin) -> tuple[CheckpointKey | None, ProviderHost | None]:
        """The key being retired, to sign the hand-over: the engine's local key, or the old KMS reached
        again through the provider block pinned with it (a provider child of its own, closed after)."""
        if prev.fingerprint == setup.local.fingerprint:
            return setup.local, None
        if prev.provider is None or prev.config is None:
            self._log(f"the old checkpoint key {prev.key_id} cannot be reached: the hand-over is not countersigned")
            return None, None
        host = ProviderHost({prev.provider: prev.config}, self.environ, log=self._log)
        host.start()
        outcome = CheckpointSigner.connect(host, prev.provider, timeout=setup.timeout)
        if isinstance(outcome, CheckpointSigner) and outcome.fingerprint == prev.fingerprint:
            return outcome, host
        host.close()
        why = str(outcome) if isinstance(outcome, ProviderFailure) else f"it now holds {outcome.key_id}"
        self._log(f"the old checkpoint key {prev.key_id} cannot sign the hand-over ({why}): not countersigned")
        return None, None

    def _change_record(self, prev: SignerPin, new: SignerPin, countersigned: bool) -> dict[str, Any]:
        now, record_id, timestamp = self._ids()
        return {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "provider_change",
            "change": "checkpoint_signer",
            "from": prev.public(),
            "to": new.public(),
            # The old key signs the checkpoint at this record when it can be reached (`audit verify` checks).
            "old_key_available": countersigned,
            "policy_version": self.policy.version,
            "dev": self.state.dev,
        }

    def _record_pin(self, pin: SignerPin, prev: SignerPin | None, *, sync: bool) -> None:
        """The pin of the key in force, in the WAL meta (once: an unchanged key keeps its first pin)."""
        if prev is not None and prev.fingerprint == pin.fingerprint and prev.key_id == pin.key_id:
            pin = SignerPin(pin.key_id, pin.fingerprint, pin.algorithm, pin.public_key, pin.provider, pin.config,
                            prev.pinned_at or pin.pinned_at)  # fmt: skip
        self._signer_pin = pin
        text = pin.to_json()
        if self.wal.meta.get(META_SIGNING_KEY) == text:
            return
        if sync:
            self.wal.store.commit(Batch(meta={META_SIGNING_KEY: text}))
            self.wal.meta[META_SIGNING_KEY] = text
        else:
            self.wal.set_meta({META_SIGNING_KEY: text})

    def _record_pin_file(self, pin: SignerPin) -> None:
        """KMS keys also go to the state dir, where `audit verify` pins them as it pins signing.key."""
        if pin.provider is None or self.signing is None or self.signing.pins_file is None:
            return
        try:
            add_pin(self.signing.pins_file, pin)
        except OSError as exc:
            self._log(f"cannot record the pinned key in {self.signing.pins_file}: {exc}")

    async def _pin_later(self) -> None:
        """A KMS never pinned was down at start: ask again until it answers, then hand over to it."""
        assert self._pending_pin is not None
        prev, setup = self._pending_pin
        loop = asyncio.get_running_loop()
        while True:
            new_key, new_pin = await loop.run_in_executor(None, self._connect_signer, setup)
            if new_key is not None and new_pin is not None:
                break
            await asyncio.sleep(PIN_RETRY_S)
        self._pending_pin = None
        if prev is None or self.wal.seq == 0 or prev.fingerprint == new_pin.fingerprint:
            self._record_pin(new_pin, prev, sync=False)
        else:
            old_key, temp_host = await loop.run_in_executor(None, self._old_signer, setup, prev)
            try:
                record = self._change_record(prev, new_pin, old_key is not None)
                stored = await self.wal.append(record, meta={META_SIGNING_KEY: new_pin.to_json()})
                self._signer_pin = new_pin
                self._show(record)
                if old_key is not None:
                    head = Head(stored.seq, stored.record_hash, "signer_change", self.clock())
                    try:
                        cp = await loop.run_in_executor(None, self.wal.sign_head, old_key, head)
                        self.wal.offer_checkpoint(cp)
                        await self.wal.wait_signed(stored.seq, max(self.signing_timeout, 10.0))
                    except SigningFailed as exc:
                        self._log(f"the old key could not sign the hand-over at seq {stored.seq}: {exc}")
            except StoreError as exc:
                self._log(f"the signer change could not be recorded: {exc}; retrying")
                self._pending_pin = (prev, setup)
                await asyncio.sleep(PIN_RETRY_S)
                self._pin_task = asyncio.create_task(self._pin_later(), name="pin-signer")
                return
            finally:
                if temp_host is not None:
                    await loop.run_in_executor(None, temp_host.close)
            self._log(f"checkpoint signer changed: {prev.key_id} → {new_pin.key_id}")
        self.wal.set_signer(new_key)
        await loop.run_in_executor(None, self._record_pin_file, new_pin)

    def _provider_rows(self) -> list[dict[str, Any]]:
        if self.providers is not None:
            return [s.to_dict() for s in self.providers.status()]
        if self.config.dev:  # dev stubs every provider it declares
            return [
                {
                    "name": name,
                    "type": str(p.get("type")),
                    "health": str(Health.HEALTHY),
                    "last_error": None,
                    "since": self.started_at,
                    "restarts": 0,
                    "pid": None,
                    "stub": True,
                }
                for name, p in sorted(self.policy.providers.items())
                if p.get("type") == "kms" or p.get("type") in _SECRET_TYPES
            ]
        return []

    def _checkpoint_status(self) -> dict[str, Any]:
        signer = self.wal.signer
        pin = self._signer_pin
        return {
            "signer": signer.key_id if signer is not None else None,
            "fingerprint": signer.fingerprint if signer is not None else None,
            "provider": pin.provider if pin is not None else None,
            "remote": self.wal.remote_signing,
            "queue": self.wal.queue_depth,
            "unsigned_records": max(0, self.wal.seq - self.wal.signed_seq),
            "coalesced": self.wal.heads_coalesced,
            "last_error": self.wal.signing_error,
            "pinning": self._pending_pin is not None,
            "signing_required": self.wal.signing_required,
        }

    async def drain(self) -> None:
        if self.lifecycle in (DRAINING, HALT):
            return
        self.lifecycle = DRAINING
        for server in self._servers:
            server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 10)
        if self.egress is not None:
            await self.egress.close()
        self.identity.close()
        if self._pin_task is not None:
            self._pin_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pin_task
        await self.wal.close()  # the shutdown checkpoint may still need the KMS: providers close after it
        if self.fleet is not None:  # after the last decision: queued releases still run
            await asyncio.get_running_loop().run_in_executor(None, self.fleet.close)
        if self.sinks is not None:
            await self.sinks.aclose(5.0)  # what is not delivered stays spooled for the next start
        if self.providers is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.providers.close)
        await self.alerts.close()
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
            socket_dir(spec.path.parent, 0o755 if spec.role == "agent" else 0o700)
            with contextlib.suppress(FileNotFoundError):
                spec.path.unlink()
            old_umask = os.umask(0o177)
            try:
                server = await asyncio.start_unix_server(
                    self._handler_for(spec), path=str(spec.path), limit=READ_CHUNK, backlog=LISTEN_BACKLOG
                )
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
    def _admit(self, spec: SocketSpec, incoming: int) -> bool:
        """May a connection on `spec` buffer `incoming` more bytes of partial line? Input buffering stays
        within MAX_TOTAL_BUFFERED in total and within MAX_SOCKET_BUFFERED per socket: each agent has a
        socket of its own, so one agent holding many partial lines cannot crowd the others out."""
        return (
            self.buffered + incoming <= MAX_TOTAL_BUFFERED
            and self._buffered_by.get(spec.path, 0) + incoming <= MAX_SOCKET_BUFFERED
        )

    def _account(self, spec: SocketSpec, delta: int) -> None:
        self.buffered += delta
        self._buffered_by[spec.path] = self._buffered_by.get(spec.path, 0) + delta

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: SocketSpec) -> None:
        uid, pid = _peer_credentials(writer)
        peer = Peer(spec.role, spec.agent_id, uid, pid, str(spec.path))
        self.connections.add(writer)
        buf = bytearray()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(
                        reader.read(READ_CHUNK), self.config.idle_partial_line_s if buf else None
                    )
                except TimeoutError:
                    break  # a stalled half line: close rather than hold its memory
                if not chunk:
                    break
                if not self._admit(spec, len(chunk)):
                    writer.write(encode_error("FRAME_TOO_LARGE", "engine input buffers are full; reconnect later"))
                    break
                buf += chunk
                self._account(spec, len(chunk))
                served = 0
                while True:
                    newline = buf.find(b"\n")
                    if newline < 0:
                        break
                    line = bytes(buf[:newline])
                    del buf[: newline + 1]
                    self._account(spec, -(newline + 1))
                    if line.strip():
                        writer.write(await self._dispatch(line, peer))
                        await writer.drain()
                        served += 1
                        if served % YIELD_EVERY == 0:
                            await asyncio.sleep(0)  # a client pipelining cheap lines must not hog the loop
                if len(buf) >= MAX_FRAME:
                    writer.write(
                        encode_error("FRAME_TOO_LARGE", f"a request line reached {MAX_FRAME} bytes without a newline")
                    )
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._account(spec, -len(buf))
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
        except Exception as exc:  # a defect: fail closed for this request, keep serving the connection
            self._log(f"internal error in `{message.verb}`: {type(exc).__name__}")
            return encode_error(
                "INTERNAL_ERROR", "the engine failed to handle this request", rpc=message.rpc, rpc_id=message.rpc_id
            )
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _ids(self) -> tuple[float, str, str]:
        now = self.clock()
        return now, new_ulid(now, self.random_bytes), rfc3339(now)

    def _event(self, action_type: str) -> dict[str, Any]:
        """The head of a DPR the engine makes itself (not a decision): a fresh id and its times."""
        now, record_id, timestamp = self._ids()
        return {"id": record_id, "time": timestamp, "epoch_ms": int(now * 1000), "action_type": action_type}

    # ---- verbs
    async def _verb_govern(self, message: Message, peer: Peer) -> dict[str, Any]:
        started = self.clock_ns()
        now = self.clock()
        timestamp = rfc3339(now)
        self.state.expire_reservations(now)
        claimed = message.fields.get("agent_id")
        who = peer.agent_id if peer.role == "agent" else claimed
        token = message.fields.get("principal_token")
        identity = await self.identity.verify(
            who if isinstance(who, str) else None, peer, token if isinstance(token, str) else None
        )
        if self.identity.declared:
            now = self.clock()  # the verifier may have waited on the network
            timestamp = rfc3339(now)
        verdict = self.state.govern(
            message.fields,
            peer,
            identity=identity,
            now=now,
            new_id=lambda: new_ulid(now, self.random_bytes),
            timestamp=timestamp,
            started_ns=started,
            clock_ns=self.clock_ns,
        )
        if verdict.fleet is not None:  # budget step, fleet part: the database grants the reservation or not
            verdict = await self._reserve_fleet(verdict)
        verdict.record["epoch_ms"] = int(now * 1000)
        secret: SecretValue | None = None
        credential: dict[str, Any] | None = None
        ref_text = credential_for(self.state.policy, verdict)
        route = credential_route(self.state.policy, verdict) if ref_text is not None else None
        if ref_text is not None:  # step 9: permits only, before the DPR append
            secret, credential = await self._broker(verdict, ref_text, now, started, route)
        try:
            stored = await self.wal.append(verdict.record, verdict.args_bytes, verdict.approval_writes)
        except StoreError:
            # WAL-first: a decision that is not on disk was never made, so neither are its state changes.
            for undo in reversed(verdict.undo):
                undo()
            code, human = "WAL_WRITE_FAILURE", "the decision could not be recorded, so the call is denied"
            if verdict.record.get("code") == "BUDGET_UNAVAILABLE" and verdict.decision is not None:
                # The database that keeps the fleet budget keeps the WAL too: say the first thing that failed.
                code = "BUDGET_UNAVAILABLE"
                human = f"{verdict.decision.reason} (and the decision could not be recorded)"
            return {
                "call_id": message.fields.get("call_id"),
                "effect": "DENY",
                "action_id": None,
                "latency_us": (self.clock_ns() - started) // 1000,
                "structured_denial": {
                    "code": code,
                    "rule_ref": None,
                    "human_message": human,
                    "resolution": {"type": "retry_after"},
                },
            }
        self._show(verdict.record)
        signed = True
        if verdict.reply.get("effect") == PERMIT and self.wal.signing_required:
            signed = await self.wal.wait_signed(stored.seq, self.signing_timeout)
        if not signed:
            return await self._withdraw(verdict, started, credential is not None)
        agent = self.state.policy.agents.get(str(verdict.record.get("agent_id")))
        if agent is not None and (agent.alerts or getattr(verdict.decision, "notify", None)):
            # After the commit and off the critical path: matched and queued on the loop's next turn, once
            # this reply is on its way; enqueueing never waits (a full queue drops and counts).
            asyncio.get_running_loop().call_soon(self.alerts.decision, agent, verdict.record, verdict.decision)
        if secret is not None and credential is not None and route is not None and not self.config.dev:
            # Proxy tier, after the commit: the proxy gets the value for the one request; the agent a placeholder.
            await self._grant_through_proxy(verdict, credential, secret, route)
            return {**verdict.reply, "credential": credential}
        if secret is not None and credential is not None:
            # Only now, after the commit: the value exists in this reply and nowhere else.
            return {**verdict.reply, "credential": {**credential, "value": secret.reveal()}}
        return verdict.reply

    async def _reserve_fleet(self, verdict: Verdict) -> Verdict:
        """Ask the fleet's database for the permit's reservation (on the budget thread, bounded by
        `budget_timeout`); a refusal or no answer turns the permit into a deny."""
        claim = verdict.fleet
        assert claim is not None
        timeout = self.fleet.timeout if self.fleet is not None else 0.0
        if self.fleet is None:
            outcome = FleetOutcome(UNAVAILABLE, error="this engine keeps no PostgreSQL database for fleet budgets")
        else:
            outcome = await self.fleet.reserve(claim)
        if outcome.status == UNAVAILABLE and outcome.error != self._fleet_problem:
            self._log(f"fleet budget unavailable ({outcome.error}): calls on fleet budgets are denied meanwhile")
        elif outcome.status != UNAVAILABLE and self._fleet_problem is not None:
            self._log("fleet budget database answering again")
        self._fleet_problem = outcome.error if outcome.status == UNAVAILABLE else None
        decided = self.state.fleet_outcome(verdict, outcome, timeout)
        if outcome.status == GRANTED and self.fleet is not None:
            # Undone with the rest of the permit (WAL, credential or signing failure): give it back.
            decided.undo.append(partial(self.fleet.release_soon, claim.reservation_id, claim.agent_id))
        return decided

    async def _grant_through_proxy(
        self, verdict: Verdict, credential: dict[str, Any], secret: SecretValue, route: str
    ) -> None:
        """Hand the proxy the grant. If that fails, the placeholder names no grant and the proxy refuses
        the request (fail closed); the engine log says why."""
        method, url, header = route.split(" ")
        authority, _, path = url[len("http://") :].partition("/")
        grant = {"placeholder": credential["placeholder"], "host": authority, "method": method, "path": "/" + path,
                 "header": header, "value": secret.reveal(), "ttl": credential["ttl_seconds"]}  # fmt: skip
        try:
            if self.egress is None:
                raise ProxyError("PROXY_UNAVAILABLE", "no egress proxy runs")
            await self.egress.proxy.grant(str(verdict.record.get("agent_id")), grant)
        except (ProxyError, ValueError) as exc:
            self._log(f"credential {credential.get('ref')} for {verdict.record.get('id')}: not granted ({exc})")

    async def _broker(
        self, verdict: Verdict, ref_text: str, now: float, started: int, route: str | None = None
    ) -> tuple[SecretValue | None, dict[str, Any] | None]:
        """Fetch the permit's credential; on any failure turn the verdict into DENY CREDENTIAL_UNAVAILABLE."""
        ref = parse_secret_ref(ref_text)  # compiled: always well-formed
        ttl = credential_ttl(self.state.policy, ref.provider)
        expires_at = rfc3339(now + ttl)
        placeholder = None
        if route is not None:
            placeholder = "FARAMESH-CREDENTIAL-" + base64.urlsafe_b64encode(self.random_bytes(18)).decode()
        if self.config.dev:  # DESIGN.md §3: dev stubs every provider
            stub = "STUB-" + self.random_bytes(12).hex()
            reply = grant_credential(verdict, ref_text, ref.provider, None, expires_at=expires_at, ttl_seconds=ttl,
                                     stub=True, route=route, placeholder=placeholder)  # fmt: skip
            return SecretValue(stub), reply
        agent_id = str(verdict.record.get("agent_id"))
        if route is not None and (self.egress is None or agent_id not in self.egress.proxy.rules):
            # Proxy delivery needs the agent's proxy: without it the secret would have nowhere safe to go.
            self._log(f"credential {ref_text} for {verdict.record.get('id')}: no egress proxy serves {agent_id}")
            deny_credential(verdict, ref_text, ref.provider, "PROXY_UNAVAILABLE", (self.clock_ns() - started) // 1000)
            return None, None
        outcome: SecretResult | ProviderFailure
        if self.providers is None:
            outcome = ProviderFailure(ref.provider, "get_secret", FailureCode.DOWN, "this engine runs no providers")
        else:
            args: dict[str, Any] = {"name": ref.name}
            if ref.field is not None:
                args["field"] = ref.field
            result = await self.providers.acall(ref.provider, "get_secret", args)
            outcome = (
                result
                if isinstance(result, SecretResult | ProviderFailure)
                else ProviderFailure(
                    ref.provider, "get_secret", FailureCode.PROTOCOL, "the provider answered with something else"
                )
            )
        if isinstance(outcome, ProviderFailure):
            # The host redacted the message of every secret it knows; it goes to the engine log only.
            self._log(f"credential {ref_text} for {verdict.record.get('id')}: {outcome}")
            deny_credential(verdict, ref_text, ref.provider, str(outcome.code), (self.clock_ns() - started) // 1000)
            return None, None
        reply = grant_credential(
            verdict, ref_text, ref.provider, outcome.version, expires_at=expires_at, ttl_seconds=ttl,
            route=route, placeholder=placeholder,
        )  # fmt: skip
        return outcome.value, reply

    async def _withdraw(self, verdict: Verdict, started: int, had_credential: bool) -> dict[str, Any]:
        """signing_required: no checkpoint covered this permit within signing_timeout. The permit is on
        record, so a `permit_withdrawn` DPR says it was not delivered (and gives back its budget estimate
        at replay); the state it changed is undone; the agent gets a deny and never the credential."""
        for undo in reversed(verdict.undo):
            undo()
        rows = []
        for row in verdict.approval_writes:
            approval = self.state.approvals.get(str(row.get("id")))
            if approval is not None:
                rows.append(approval.to_row())
        now, record_id, timestamp = self._ids()
        action_id = verdict.record.get("id")
        record = {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "permit_withdrawn",
            "agent_id": verdict.record.get("agent_id"),
            "tool": verdict.record.get("tool"),
            "withdraws": action_id,
            "effect": "DENY",
            "code": "SIGNING_UNAVAILABLE",
            "cost_delta_cents": -int(verdict.record.get("cost_cents") or 0),
            "credential_delivered": False if had_credential else None,
            "policy_version": self.policy.version,
            "dev": self.state.dev,
        }
        try:
            await self.wal.append(record, None, rows)
            self._show(record)
        except StoreError as exc:  # the deny stands: the permit was never delivered
            self._log(f"could not record the withdrawal of {action_id}: {exc}")
        return {
            "call_id": verdict.reply.get("call_id"),
            "effect": "DENY",
            "action_id": action_id,
            "latency_us": (self.clock_ns() - started) // 1000,
            "structured_denial": {
                "code": "SIGNING_UNAVAILABLE",
                "rule_ref": verdict.record.get("rule_ref"),
                "human_message": (
                    f"signing_required: no signed checkpoint covered this permit within {self.signing_timeout:g}s "
                    "(the signing key is unavailable), so the call is denied"
                ),
                "resolution": {"type": "retry_after"},
            },
        }

    def _show(self, record: dict[str, Any]) -> None:
        """dev: every committed DPR is printed on stderr (pretty JSON)."""
        if self.config.pretty_dprs:
            sys.stderr.write(orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")

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
        action_id = message.fields["action_id"]
        reservation = self.state.reservations.get(action_id)
        if reservation is not None and peer.role == "agent" and reservation.agent_id != peer.agent_id:
            raise _VerbError("INVALID_REQUEST", "unknown or already settled action_id")
        usage = message.fields.get("usage") or {}
        actual = usage.get("cost_cents")
        if type(actual) is not int or not 0 <= actual < MAX_CENTS:
            model_args = {
                "model": usage.get("model"),
                "input_tokens": usage.get("input_tokens"),
                "max_tokens": usage.get("output_tokens"),
            }
            # No usage the engine can price: the estimate (-1 marks it where the estimate is not known here).
            flat = reservation.cents if reservation is not None else -1
            actual = min(estimate_cost_cents(model_args, flat), MAX_CENTS - 1)
        if reservation is None:
            if self.fleet is None or not _has_fleet_budgets(self.state.policy):
                raise _VerbError("INVALID_REQUEST", "unknown or already settled action_id")
            # A fleet reservation this engine does not hold in memory (made before a restart, or by another
            # engine of the fleet): the database knows it, and whose it is.
            return await self._complete_fleet_only(action_id, peer, None if actual < 0 else actual)
        del self.state.reservations[action_id]  # claimed: a concurrent `complete` finds nothing to settle
        fleet_note: dict[str, Any] | None = None
        if reservation.fleet:
            settled = await self._settle_fleet(action_id, reservation.agent_id, actual, reservation)
            if settled.status == EXPIRED:  # its TTL passed: settled at the estimate, locally too
                self.state.settle_reservation(reservation, reservation.cents, self.clock())
                raise _VerbError("INVALID_REQUEST", _expired_message(action_id, settled.reserved_cents))
            if settled.status == UNKNOWN:  # settled elsewhere: on another engine, or swept at its TTL
                self.state.settle_reservation(reservation, reservation.cents, self.clock())
                raise _VerbError(
                    "INVALID_REQUEST",
                    f"action {action_id} is already settled (by a `complete` on another engine of the fleet, or "
                    "at its estimate once its reservation_ttl passed)",
                )
            fleet_note = _fleet_settlement_note(self.state.policy, settled)
        now, record_id, timestamp = self._ids()
        record = {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "settlement",
            "agent_id": reservation.agent_id,
            "settles": action_id,
            "reserved_cents": reservation.cents,
            # replay charged the reservation as spent at the estimate: the delta corrects it to the actual
            "cost_delta_cents": actual - reservation.cents,
            "dev": self.state.dev,
        }
        if fleet_note is not None:
            record["fleet_budget"] = fleet_note
        try:
            await self.wal.append(record)
        except StoreError as exc:
            # Not recorded, not settled — except in the fleet's database, which already settled it: a retry
            # settles the local budgets only.
            reservation.fleet = ()
            self.state.reservations[action_id] = reservation
            if fleet_note is not None:
                self._log(f"fleet settlement of {action_id} ({actual} cents) is not on record: {exc}")
            raise _VerbError("WAL_WRITE_FAILURE", "the settlement could not be recorded") from exc
        self.state.settle_reservation(reservation, actual, now)
        self._show(record)
        return {"action_id": action_id, "settled_cents": actual}

    async def _settle_fleet(
        self, action_id: str, agent_id: str | None, actual: int | None, reservation: Reservation | None
    ) -> FleetSettlement:
        """Settle a fleet reservation in the database; no answer in time → BUDGET_UNAVAILABLE (the
        reservation stays, in memory and there: a retry can settle it, or its TTL settles it at the
        estimate)."""
        assert self.fleet is not None
        settled = await self.fleet.settle(action_id, agent_id, actual, self.clock())
        if settled.status == UNAVAILABLE:
            self._log(f"fleet settlement of {action_id}: {settled.error}")
            if reservation is not None:
                self.state.reservations[action_id] = reservation
            raise _VerbError(
                "BUDGET_UNAVAILABLE",
                f"the fleet budget database did not answer within {self.fleet.timeout:g}s; retry the completion",
            )
        return settled

    async def _complete_fleet_only(self, action_id: str, peer: Peer, actual: int | None) -> dict[str, Any]:
        owner = peer.agent_id if peer.role == "agent" else None
        settled = await self._settle_fleet(action_id, owner, actual, None)
        if settled.status == UNKNOWN:
            raise _VerbError("INVALID_REQUEST", "unknown or already settled action_id")
        if settled.status == EXPIRED:
            raise _VerbError("INVALID_REQUEST", _expired_message(action_id, settled.reserved_cents))
        now, record_id, timestamp = self._ids()
        record = {
            "id": record_id,
            "time": timestamp,
            "epoch_ms": int(now * 1000),
            "action_type": "settlement",
            "agent_id": settled.agent_id,
            "settles": action_id,
            "reserved_cents": settled.reserved_cents,
            # Not a permit of this chain: no local budget to correct at replay (the fleet's is settled).
            "cost_delta_cents": 0,
            "fleet_budget": _fleet_settlement_note(self.state.policy, settled),
            "dev": self.state.dev,
        }
        try:
            await self.wal.append(record)
        except StoreError as exc:
            self._log(f"fleet settlement of {action_id} ({settled.settled_cents} cents) is not on record: {exc}")
            raise _VerbError("WAL_WRITE_FAILURE", "the settlement could not be recorded") from exc
        self._show(record)
        return {"action_id": action_id, "settled_cents": settled.settled_cents}

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
            # not recorded, not resolved
            approval.status, approval.approver, approval.reason, approval.resolved_at = "PENDING", None, None, None
            raise _VerbError("WAL_WRITE_FAILURE", "the resolution could not be recorded") from exc
        self._show(record)
        if approve:
            self.alerts.approval_resolved(self.state.policy.agents.get(approval.agent_id), record)
        return {"approval": approval.public(now)}

    async def _verb_reload(self, message: Message, peer: Peer) -> dict[str, Any]:
        version = message.fields.get("policy_version")
        if self.policy_loader is None or type(version) is not str:
            raise _VerbError("INVALID_REQUEST", "reload needs the policy_version `apply` installed")
        try:
            policy = self.policy_loader(version)
        except Exception as exc:
            raise _VerbError("RELOAD_REFUSED", f"the running policy stays: {exc}") from None
        try:
            validate_policy(policy)
            alert_config = AlertConfig.from_policy(policy, self.environ, dev=self.config.dev)
        except (EgressConfigError, ValueError) as exc:
            raise _VerbError("RELOAD_REFUSED", f"the running policy stays: {exc}") from None
        if thaw(policy.identities) != thaw(self.policy.identities):
            raise _VerbError(
                "RELOAD_REFUSED",
                "the running policy stays: its identity blocks changed, and verifiers start with the engine; "
                "restart it (faramesh apply --stop, then faramesh apply)",
            )
        if not self.config.dev and thaw(policy.providers) != thaw(self.policy.providers):
            # Provider children (and the checkpoint signer) are started with the engine, from its
            # environment: a changed provider block takes a restart, never a half-swapped provider.
            raise _VerbError(
                "RELOAD_REFUSED",
                "the running policy stays: its provider blocks changed, and providers start with the engine; "
                "restart it (faramesh apply --stop, then faramesh apply)",
            )
        try:  # WAL-first: the change is on record before any call is decided under it
            activated = await self._record_policy_activation("reload", policy.version, self.policy.version)
        except StoreError as exc:
            raise _VerbError(
                "WAL_WRITE_FAILURE", "the policy change could not be recorded; the running policy stays"
            ) from exc
        previous = self.policy
        self.policy = policy
        self.state.policy = policy
        await self._ensure_egress(previous)
        self.alerts.configure(alert_config)
        for problem in self.alerts.check_policy(policy):
            self._log(problem)
        if activated is not None:
            self.applied_at = activated
        return {"policy_version": policy.version}

    async def _verb_config_event(self, message: Message, peer: Peer) -> dict[str, Any]:
        """`faramesh unlock` / `apply` tell the engine the stack's config was unlocked or locked: a DPR on
        the chain, so `audit` shows who lifted the immutable flags and when (operator socket only)."""
        by = message.fields.get("by")
        record = {
            **self._event(message.fields["event"]),
            "paths": list(message.fields.get("paths") or []),
            "policy_version": self.policy.version,
            "by": f"uid:{peer.uid}" + (f" ({by})" if isinstance(by, str) and by else ""),
            "identity": {"method": "socket", "role": peer.role, "peer_uid": peer.uid, "peer_pid": peer.pid},
            "dev": self.state.dev,
        }
        try:
            await self.wal.append(record)
        except StoreError as exc:
            raise _VerbError("WAL_WRITE_FAILURE", f"the {message.fields['event']} event could not be recorded") from exc
        self._show(record)
        return {"id": record["id"], "action_type": record["action_type"], "policy_version": self.policy.version}

    async def _ensure_egress(self, previous: CompiledPolicy | None) -> None:
        """The egress proxy runs while some agent has an `egress` block (and the engine has an intake path)."""
        if self.config.egress_intake is None:
            return
        if self.egress is None:
            if not egress_blocks(self.policy):
                return
            self.egress = EgressService(self.config.egress_intake, self._record_egress, log=self._log)
            await self.egress.start(self.policy)
            return
        await self.egress.apply_policy(self.policy, previous)

    async def _record_egress(self, fields: dict[str, Any]) -> None:
        """One proxy connection (or an aggregate of them) as a DPR; denies fire the agent's alerts."""
        record = {**self._event("egress"), **fields, "policy_version": self.policy.version, "dev": self.state.dev}
        await self.wal.append(record)
        self._show(record)
        agent = self.policy.agents.get(str(record.get("agent_id")))
        if agent is not None and agent.alerts and record["effect"] == "DENY":
            self.alerts.decision(agent, record, None)

    async def _verb_sandbox_violation(self, message: Message, peer: Peer) -> dict[str, Any]:
        """The supervisor reports calls the agent's seccomp violation filter caught (and it answered EPERM),
        aggregated per agent and second: one DPR per report (operator socket only — an agent cannot
        report, or forge, violations of its own)."""
        agent_id = message.fields["agent_id"]
        if agent_id not in self.policy.agents:
            raise _VerbError("INVALID_REQUEST", f"no agent {agent_id!r} in the running policy")
        attempts = {str(k): int(v) for k, v in sorted(message.fields["attempts"].items())}
        record = {
            **self._event("sandbox_violation"),
            "agent_id": agent_id,
            "effect": "DENY",
            "code": "SANDBOX_VIOLATION",
            "tier": "os",
            "attempts": attempts,
            "count": sum(attempts.values()),
            "window": {"first_ms": message.fields.get("first_ms"), "last_ms": message.fields.get("last_ms")},
            "policy_version": self.policy.version,
            "identity": {"method": "socket", "role": peer.role, "peer_uid": peer.uid, "peer_pid": peer.pid},
            "dev": self.state.dev,
        }
        try:
            await self.wal.append(record)
        except StoreError as exc:
            raise _VerbError("WAL_WRITE_FAILURE", "the sandbox violation could not be recorded") from exc
        self._show(record)
        agent = self.policy.agents.get(agent_id)
        if agent is not None and agent.alerts:  # `alert { on = "sandbox_violation" }` (and "deny", "any")
            self.alerts.decision(agent, record, None)
        return {"id": record["id"], "action_type": "sandbox_violation", "count": record["count"]}

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
        providers = self._provider_rows()
        troubled = [p for p in providers if p["health"] != str(Health.HEALTHY)]
        identity_down = [i for i in self.identity.status() if i.get("health") not in (None, "HEALTHY")]
        degraded = (
            self.wal.failures > 0
            or bool(troubled)
            or bool(identity_down)
            or (self.sinks is not None and self.sinks.degraded)
            or self._fleet_problem is not None  # calls on fleet budgets are being denied BUDGET_UNAVAILABLE
        )
        last_error = self.wal.last_error
        if last_error is None and troubled:
            row = troubled[0]
            last_error = f'provider "{row["name"]}" {row["health"]}: {row["last_error"] or "no answer yet"}'
        if last_error is None and identity_down:
            row = identity_down[0]
            last_error = f'identity "{row.get("name")}" {row.get("health")}: {row.get("last_error") or "no answer yet"}'
        if last_error is None and self._fleet_problem is not None:
            last_error = f"fleet budgets: {self._fleet_problem}"
        budgets: list[dict[str, Any]] = []
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
        for (agent_id, name), seen in sorted(self.state.fleet_seen.items()):
            # As the fleet's database last answered this engine (`as_of_ms`); other engines move it too.
            budgets.append({"agent_id": agent_id, "name": name, "scope": "fleet", **seen})
        return {
            "daemon": {
                "state": self.lifecycle,
                "degraded": degraded,
                "last_error": last_error,
                "pid": os.getpid(),
                "uptime_seconds": int(now - self.started_at),
                "socket": str(self.config.sockets[0].path) if self.config.sockets else None,
                "sockets": [{"path": str(s.path), "role": s.role, "agent_id": s.agent_id} for s in self.config.sockets],
                "policy_version": self.policy.version,
                "applied_at": self.applied_at,
                "mode": self.state.mode,
                "dev": self.config.dev,
                "os_tier": bool(self.policy.runtime.get("os_tier", False)),
                "wal": {
                    **self.config.wal_description,
                    "seq": self.wal.seq,
                    "signed_through": self.wal.signed_seq,
                    "checkpoints": self._checkpoint_status(),
                },
                "logs": self.config.logs,
            },
            "providers": providers,
            "egress_proxy": self.egress.status() if self.egress is not None else None,
            "identity": self.identity.status(),
            "sinks": self.sinks.status() if self.sinks is not None else [],
            "budgets": budgets,
            "fleet_budgets": self.fleet.status() if self.fleet is not None else None,
            "approvals": {"pending": len(pending), "oldest_age_seconds": oldest},
            "alerts": self.alerts.snapshot(),
        }


def _pin_der(pin: SignerPin) -> bytes | None:
    """A pin's public key as SubjectPublicKeyInfo DER (pins store Ed25519 keys raw)."""
    import base64
    import binascii

    from faramesh.engine.providers.signing import UnsupportedKey, spki_from_ed25519_raw

    try:
        raw = base64.b64decode(pin.public_key, validate=True)
        return spki_from_ed25519_raw(raw) if len(raw) == 32 else raw
    except (binascii.Error, ValueError, UnsupportedKey):
        return None


_SECRET_TYPES = ("vault", "aws-secrets-manager", "gcp-secret-manager", "azure-key-vault")


def _has_fleet_budgets(policy: CompiledPolicy) -> bool:
    return any(b.scope == FLEET for agent in policy.agents.values() for b in agent.budgets)


def _expired_message(action_id: str, cents: int) -> str:
    return (
        f"action {action_id} is already settled: its reservation_ttl passed, so it was settled at its "
        f"estimate ({cents} cents)"
    )


def _fleet_settlement_note(policy: CompiledPolicy, settled: FleetSettlement) -> dict[str, Any]:
    return {
        "fleet": str(policy.runtime.get("fleet", DEFAULT_FLEET)),
        "budgets": list(settled.budgets),
        "reserved_cents": settled.reserved_cents,
        "settled_cents": settled.settled_cents,
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


def socket_dir(path: Path, mode: int) -> None:
    """The directory a socket is bound in. A missing one is created private (`mode`); an existing one is
    used as it is — never chmod-ed, since `runtime { socket }` may name a shared directory such as /tmp
    or a home — but only when nobody else can replace our socket in it: a real directory that we own
    and others cannot write, or a sticky one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        ensure_private_dir(path, mode)
        return
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory; refusing to bind a socket in it")
    sticky = bool(st.st_mode & _stat.S_ISVTX) and st.st_uid in (0, os.geteuid())
    if not sticky and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
        raise PermissionError(f"others can replace a socket in {path}; refusing to bind there")


def ensure_private_dir(path: Path, mode: int) -> None:
    """Create `path` (and parents) owned by us; refuse a path another user controls or a symlink.

    One exception: a directory root prepared for the engine's service user (root-owned, sticky, our
    group, nothing for others to write — supervisor/service_user.py) is used as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory; refusing to use it")
    prepared = (
        os.geteuid() != 0
        and st.st_uid == 0
        and st.st_mode & _stat.S_ISVTX
        and st.st_gid == os.getegid()
        and not st.st_mode & 0o002
    )
    if prepared:
        return
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.geteuid()}; refusing to use it")
    os.chmod(path, mode)
